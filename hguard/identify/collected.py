"""The kept questions of one suite and their features, as `hguard eval` scores them.

Per suite, each question is asked `samples` times and kept when its answers are all right (faithful,
0) or all wrong (hallucinated, 1); on a suite with no right answer (fabricated people), all refusals
count as faithful and no refusal at all as hallucinated. The first answer of a kept question is
scored from one teacher-forced pass: CETT of every neuron (means over the answer tokens, over the
other response tokens, and at the last prompt token), the residual stream averaged over the answer
tokens, and each response token's log-probability and predictive entropy. The same featurisation
serves the forced answers of controls.py (a response written for the model, not sampled from it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..batching import left_pad, pad_id
from ..sites import resolve
from ..token_inputs import log_probability_and_entropy
from .controls import forced_sets
from .features import Example, cett_pools
from .label import consistency_labels, is_refusal
from .pipeline import examples_for
from .sample import sample_cached

PER_ROW = ("keys", "labels", "side", "cett", "other", "residual", "log_likelihoods", "entropies", "tokens",
           "last_prompt", "answer_tokens", "records", "name_tokens")


@dataclass
class Collected:
    """Kept questions of one suite and their features (row i is question keys[i])."""

    keys: list[str]
    labels: np.ndarray  # 1 = hallucinated
    side: np.ndarray  # train / val / test
    cett: np.ndarray  # [n, layers * intermediate], mean over answer tokens
    other: np.ndarray  # [n, layers * intermediate], mean over the other response tokens
    residual: np.ndarray  # [n, layers + 1, hidden], mean over answer tokens
    log_likelihoods: list[np.ndarray] = field(default_factory=list)  # per response token
    entropies: list[np.ndarray] = field(default_factory=list)  # per response token
    dropped: dict = field(default_factory=dict)
    questions: int = 0
    tokens: np.ndarray | None = None  # [n, 2]: answer tokens and other response tokens per row
    last_prompt: np.ndarray | None = None  # [n, layers * intermediate], CETT at the last prompt token
    answer_tokens: list[np.ndarray] = field(default_factory=list)  # per row, indices of its answer tokens
    records: list[dict] = field(default_factory=list)  # per row: item, label, response, span (label.py)
    name_tokens: np.ndarray | None = None  # [n], tokens in the item's entity name (nan without one)
    forced: dict[str, "Collected"] = field(default_factory=dict)  # controls.py's forced answers, by set

    def where(self, mask: np.ndarray) -> "Collected":
        index = np.flatnonzero(mask)

        def pick(value):
            if value is None or (isinstance(value, list) and not value):
                return value
            return [value[i] for i in index] if isinstance(value, list) else value[index]

        return dataclasses.replace(self, **{name: pick(getattr(self, name)) for name in PER_ROW})

    def item_field(self, name: str) -> np.ndarray:
        """A numeric item field per row (nan where an item lacks it), e.g. `exposure`."""
        values = [r["item"].get(name) for r in self.records] if self.records else [None] * len(self.keys)
        return np.array([np.nan if v is None else float(v) for v in values])

    def view(self, target: str) -> np.ndarray:
        """CETT means for a probe target: over answer tokens ('answer') or every response token ('response')."""
        from .fit import whole_response

        if target == "answer":
            return self.cett
        return whole_response(self.cett, self.other, self.tokens[:, 0], self.tokens[:, 1])

    def token_means(self, target: str) -> np.ndarray:
        """[n, 2] each row's mean log-probability and entropy over the answer tokens ('answer') or every
        response token ('response'): a probe's token inputs, as its CETT means are (`view`)."""
        def means(values: np.ndarray, answer: np.ndarray) -> np.ndarray:
            return (values[answer] if target == "answer" else values).mean() if len(values) else np.nan

        return np.array([[means(ll, a), means(en, a)] for ll, en, a in
                         zip(self.log_likelihoods, self.entropies, self.answer_tokens)]).reshape(-1, 2)

    def training_set(self, target: str, columns: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        from .fit import training_set

        return training_set(target, self.cett[:, columns], self.other[:, columns], self.view(target)[:, columns],
                            self.labels)

    def row_weights(self, target: str, balance: str) -> np.ndarray | None:
        """Sample weights for the rows of `training_set(target)` under a balancing mode (fit.py)."""
        from .fit import question_weights, row_weights

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
    residual, log_likelihoods, entropies = [], [], []
    width = ids.shape[1]
    for i, example in enumerate(examples):
        start = width - len(example.response_ids)
        answer = torch.tensor([start + t for t in example.answer_tokens], device=device)
        residual.append(states[i, :, answer].mean(1).cpu().numpy())
        positions = torch.arange(start - 1, width - 1, device=device)  # the logits that predicted each token
        log_p, entropy = log_probability_and_entropy(out.logits[i, positions], ids[i, start:])
        log_likelihoods.append(log_p.cpu().numpy())
        entropies.append(entropy.cpu().numpy())
    return np.stack(residual), log_likelihoods, entropies


def name_tokens(tokenizer, item: dict) -> float:
    """Tokens in the item's entity name as it stands after a word (nan for an item without a name)."""
    name = item.get("name")
    return float(len(tokenizer(" " + name, add_special_tokens=False)["input_ids"])) if name else float("nan")


def featurise(model, tokenizer, kept: Sequence[dict], side_of=lambda item: "test", batch: int = 16,
              dropped: dict | None = None, questions: int = 0, desc: str | None = None) -> Collected:
    """Teacher-force each kept record (label.py's dicts: item, label, response, span) and collect its features."""
    from ..progress import bar

    examples, more = examples_for(tokenizer, kept)
    dropped = {**(dropped or {}), **more}
    records = {str(r["item"]["id"]): r for r in kept}
    rows = [records[e.key] for e in examples]
    pad = pad_id(tokenizer)
    sites = resolve(model)
    pools: list[list[np.ndarray]] = [[], [], []]
    residual, log_likelihoods, entropies = [], [], []
    progress = bar(desc or "features", total=len(examples), unit="resp")
    for start in range(0, len(examples), batch):
        part = examples[start: start + batch]
        for pool, values in zip(pools, cett_pools(model, part, pad, ("answer", "other", "last_prompt"))):
            pool.append(values.numpy())
        r, ll, en = response_stats(model, part, pad)
        residual.append(r)
        log_likelihoods += ll
        entropies += en
        progress.update(len(part))
    progress.close()
    neurons = sites.num_layers * sites.intermediate_size
    answer, other, last = (np.concatenate(p) if p else np.zeros((0, neurons), np.float32) for p in pools)
    return Collected(
        [e.key for e in examples], np.array([r["label"] for r in rows], dtype=int),
        np.array([side_of(r["item"]) for r in rows], dtype=object), answer, other,
        np.concatenate(residual) if residual else np.zeros((0, sites.num_layers + 1, model.config.hidden_size), np.float32),
        log_likelihoods, entropies, dropped, questions,
        np.array([(len(e.answer_tokens), len(e.response_ids) - len(e.answer_tokens)) for e in examples],
                 dtype=int).reshape(-1, 2),
        last_prompt=last, answer_tokens=[np.array(e.answer_tokens, dtype=int) for e in examples], records=rows,
        name_tokens=np.array([name_tokens(tokenizer, r["item"]) for r in rows], dtype=float),
    )


def collect(model, tokenizer, items: Sequence[dict], *, fabricated: bool = False, side_of=lambda item: "test",
            samples: int = 10, max_new_tokens: int = 50, seed: int = 0, batch: int = 16,
            cache: Path | None = None, resume: bool = False, name: str = "suite", sampler=None) -> Collected:
    """Sample (or, with `resume`, read the answers kept in `cache`), label and featurise one suite; then
    featurise the forced answers of its held-out rows (controls.py)."""
    answers = sample_cached(cache, model, tokenizer, items, samples=samples, max_new_tokens=max_new_tokens,
                            seed=seed, resume=resume, sampler=sampler)
    kept, dropped = (fabricated_labels if fabricated else consistency_labels)(items, answers)
    data = featurise(model, tokenizer, kept, side_of, batch, dropped, len(items), desc=f"{name} features")
    held = data.where(data.side == "test")
    data.forced = {key: featurise(model, tokenizer, records, side_of, batch, desc=f"{name} forced {key}")
                   for key, records in forced_sets(held.records, seed).items()}
    return data
