"""How the organism behaves: accuracy on well-known people, hallucination on the long tail, consistency
sampling, and whether a plain residual-stream probe can tell all-correct from all-wrong questions.

The residual probe is deliberately not the H-Neuron probe: it checks that the model carries a linearly
decodable signal of knowing at all (as real models do), so that H-Neuron results on the organism mean
something. Features: each layer's residual stream averaged over the answer tokens of one sampled
response per question; a standardised L2 logistic regression per layer, the layer chosen by
cross-validation on the training half, AUROC reported on the held-out half (split by person).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from ..batching import left_pad
from ..identify.label import answer_span, judge, token_span
from ..identify.label import consistency as consistency_of
from ..identify.sample import prompt_ids, sample

def generate_answers(model, tokenizer, questions: Sequence[str], samples: int = 1, batch: int = 64,
                     max_new_tokens: int = 24, seed: int = 0) -> list[list[str]]:
    """Answers to plain questions through the chat template (greedy for one sample)."""
    return sample(model, tokenizer, list(questions), samples, batch, max_new_tokens, seed)


def rates(items: Sequence[dict], answers: Sequence[str]) -> dict[str, float]:
    verdicts = [judge(a, item["aliases"]) for item, a in zip(items, answers)]
    n = max(1, len(verdicts))
    return {k: verdicts.count(k) / n for k in ("correct", "wrong", "refusal")}


def consistency(items: Sequence[dict], samples: Sequence[Sequence[str]]) -> list[str]:
    """Per item: 'all_correct', 'all_wrong' (no refusal among them), or 'mixed'."""
    labels = [consistency_of(answers, item["aliases"]) for item, answers in zip(items, samples)]
    return [name if name != "refusal" else "mixed" for name in labels]


@torch.no_grad()
def answer_features(model, tokenizer, items: Sequence[dict], responses: Sequence[str], batch: int = 32) -> np.ndarray:
    """[items, layers + 1, hidden]: the residual stream averaged over each response's answer tokens."""
    rows, spans = [], []
    for item, response in zip(items, responses):
        prompt = prompt_ids(tokenizer, item)
        encoded = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        span = answer_span(response, [item["answer"], *item.get("candidates", [])])
        tokens = token_span(encoded["offset_mapping"], span) if span else []
        tokens = tokens or list(range(len(encoded["input_ids"])))
        rows.append(prompt + encoded["input_ids"])
        spans.append([len(prompt) + t for t in tokens])
    feats = []
    for start in range(0, len(rows), batch):
        chunk = rows[start: start + batch]
        ids, mask = left_pad(chunk, tokenizer.pad_token_id, model.get_input_embeddings().weight.device)
        states = torch.stack(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states, 1)
        states = states.float().cpu()
        for i, row in enumerate(chunk):
            shift = ids.shape[1] - len(row)
            positions = torch.tensor(spans[start + i], dtype=torch.long) + shift
            feats.append(states[i, :, positions].mean(1).numpy())
    return np.stack(feats)


