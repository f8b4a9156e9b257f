"""`hguard identify`: sample -> label -> features -> fit -> probe file and report.

Questions are split by id before anything is fitted (train / val / test from a hash of the id), every
dropped item is counted with its reason, and the probe's training summary (C sweep, counts, held-out
metrics) travels in its metadata. Neurons are selected on the target's features (fit.py: the whole
response by default, or the paper's answer tokens with "3 vs 1" labels); the calibration and the
threshold are fitted on the mean over the whole response, which is what the guard's running mean
computes while it generates. Abstain and dampen test that running mean at every
token, so a second threshold (`watch_threshold`) is fitted to its peak over the response, from the
chosen probe's per-token scores of the validation responses, for the same false-flag rate.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..batching import pad_id
from ..sites import resolve
from .features import Example, extract, read_chunks
from .fit import (TARGETS, balanced, calibrate, check_balance, question_weights, row_weights, select, split_of,
                  threshold_for, to_probe, training_set, whole_response)
from .label import consistency_labels, token_span
from .sample import prompt_ids, sample_cached

DEFAULT_CS = (0.003, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.1, 0.3, 1.0)

TOKEN_MODES = ("auto", "on", "off")  # identify's token_inputs: both fitted and the better kept, or one


def examples_for(tokenizer, kept: list[dict]) -> tuple[list[Example], dict[str, int]]:
    examples, dropped = [], {}
    for record in kept:
        encoded = tokenizer(record["response"], add_special_tokens=False, return_offsets_mapping=True)
        answer = token_span(encoded["offset_mapping"], record["span"])
        if not answer:
            dropped["span_not_tokenised"] = dropped.get("span_not_tokenised", 0) + 1
            continue
        examples.append(Example(str(record["item"]["id"]), prompt_ids(tokenizer, record["item"]),
                                encoded["input_ids"], answer))
    return examples, dropped


def running_peaks(model, tokenizer, probe, examples: Sequence[Example], keys: list[str], side: np.ndarray) -> dict:
    """Per split ('val', 'test'), in `keys` order: each response's peak calibrated running mean under
    `probe` (see policy.running_peak), from one teacher-forced scoring pass per response."""
    from ..guard import Guard
    from ..policy import running_peak

    guard = Guard(model, tokenizer, probe)
    by_key = {e.key: e for e in examples}
    peaks = {}
    for name in ("val", "test"):
        chosen = [by_key[k] for k, s in zip(keys, side) if s == name]
        peaks[name] = np.array([running_peak(guard.score(e.prompt_ids, e.response_ids).token_logits, probe.calibration)
                                for e in chosen])
    return peaks


@dataclass
class Featurised:
    """Every kept question's mean CETT features, label and split side, in one order (`keys`)."""

    keys: list[str]
    answer: np.ndarray  # [questions, neurons] mean over the answer tokens
    other: np.ndarray  # ... over the other response tokens
    whole: np.ndarray  # ... over every response token (what the guard's running mean reads)
    y: np.ndarray  # 1: hallucinated
    side: np.ndarray  # "train" / "val" / "test", from a hash of the question id
    token_inputs: bool = False  # the last two columns are the token inputs' means (features.cett_pools)

    def without_tokens(self) -> "Featurised":
        """The same rows without the token inputs' two columns."""
        if not self.token_inputs:
            return self
        return dataclasses.replace(self, answer=self.answer[:, :-2], other=self.other[:, :-2],
                                   whole=self.whole[:, :-2], token_inputs=False)

    @property
    def free(self) -> np.ndarray | None:
        """fit_l1's unpenalised columns: the token inputs, if any."""
        if not self.token_inputs:
            return None
        free = np.zeros(self.answer.shape[1], dtype=bool)
        free[-2:] = True
        return free

    def view(self, target: str) -> np.ndarray:
        return self.answer if target == "answer" else self.whole

    def counts(self) -> dict:
        return {s: {"faithful": int(((self.side == s) & (self.y == 0)).sum()),
                    "hallucinated": int(((self.side == s) & (self.y == 1)).sum())} for s in ("train", "val", "test")}


def featurise(model, tokenizer, examples: Sequence[Example], labels: dict[str, int], work: Path, *, batch: int,
              progress: bool, seed: int, token_inputs: bool = False) -> Featurised:
    """Extract the features of `examples` into `work/features` and gather them."""
    paths = extract(model, examples, pad_id(tokenizer), work / "features", batch=batch, progress=progress,
                    tokens=token_inputs)
    keys, answer, other = [], [], []
    for chunk_keys, chunk_answer, chunk_other in read_chunks(paths):
        keys += chunk_keys
        answer.append(chunk_answer.numpy())
        other.append(chunk_other.numpy())
    answer_x, other_x = np.concatenate(answer), np.concatenate(other)
    # The guard's verdict reads the running mean over every generated token, not over the answer alone,
    # so the calibration and the threshold are fitted on that quantity: the mean CETT over all response
    # tokens (answer and other tokens weighted by their counts), through the chosen classifier.
    sizes = {e.key: (len(e.answer_tokens), len(e.response_ids) - len(e.answer_tokens)) for e in examples}
    whole_x = whole_response(answer_x, other_x, np.array([sizes[k][0] for k in keys]),
                             np.array([sizes[k][1] for k in keys]))
    return Featurised(keys, answer_x, other_x, whole_x, np.array([labels[k] for k in keys]),
                      np.array([split_of(k, seed) for k in keys]), token_inputs)


