"""`hguard eval`: the H-Neuron probe against baselines on every QA suite, with bootstrap intervals.

Per suite, each question is asked `samples` times with the paper's sampling and kept when its answers
are all right (faithful, 0) or all wrong (hallucinated, 1); on the fabricated-person suite, where no
answer is right, all refusals count as faithful and no refusal at all as hallucinated. The first
answer of a kept question is scored from one teacher-forced pass: CETT of every neuron (answer-token
and other-token means), the residual stream averaged over the answer tokens, and each response
token's log-probability and predictive entropy.

Methods (higher score = more likely hallucinated):
  h_neurons       the probe under evaluation, exactly as the guard applies it, on the CETT means of its
                  training target (fit.py: the whole response, or the answer tokens)
  random_neurons  as many random neurons, a standardised L2 logistic fit for the same target, mean of
                  `draws` draws
  all_neurons     a standardised L1 fit over every neuron for the same target, C by validation AUROC
  residual        a standardised L2 logistic probe on the residual stream (SAPLMA-style), layer by validation
  max_sequence_probability, mean_token_entropy, perplexity   lm-polygraph's estimators
Baselines are fitted on the "train" side of the training suite, with the probe's class balancing (the
same class weights, or a subsample drawn by the same rule from its seed), and tuned on its "val" side; every
method's decision threshold is the one with the best accuracy on the balanced "val" side. Suites are
evaluated on their held-out side only (a question whose fact shares a training question's id is
excluded), balanced by subsampling the larger class, and resampled 1,000 times for 95% intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..guard import left_pad, pad_id
from ..probe import Probe
from ..sites import resolve
from .features import Example, cett_means
from .fit import balanced, check_balance, fit_l1, question_weights, row_weights, training_set, whole_response
from .label import is_refusal
from .label import consistency_labels as qa_labels
from .pipeline import examples_for
from .sample import sample_cached

Scorer = Callable[["Collected"], np.ndarray]
LOGIT_SCORES = ("max_sequence_probability", "mean_token_entropy", "perplexity")


@dataclass
class Collected:
    """Kept questions of one suite and their features (row i is question keys[i])."""

    keys: list[str]
    labels: np.ndarray  # 1 = hallucinated
    side: np.ndarray  # train / val / test
    cett: np.ndarray  # [n, layers * intermediate], mean over answer tokens
    other: np.ndarray  # [n, layers * intermediate], mean over the other response tokens
    residual: np.ndarray  # [n, layers + 1, hidden], mean over answer tokens
    log_likelihoods: list[np.ndarray] = field(default_factory=list)
    entropies: list[np.ndarray] = field(default_factory=list)
    dropped: dict = field(default_factory=dict)
    questions: int = 0
    tokens: np.ndarray | None = None  # [n, 2]: answer tokens and other response tokens per row

    def where(self, mask: np.ndarray) -> "Collected":
        index = np.flatnonzero(mask)
        return Collected([self.keys[i] for i in index], self.labels[index], self.side[index], self.cett[index],
                         self.other[index], self.residual[index], [self.log_likelihoods[i] for i in index],
                         [self.entropies[i] for i in index], self.dropped, self.questions,
                         None if self.tokens is None else self.tokens[index])

    def view(self, target: str) -> np.ndarray:
        """CETT means for a probe target: over answer tokens ('answer') or every response token ('response')."""
        if target == "answer":
            return self.cett
        return whole_response(self.cett, self.other, self.tokens[:, 0], self.tokens[:, 1])

    def training_set(self, target: str, columns: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        return training_set(target, self.cett[:, columns], self.other[:, columns], self.view(target)[:, columns],
                            self.labels)

    def row_weights(self, target: str, balance: str) -> np.ndarray | None:
        """Sample weights for the rows of `training_set(target)` under a balancing mode (fit.py)."""
        return row_weights(target, question_weights(self.labels, balance), self.other)


def fabricated_labels(items: Sequence[dict], samples: Sequence[Sequence[str]]):
    """For questions with no right answer: all refusals -> faithful (0), no refusal -> hallucinated (1)."""
    kept, dropped = [], {}
    for item, answers in zip(items, samples):
        refusals = [is_refusal(a) for a in answers]
        response = answers[0].strip() if answers else ""
        if not response or (any(refusals) and not all(refusals)):
            reason = "empty_response" if not response else "mixed"
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        start = answers[0].find(response)
        kept.append({"item": item, "label": 0 if all(refusals) else 1, "response": answers[0],
                     "span": (start, start + len(response)), "span_source": "whole_response"})
    return kept, dropped


@torch.no_grad()
def response_stats(model, examples: Sequence[Example], pad_id: int):
    """Residual stream averaged over answer tokens [n, layers + 1, hidden]; per response token, its
    log-probability and the entropy of the distribution it was drawn from."""
    rows = [e.prompt_ids + e.response_ids for e in examples]
    device = model.get_input_embeddings().weight.device
    ids, mask = left_pad(rows, pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    states = torch.stack(out.hidden_states, 1).float()  # [b, layers + 1, T, hidden]
    logp = torch.log_softmax(out.logits.float(), -1)
    residual, log_likelihoods, entropies = [], [], []
    width = ids.shape[1]
    for i, example in enumerate(examples):
        start = width - len(example.response_ids)
        answer = torch.tensor([start + t for t in example.answer_tokens], device=device)
        residual.append(states[i, :, answer].mean(1).cpu().numpy())
        positions = torch.arange(start - 1, width - 1, device=device)  # the logits that predicted each token
        targets = ids[i, start:]
        dist = logp[i, positions]
        log_likelihoods.append(dist.gather(1, targets[:, None])[:, 0].cpu().numpy())
        entropies.append(-(dist.exp() * dist).sum(-1).cpu().numpy())
    return np.stack(residual), log_likelihoods, entropies


def collect(model, tokenizer, items: Sequence[dict], *, fabricated: bool = False, side_of=lambda item: "test",
            samples: int = 10, max_new_tokens: int = 50, seed: int = 0, batch: int = 16,
            cache: Path | None = None, resume: bool = False) -> Collected:
    """Sample (or, with `resume`, read the answers kept in `cache`), label and featurise one suite."""
    answers = sample_cached(cache, model, tokenizer, items, samples=samples, max_new_tokens=max_new_tokens,
                            seed=seed, resume=resume)
    kept, dropped = (fabricated_labels if fabricated else qa_labels)(items, answers)
    examples, more = examples_for(tokenizer, kept)
    dropped.update(more)
    records = {str(r["item"]["id"]): r for r in kept}
    labels = [records[e.key]["label"] for e in examples]
    sides = [side_of(records[e.key]["item"]) for e in examples]
    pad = pad_id(tokenizer)
    sites = resolve(model)
    cett, other, residual, log_likelihoods, entropies = [], [], [], [], []
    for start in range(0, len(examples), batch):
        part = examples[start: start + batch]
        a, o = cett_means(model, part, pad)
        r, ll, en = response_stats(model, part, pad)
        cett.append(a.numpy()), other.append(o.numpy()), residual.append(r)
        log_likelihoods += ll
        entropies += en
    neurons = sites.num_layers * sites.intermediate_size
    hidden = model.config.hidden_size
    return Collected(
        [e.key for e in examples], np.array(labels, dtype=int), np.array(sides, dtype=object),
        np.concatenate(cett) if cett else np.zeros((0, neurons), np.float32),
        np.concatenate(other) if other else np.zeros((0, neurons), np.float32),
        np.concatenate(residual) if residual else np.zeros((0, sites.num_layers + 1, hidden), np.float32),
        log_likelihoods, entropies, dropped, len(items),
        np.array([(len(e.answer_tokens), len(e.response_ids) - len(e.answer_tokens)) for e in examples],
                 dtype=int).reshape(-1, 2),
    )


# ---- statistics ---------------------------------------------------------------------------------
def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); nan with one class."""
    from scipy.stats import rankdata

    labels = np.asarray(labels)
    positives, negatives = int(labels.sum()), int((1 - labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold (flag when score > t) with the best accuracy."""
    order = np.sort(np.unique(scores))
    candidates = np.concatenate([[order[0] - 1.0], (order[:-1] + order[1:]) / 2, [order[-1] + 1.0]])
    accuracy = [((scores > t) == labels).mean() for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])


def bootstrap(labels: np.ndarray, scores: Sequence[np.ndarray], thresholds: Sequence[float], rounds: int,
              seed: int) -> dict:
    """AUROC and accuracy (means over `scores`, one per draw) with 95% percentile intervals."""
    def measure(index):
        y = labels[index]
        return (np.mean([auroc(y, s[index]) for s in scores]),
                np.mean([((s[index] > t) == y).mean() for s, t in zip(scores, thresholds)]))

    point = measure(np.arange(labels.size))
    rng = np.random.default_rng(seed)
    resampled = np.array([measure(rng.integers(0, labels.size, labels.size)) for _ in range(rounds)])
    low, high = np.nanpercentile(resampled, [2.5, 97.5], axis=0)
    return {"auroc": round(point[0], 4), "auroc_ci": [round(low[0], 4), round(high[0], 4)],
            "accuracy": round(point[1], 4), "accuracy_ci": [round(low[1], 4), round(high[1], 4)]}


# ---- methods ------------------------------------------------------------------------------------
def probe_logits(probe: Probe, intermediate: int, cett: np.ndarray) -> np.ndarray:
    """The probe's classifier on mean CETT rows [n, layers * intermediate], exactly as the guard applies it."""
    flat = (probe.layer * intermediate + probe.neuron).numpy()
    return cett[:, flat] @ probe.weight.numpy().astype(np.float64) + probe.bias


def probe_target(probe: Probe) -> str:
    """What the probe was fitted on (probes from before targets existed were fitted on answer tokens)."""
    return str(probe.training.get("target", "answer"))


def probe_scorer(probe: Probe, intermediate: int) -> Scorer:
    target = probe_target(probe)
    return lambda data: probe_logits(probe, intermediate, data.view(target))


def probe_balance(probe: Probe) -> str:
    """How the probe's classes were balanced in its fit (probes from before this was recorded: a subsample,
    or nothing)."""
    training = probe.training
    return str(training.get("balance") or ("subsample" if training.get("balanced_train") else "none"))


def _l2(x: np.ndarray, y: np.ndarray, C: float, seed: int, weights: np.ndarray | None = None):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    return make_pipeline(StandardScaler(), model).fit(x, y, logisticregression__sample_weight=weights)


def random_scorers(train: Collected, count: int, draws: int, seed: int, target: str,
                   balance: str = "none") -> list[Scorer]:
    weights = train.row_weights(target, balance)
    scorers = []
    for draw in range(draws):
        columns = np.sort(np.random.default_rng(seed + draw).choice(train.cett.shape[1], count, replace=False))
        model = _l2(*train.training_set(target, columns), 1.0, seed, weights)
        scorers.append(lambda data, m=model, c=columns: m.decision_function(data.view(target)[:, c]))
    return scorers


def all_neuron_scorer(train: Collected, val: Collected, Cs: Sequence[float], target: str,
                      balance: str = "none") -> tuple[Scorer, dict]:
    (x, y), weights = train.training_set(target), train.row_weights(target, balance)
    fits = [fit_l1(x, y, C, weights=weights) for C in Cs]
    scores = [auroc(val.labels, f.logits(val.view(target))) for f in fits]
    best = fits[int(np.nanargmax(scores))]
    return (lambda data: best.logits(data.view(target))), {"C": best.C, "kept": best.kept}


def residual_scorer(train: Collected, val: Collected, seed: int, balance: str = "none") -> tuple[Scorer, dict]:
    layers, weights = train.residual.shape[1], question_weights(train.labels, balance)
    fits = [_l2(train.residual[:, l], train.labels, 0.1, seed, weights) for l in range(layers)]
    scores = [auroc(val.labels, f.decision_function(val.residual[:, l])) for l, f in enumerate(fits)]
    layer = int(np.nanargmax(scores))
    return (lambda data: fits[layer].decision_function(data.residual[:, layer])), {"layer": layer}


def logit_scorers() -> dict[str, Scorer]:
    from .logit_scores import logit_scores

    return {name: (lambda data, n=name: logit_scores(data.log_likelihoods, data.entropies, [n])[n])
            for name in LOGIT_SCORES}


def evaluate(probe: Probe, model, training: Collected, suites: dict[str, Collected], *, draws: int = 10,
             rounds: int = 1000, seed: int = 0, Cs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
             logit_baselines: bool = True) -> dict:
    """Fit the baselines on `training` (its train/val sides) and score every suite's held-out side."""
    sites = resolve(model)
    total = sites.num_layers * sites.intermediate_size
    train, val = training.where(training.side == "train"), training.where(training.side == "val")
    if len(set(train.labels)) < 2 or len(set(val.labels)) < 2:
        raise ValueError("the training suite needs faithful and hallucinated questions on both train and val sides")
    balance = check_balance(probe_balance(probe))  # fit every baseline as the probe was fitted, so
    if balance == "subsample":  # that only the choice of features differs between it and a baseline
        rows = np.zeros(len(train.keys), dtype=bool)
        rows[balanced(train.labels, int(probe.training.get("seed", seed)), train.keys)] = True
        train = train.where(rows)
    target = probe_target(probe)
    all_neurons, all_info = all_neuron_scorer(train, val, Cs, target, balance)
    residual, residual_info = residual_scorer(train, val, seed, balance)
    methods: dict[str, tuple[list[Scorer], dict]] = {
        "h_neurons": ([probe_scorer(probe, sites.intermediate_size)], {}),
        "random_neurons": (random_scorers(train, probe.count, draws, seed, target, balance), {"draws": draws}),
        "all_neurons": ([all_neurons], all_info),
        "residual": ([residual], residual_info),
    }
    if logit_baselines:
        methods.update({name: ([scorer], {"library": "lm-polygraph"}) for name, scorer in logit_scorers().items()})
    val_index = balanced(val.labels, seed)
    thresholds = {name: [best_threshold(val.labels[val_index], s(val)[val_index]) for s in scorers]
                  for name, (scorers, _) in methods.items()}
    report = {"neurons_kept": probe.count, "per_mille": round(1000 * probe.count / total, 4), "target": target,
              "h_neurons": int((probe.weight > 0).sum()), "total_neurons": total,
              "training": {side: {"faithful": int((d.labels == 0).sum()), "hallucinated": int(d.labels.sum())}
                           for side, d in (("train", train), ("val", val))},
              "balance": balance,
              "suites": {}}
    for name, data in suites.items():
        held = data.where(data.side == "test")
        entry = {"questions": data.questions, "kept": len(data.keys), "held_out": len(held.keys),
                 "faithful": int((held.labels == 0).sum()), "hallucinated": int(held.labels.sum()),
                 "dropped": data.dropped}
        if min(entry["faithful"], entry["hallucinated"]) < 2:
            entry["note"] = "fewer than 2 questions in a class: no AUROC"
            report["suites"][name] = entry
            continue
        index = balanced(held.labels, seed)
        entry["balanced"] = int(index.size)
        for method, (scorers, info) in methods.items():
            scores = [s(held)[index] for s in scorers]
            entry[method] = {**bootstrap(held.labels[index], scores, thresholds[method], rounds, seed), **info}
        report["suites"][name] = entry
    return report


def fact_side(item: dict, seed: int = 0) -> str:
    """The split side of the fact a question asks about: an organism question (pid, attribute) shares the
    side of the in-domain question about that fact, so no fact is both fitted on and evaluated."""
    from .fit import split_of

    if item.get("pid") is not None and item.get("attribute"):
        return split_of(f"in_domain-{item['pid']}-{item['attribute']}", seed)
    return split_of(str(item["id"]), seed)


def evaluate_suites(model, tokenizer, probe: Probe, suites: dict[str, list[dict]], *, training: str = "in_domain",
                    limit: int | None = None, samples: int = 10, max_new_tokens: int = 50, seed: int = 0,
                    work: str | Path | None = None, resume: bool = False, echo=lambda message: None,
                    **options) -> dict:
    """Collect every suite (the others on their held-out side; each at most `limit` questions) and evaluate
    the probe against the baselines. Sides follow the split of the probe's fit (the seed in its training
    metadata, else `seed`); `seed` drives sampling and the bootstrap.

    With `work`, each suite's sampled answers are kept there (`<suite>.answers.jsonl`; the training
    suite's in `answers.jsonl`, where `hguard identify` keeps its own), and `resume` reads back answers
    sampled for the same questions and settings: pointed at an identify run's work directory, the
    training suite is not sampled again."""
    import random

    if training not in suites:
        raise ValueError(f"the suites must include the training suite {training!r}; got {sorted(suites)}")
    split = int(probe.training.get("seed", seed))  # the probe's own train / val / test split
    collected = {}
    for name, items in suites.items():
        fabricated = all(not item.get("aliases") for item in items)
        if name != training:
            items = [item for item in items if fabricated or fact_side(item, split) == "test"]
        if limit is not None and len(items) > limit:
            items = random.Random(seed).sample(items, limit)
        side_of = (lambda item: "test") if fabricated else (lambda item: fact_side(item, split))
        cache = None if work is None else Path(work) / ("answers.jsonl" if name == training else f"{name}.answers.jsonl")
        collected[name] = collect(model, tokenizer, items, fabricated=fabricated, side_of=side_of, samples=samples,
                                  max_new_tokens=max_new_tokens, seed=seed, cache=cache, resume=resume)
        echo(f"{name}: {len(items)} questions, {len(collected[name].keys)} kept, dropped {collected[name].dropped}")
    report = evaluate(probe, model, collected[training], collected, seed=seed, **options)
    report.update(samples_per_question=samples, training_suite=training, limit=limit)
    return report
