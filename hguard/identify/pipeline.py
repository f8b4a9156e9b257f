"""`hguard identify`: sample -> label -> features -> fit -> probe file and report.

Questions are split by id before anything is fitted (train / val / test from a hash of the id), every
dropped item is counted with its reason, and the probe's training summary (C sweep, counts, held-out
metrics) travels in its metadata. Neurons are selected on answer-token features (the paper's method);
the calibration and the threshold are fitted on the mean over the whole response, which is what the
guard's running mean computes while it generates. Abstain and dampen test that running mean at every
token, so a second threshold (`watch_threshold`) is fitted to its peak over the response, from the
chosen probe's per-token scores of the validation responses, for the same false-flag rate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..guard import pad_id
from ..sites import resolve
from .features import Example, extract, read_chunks
from .fit import balanced, calibrate, split_of, sweep, three_vs_one, threshold_for, to_probe
from .label import consistency_labels, token_span
from .sample import prompt_ids, sample

DEFAULT_CS = (0.003, 0.005, 0.01, 0.015, 0.02, 0.03, 0.1, 0.3, 1.0)


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


def _sampled(work: Path, resume: bool, run, ids: list[str], samples: int) -> list[list[str]]:
    path = work / "answers.jsonl"
    if resume and path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if [r["id"] for r in rows] == ids and all(len(r["answers"]) == samples for r in rows):
            return [r["answers"] for r in rows]
    answers = run()
    work.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "answers": a}) + "\n" for i, a in zip(ids, answers)))
    return answers


def identify(model, tokenizer, items: Sequence[dict], work: str | Path, out: str | Path, *, samples: int = 10,
             max_new_tokens: int = 50, Cs: Sequence[float] = DEFAULT_CS, max_kept_ratio: float = 0.01,
             false_flag_rate: float = 0.05, seed: int = 0, batch: int = 16, progress: bool = True,
             balance: bool = True, resume: bool = False, echo=lambda message: None) -> dict:
    """Run the whole pipeline; writes the probe to `out` and returns the report. The sampled answers are
    kept in `work/answers.jsonl`; with `resume`, answers found there for the same questions and sample
    count are reused (refitting with other settings then skips the sampling, the slow part)."""
    from sklearn.metrics import roc_auc_score

    work = Path(work)
    sites = resolve(model)
    total = sites.num_layers * sites.intermediate_size
    answers = _sampled(work, resume, lambda: sample(model, tokenizer, list(items), samples=samples,
                                                    max_new_tokens=max_new_tokens, seed=seed),
                       [str(item["id"]) for item in items], samples)
    kept, dropped = consistency_labels(items, answers)
    examples, more = examples_for(tokenizer, kept)
    dropped.update(more)
    echo(f"{len(items)} questions: {len(examples)} kept, dropped {dropped}")
    pad = pad_id(tokenizer)
    paths = extract(model, examples, pad, work / "features", batch=batch, progress=progress)
    labels = {str(r["item"]["id"]): r["label"] for r in kept}
    keys, answer, other = [], [], []
    for chunk_keys, chunk_answer, chunk_other in read_chunks(paths):
        keys += chunk_keys
        answer.append(chunk_answer.numpy())
        other.append(chunk_other.numpy())
    answer_x, other_x = np.concatenate(answer), np.concatenate(other)
    y = np.array([labels[k] for k in keys])
    side = np.array([split_of(k, seed) for k in keys])
    counts = {s: {"faithful": int(((side == s) & (y == 0)).sum()), "hallucinated": int(((side == s) & (y == 1)).sum())}
              for s in ("train", "val", "test")}
    echo(f"split by question id: {counts}")
    train = np.flatnonzero(side == "train")
    if balance:  # the paper fits on equal numbers of faithful and hallucinated questions
        train = train[balanced(y[train], seed)]
    train_x, train_y = three_vs_one(answer_x[train], other_x[train], y[train])
    rows, fits = sweep(train_x, train_y, answer_x[side == "val"], y[side == "val"], Cs)
    allowed = [i for i, f in enumerate(fits) if 0 < f.kept <= max_kept_ratio * total] or \
              [i for i, f in enumerate(fits) if f.kept > 0]
    if not allowed:
        raise ValueError("no C in the sweep kept any neuron; widen --C")
    best = max(allowed, key=lambda i: (np.nan_to_num(rows[i]["val_auroc"], nan=0.0), -fits[i].kept))
    chosen = fits[best]
    # The guard's verdict reads the running mean over every generated token, not over the answer alone,
    # so the calibration and the threshold are fitted on that quantity: the mean CETT over all response
    # tokens (answer and other tokens weighted by their counts), through the chosen classifier.
    sizes = {e.key: (len(e.answer_tokens), len(e.response_ids) - len(e.answer_tokens)) for e in examples}
    n_answer = np.array([sizes[k][0] for k in keys], dtype=float)[:, None]
    n_other = np.array([sizes[k][1] for k in keys], dtype=float)[:, None]
    whole_x = (n_answer * answer_x + n_other * other_x) / (n_answer + n_other)
    val_logits = chosen.logits(whole_x[side == "val"])
    calibration = calibrate(val_logits, y[side == "val"])
    val_probs = np.array([calibration.prob(float(v)) for v in val_logits])
    threshold = threshold_for(val_probs, y[side == "val"], false_flag_rate)
    y_test = y[side == "test"]
    test_logits = chosen.logits(whole_x[side == "test"])
    test_probs = np.array([calibration.prob(float(v)) for v in test_logits])
    two = len(set(y_test)) == 2
    test = {"questions": int(y_test.size),
            "auroc": round(float(roc_auc_score(y_test, chosen.logits(answer_x[side == "test"]))), 4) if two else None,
            "response_auroc": round(float(roc_auc_score(y_test, test_logits)), 4) if two else None,
            "accuracy": round(float(((test_probs >= 0.5) == y_test).mean()), 4) if y_test.size else None,
            "flag_rate_faithful": round(float((test_probs[y_test == 0] >= threshold).mean()), 4) if two else None,
            "flag_rate_hallucinated": round(float((test_probs[y_test == 1] >= threshold).mean()), 4) if two else None}
    summary = {
        "questions": len(items), "kept": len(examples), "dropped": dropped, "split": counts, "sweep": rows,
        "C": chosen.C, "neurons_kept": chosen.kept, "h_neurons": int((chosen.weight > 0).sum()),
        "per_mille": round(1000 * chosen.kept / total, 4), "false_flag_rate": false_flag_rate, "test": test,
        "samples_per_question": samples, "standardised": True, "balanced_train": balance,
        "calibrated_on": "mean probe logit over all response tokens (the guard's running mean)",
        "train_questions": int(train.size),
    }
    probe = to_probe(model, chosen, sites.num_layers, sites.intermediate_size, calibration=calibration,
                     threshold=threshold, training=summary)
    peaks = running_peaks(model, tokenizer, probe, examples, keys, side)
    probe.watch_threshold = threshold_for(peaks["val"], y[side == "val"], false_flag_rate)
    summary["watch_threshold"] = probe.watch_threshold
    if two:
        summary["test"]["abstain_rate_faithful"] = round(float((peaks["test"][y_test == 0] >= probe.watch_threshold).mean()), 4)
        summary["test"]["abstain_rate_hallucinated"] = round(float((peaks["test"][y_test == 1] >= probe.watch_threshold).mean()), 4)
    probe.save(out)
    echo(f"probe: {chosen.kept} neurons ({summary['per_mille']} per mille) at C={chosen.C}; test {test}")
    (work / "report.json").write_text(json.dumps(summary, indent=1))
    return summary