class Sweep:
    """C sweeps on the train side, chosen by validation AUROC within the neuron budget, scored on test."""

    def __init__(self, data: Featurised, train: np.ndarray, Cs: Sequence[float], budget: int, balance: str) -> None:
        self.data, self.train, self.Cs, self.budget, self.balance = data, train, Cs, budget, balance
        self.val, self.test = data.side == "val", data.side == "test"
        self.y_test = data.y[self.test]
        self.two = len(set(self.y_test)) == 2

    def choose(self, goal: str):
        """The C sweep for one target and its best fit within the neuron budget (validation AUROC)."""
        d, train = self.data, self.train
        train_x, train_y = training_set(goal, d.answer[train], d.other[train], d.whole[train], d.y[train])
        weights = row_weights(goal, question_weights(d.y[train], self.balance), d.other[train])
        rows, fitted, row = select(train_x, train_y, d.view(goal)[self.val], d.y[self.val], self.Cs, self.budget, weights,
                                   d.free)
        return rows, fitted, row["val_auroc"]

    def test_auroc(self, fitted, view: np.ndarray) -> float | None:
        from sklearn.metrics import roc_auc_score

        return round(float(roc_auc_score(self.y_test, fitted.logits(view[self.test]))), 4) if self.two else None

    def test_report(self, chosen, calibration, threshold: float, target: str) -> dict:
        """The chosen probe on the test side: AUROC on each view, accuracy and flag rates."""
        d, y_test = self.data, self.y_test
        probs = np.array([calibration.prob(float(v)) for v in chosen.logits(d.whole[self.test])])
        return {"questions": int(y_test.size), "target": target, "auroc": self.test_auroc(chosen, d.view(target)),
                "answer_auroc": self.test_auroc(chosen, d.answer), "response_auroc": self.test_auroc(chosen, d.whole),
                "accuracy": round(float(((probs >= 0.5) == y_test).mean()), 4) if y_test.size else None,
                "flag_rate_faithful": self.rate(probs, 0, threshold),
                "flag_rate_hallucinated": self.rate(probs, 1, threshold)}

    def alternatives(self, target: str) -> dict:
        """The other targets' best probes under the same budget, for the report."""
        out = {}
        for goal in (g for g in TARGETS if g != target):
            _, fitted, val_auroc = self.choose(goal)
            out[goal] = {"C": fitted.C, "neurons_kept": fitted.kept, "val_auroc": val_auroc,
                         "test_auroc": self.test_auroc(fitted, self.data.view(goal)),
                         "test_response_auroc": self.test_auroc(fitted, self.data.whole)}
        return out

    def rate(self, values: np.ndarray, label: int, threshold: float) -> float | None:
        """Share of the test side's `label` class whose `values` reach `threshold`."""
        return round(float((values[self.y_test == label] >= threshold).mean()), 4) if self.two else None


def _check_sides(counts: dict) -> None:
    for name in ("train", "val"):
        if min(counts[name].values()) == 0:
            raise ValueError(f"the {name} side needs faithful and hallucinated questions; got {counts[name]} "
                             "(more questions, or questions the model answers both right and wrong)")


def _set_watch_threshold(probe, peaks: dict, data, sweep, false_flag_rate: float, summary: dict) -> None:
    """The running mean's threshold (abstain, dampen) from the validation side's peaks, and its test rates.
    The peak is at least the final mean, so it is at least the flag threshold (the max only absorbs
    rounding between the features' means and the guard's per-token scores)."""
    probe.watch_threshold = max(probe.threshold, threshold_for(peaks["val"], data.y[sweep.val], false_flag_rate))
    summary["watch_threshold"] = probe.watch_threshold
    if sweep.two:
        summary["test"]["abstain_rate_faithful"] = sweep.rate(peaks["test"], 0, probe.watch_threshold)
        summary["test"]["abstain_rate_hallucinated"] = sweep.rate(peaks["test"], 1, probe.watch_threshold)


def _token_mode(token_inputs: bool | str) -> str:
    mode = {True: "on", False: "off"}.get(token_inputs, token_inputs)
    if mode not in TOKEN_MODES:
        raise ValueError(f"token_inputs must be True, False or 'auto'; got {token_inputs!r}")
    return mode


def _weights(chosen, token_inputs: bool, compared: dict) -> dict:
    """The report's account of the fit's weights: H-Neurons, and the token inputs' weights if it has them."""
    out = {"h_neurons": int((chosen.weight[:-2 if token_inputs else None] > 0).sum()), "token_inputs": token_inputs,
           "token_inputs_compared": compared}
    if token_inputs:
        out["token_weight"] = {"log_probability": round(float(chosen.weight[-2]), 6),
                               "entropy": round(float(chosen.weight[-1]), 6)}
    return out