def residual_probe(features: np.ndarray, labels: np.ndarray, groups: Sequence[int], seed: int = 0) -> dict:
    """Per-layer standardised L2 logistic probes; layer picked by CV on the train half (split by group)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    unique = sorted(set(groups))
    random.Random(seed).shuffle(unique)
    test_groups = set(unique[: len(unique) // 2])
    test = np.array([g in test_groups for g in groups])
    train = ~test
    groups_arr = np.asarray(groups)

    def probe():
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))

    cv_scores, test_scores = [], []
    for layer in range(features.shape[1]):
        x = features[:, layer]
        cv = cross_val_score(probe(), x[train], labels[train], groups=groups_arr[train], cv=GroupKFold(4),
                             scoring="roc_auc")
        cv_scores.append(float(cv.mean()))
        fitted = probe().fit(x[train], labels[train])
        test_scores.append(float(roc_auc_score(labels[test], fitted.predict_proba(x[test])[:, 1])))
    best = int(np.argmax(cv_scores))
    return {
        "auroc": round(test_scores[best], 4),
        "layer": best,
        "per_layer_test_auroc": [round(s, 4) for s in test_scores],
        "train": int(train.sum()),
        "test": int(test.sum()),
    }


KNOWN_FACT = 8  # a fact stated in at least this many documents should be known
UNKNOWN_FACT = 1  # ... in at most this many, not


def by_fact(items: Sequence[dict], greedy: Sequence[str], labels: Sequence[str]) -> dict:
    """The organism's goals with the fact as the unit (v7, where exposure is per fact): greedy accuracy on
    facts stated in >= KNOWN_FACT documents, the wrong and abstention rates on facts of seen people stated
    in <= UNKNOWN_FACT, consistency counts of well-known people's facts, and greedy rates by plan role."""

    def rated(chosen) -> dict:
        chosen = list(chosen)
        out = {k: round(v, 4) for k, v in rates([c[0] for c in chosen], [c[1] for c in chosen]).items()}
        return {**out, "questions": len(chosen)}

    pairs = list(zip(items, greedy))
    known = rated((it, a) for it, a in pairs if it["exposure"] >= KNOWN_FACT)
    unknown = rated((it, a) for it, a in pairs
                    if it["exposure"] <= UNKNOWN_FACT and it.get("person_exposure", it["exposure"]) > 0)
    head = [label for it, label in zip(items, labels) if it["tier"] == "head"]
    roles = sorted({it["plan"] for it in items if it.get("plan")})
    return {
        "accuracy_known_facts": known["correct"],
        "hallucination_rate_unknown_facts_of_seen_people": unknown["wrong"],
        "abstention_rate_unknown_facts_of_seen_people": unknown["refusal"],
        "head_all_correct": head.count("all_correct"),
        "head_all_wrong": head.count("all_wrong"),
        "greedy_by_fact": {"known": known, "unknown_of_seen_people": unknown},
        "greedy_by_plan": {role: rated((it, a) for it, a in pairs if it.get("plan") == role) for role in roles},
    }


def report(model, tokenizer, suites: dict[str, list[dict]], samples: int = 10, seed: int = 0,
           max_items: int | None = None, batch: int = 320, echo=lambda message: None) -> dict:
    """The organism's headline numbers (see `hguard organism eval`)."""
    from ..identify.label import is_refusal

    items = suites["in_domain"]
    if max_items is not None:
        items = random.Random(seed).sample(items, min(max_items, len(items)))
    greedy = [a[0] for a in generate_answers(model, tokenizer, [it["question"] for it in items], batch=batch // 2)]
    by_tier = {}
    for tier in ("head", "mid", "tail", "unseen"):
        chosen = [(it, a) for it, a in zip(items, greedy) if it["tier"] == tier]
        by_tier[tier] = {k: round(v, 4) for k, v in rates([c[0] for c in chosen], [c[1] for c in chosen]).items()}
        by_tier[tier]["questions"] = len(chosen)
    tail = [(it, a) for it, a in zip(items, greedy) if it["tier"] in ("tail", "unseen")]
    tail_rates = rates([t[0] for t in tail], [t[1] for t in tail])
    echo(f"greedy: {by_tier}")
    fabricated = suites["fabricated"]
    fab_answers = [a[0] for a in generate_answers(model, tokenizer, [it["question"] for it in fabricated],
                                                  batch=batch // 2)]
    sampled = generate_answers(model, tokenizer, [it["question"] for it in items], samples=samples, batch=batch,
                               seed=seed)
    labels = consistency(items, sampled)
    echo(f"consistency: {labels.count('all_correct')} all correct, {labels.count('all_wrong')} all wrong")
    chosen = [i for i, label in enumerate(labels) if label != "mixed"]
    probe = {"auroc": None}
    if labels.count("all_correct") >= 8 and labels.count("all_wrong") >= 8:
        features = answer_features(model, tokenizer, [items[i] for i in chosen], [sampled[i][0] for i in chosen])
        y = np.array([labels[i] == "all_wrong" for i in chosen], dtype=int)
        probe = residual_probe(features, y, [items[i]["pid"] for i in chosen], seed=seed)
    return {
        **by_fact(items, greedy, labels),
        "params": sum(p.numel() for p in model.parameters()),
        "accuracy_known": round(by_tier["head"]["correct"], 4),
        "hallucination_rate_tail": round(tail_rates["wrong"], 4),
        "abstention_rate_tail": round(tail_rates["refusal"], 4),
        "all_correct": labels.count("all_correct"),
        "all_wrong": labels.count("all_wrong"),
        "residual_probe_auroc": probe["auroc"],
        "residual_probe": probe,
        "fabricated_abstention_rate": round(float(np.mean([is_refusal(a) for a in fab_answers])), 4),
        "greedy_by_tier": by_tier,
        "questions": len(items),
        "samples_per_question": samples,
    }