def _fit(data: Featurised, train: np.ndarray, Cs: Sequence[float], budget: int, balance: str, target: str,
         mode: str) -> tuple[Featurised, "Sweep", list, object, dict]:
    """The C sweep and chosen fit with token inputs, without, or ("auto") both, keeping the better one on
    validation: (the data it reads, its sweep, the sweep's rows, the fit, each variant's validation AUROC)."""
    variants = {"on": data, "off": data.without_tokens()}
    fits = {}
    for name in (("on", "off") if mode == "auto" else (mode,)):
        sweep = Sweep(variants[name], train, Cs, budget, balance)
        fits[name] = (sweep, *sweep.choose(target))
    best = max(fits, key=lambda name: (fits[name][3], name == "off"))  # a tie keeps the neurons alone
    sweep, rows, chosen, _ = fits[best]
    return variants[best], sweep, rows, chosen, {name: fit[3] for name, fit in fits.items()}


def identify(model, tokenizer, items: Sequence[dict], work: str | Path, out: str | Path, *, samples: int = 10,
             max_new_tokens: int = 50, Cs: Sequence[float] = DEFAULT_CS, max_kept_ratio: float = 0.01,
             false_flag_rate: float = 0.05, seed: int = 0, batch: int = 16, progress: bool = True,
             balance: str = "weight", resume: bool = False, target: str = "response", compare_targets: bool = True,
             token_inputs: bool | str = "auto", sampler=None, echo=lambda message: None) -> dict:
    """Run the whole pipeline; writes the probe to `out` and returns the report. The sampled answers are
    kept in `work/answers.jsonl`; with `resume`, answers found there for the same questions and sampling
    settings are reused (refitting with other settings then skips the sampling, the slow part). `target`:
    what the probe is fitted on (see fit.py); with `compare_targets` the report also gives the other
    target's best probe under the same neuron budget. `balance`: how the classes are balanced in the fit
    (the paper fits on equal numbers of each): "weight" keeps every training question and weights each
    class inversely to its size, "subsample" cuts the larger class, "none" fits as sampled.
    `token_inputs`: whether the probe also reads each token's log-probability and entropy (token_inputs.py),
    two inputs outside the L1 penalty and the neuron budget: True, False, or "auto" (the default: both
    are fitted, and the one with the better validation AUROC is kept). `sampler`: what draws the answers
    in place of `generate` (sample_vllm.VllmSampler)."""
    mode = _token_mode(token_inputs)
    check_balance(balance)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
    work = Path(work)
    sites = resolve(model)
    total = sites.num_layers * sites.intermediate_size
    answers = sample_cached(work / "answers.jsonl", model, tokenizer, items, samples=samples,
                            max_new_tokens=max_new_tokens, seed=seed, resume=resume, sampler=sampler)
    kept, dropped = consistency_labels(items, answers)
    examples, more = examples_for(tokenizer, kept)
    dropped.update(more)
    echo(f"{len(items)} questions: {len(examples)} kept, dropped {dropped}")
    data = featurise(model, tokenizer, examples, {str(r["item"]["id"]): r["label"] for r in kept}, work,
                     batch=batch, progress=progress, seed=seed, token_inputs=mode != "off")
    counts = data.counts()
    echo(f"split by question id: {counts}")
    _check_sides(counts)
    train = np.flatnonzero(data.side == "train")
    if balance == "subsample":
        train = train[balanced(data.y[train], seed, [data.keys[i] for i in train])]
    data, sweep, rows, chosen, compared = _fit(data, train, Cs, int(max_kept_ratio * total), balance, target, mode)
    val_logits = chosen.logits(data.whole[sweep.val])
    calibration = calibrate(val_logits, data.y[sweep.val])
    threshold = threshold_for(np.array([calibration.prob(float(v)) for v in val_logits]), data.y[sweep.val],
                              false_flag_rate)
    test = sweep.test_report(chosen, calibration, threshold, target)
    alternatives = sweep.alternatives(target) if compare_targets else {}
    summary = {
        "questions": len(items), "kept": len(examples), "dropped": dropped, "split": counts, "sweep": rows,
        "C": chosen.C, "neurons_kept": chosen.kept, **_weights(chosen, data.token_inputs, compared),
        "per_mille": round(1000 * chosen.kept / total, 4), "false_flag_rate": false_flag_rate, "test": test,
        "target": target, "other_targets": alternatives,
        "samples_per_question": samples, "standardised": True, "balance": balance, "seed": seed,
        "calibrated_on": "mean probe logit over all response tokens (the guard's running mean)",
        "train_questions": int(train.size),
    }
    probe = to_probe(model, chosen, sites.num_layers, sites.intermediate_size, data.token_inputs,
                     calibration=calibration, threshold=threshold, training=summary)
    _set_watch_threshold(probe, running_peaks(model, tokenizer, probe, examples, data.keys, data.side), data, sweep,
                         false_flag_rate, summary)
    probe.save(out)
    echo(f"probe: {chosen.kept} neurons ({summary['per_mille']} per mille) at C={chosen.C}; test {test}")
    (work / "report.json").write_text(json.dumps(summary, indent=1))
    return summary
