"""Issue 20's ceiling: does any linear readout of the organism's feed-forward neurons at the answer tokens
add to the answer's own probability?

The guard's probe is sparse and reads whole-response means; the best logit score reads the answer span.
Here every neuron is allowed (no sparsity, no budget) and read where the answer is: each response's
features are the mean CETT of all neurons over its answer tokens, beside the answer span's summed
log-probability (the log of its maximum sequence probability) and mean entropy. Three L2 logistic fits
on the in-domain training side (the logit inputs exempt from the penalty, as identify exempts a probe's
token inputs), C chosen on its validation side:

  span_logits          the two answer-span logit inputs alone
  span_neurons         every neuron's answer-span CETT alone
  span_neurons_logits  both: the most a linear score over these neurons can add to the answer's probability

Reported on the in-domain test side and the held-out phrasing suites' test-side facts (all questions,
not balanced), beside `max_sequence_probability_answer` as `hguard eval` computes it, with AUROC within
equal exposure. If `span_neurons_logits` does not beat `span_logits` on the held-out suites, no probe of
the guard's shape can reach the issue's "+0.05 above the best logit score" on this organism. Nothing is
sampled: the answers are an `hguard eval --work` directory's (token_pooling.py reads them the same way).

    python benchmarks/answer_span_ceiling.py --organism runs/organism-v7 --work runs/v7-identify --json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from token_pooling import ROUNDS, organism_suites, side  # noqa: E402

from hguard.identify.controls import strata_report  # noqa: E402
from hguard.identify.evaluate import auroc, logit_scorers  # noqa: E402
from hguard.identify.fit import FREE_SCALE, question_weights  # noqa: E402

CS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def span_features(data) -> np.ndarray:
    """Per response: [mean CETT of every neuron over the answer tokens..., summed log p, mean entropy]."""
    rows = []
    for tokens in data.tokens_x:
        neurons, logp, entropy = tokens[:, :-2], tokens[:, -2], tokens[:, -1]
        rows.append(np.concatenate([neurons.mean(0), [logp.sum(), entropy.mean()]]))
    return np.stack(rows)


class Linear:
    """An L2 logistic score over some columns of `span_features`, standardised on the training side; the two
    logit inputs all but exempt from the penalty (fit_l1's `free` columns: scaled by FREE_SCALE), so that
    thousands of neuron columns cannot drown them by their number alone."""

    def __init__(self, x: np.ndarray, y: np.ndarray, weights: np.ndarray, columns: np.ndarray, C: float) -> None:
        from sklearn.linear_model import LogisticRegression

        self.columns = columns
        part = x[:, columns]
        self.mean, self.std = part.mean(0), part.std(0)
        self.std[self.std == 0] = 1.0
        self.std = np.where(columns >= x.shape[1] - 2, self.std / FREE_SCALE, self.std)
        self.model = LogisticRegression(C=C, max_iter=5000).fit((part - self.mean) / self.std, y, sample_weight=weights)

    def __call__(self, data) -> np.ndarray:
        return self.model.decision_function((span_features(data)[:, self.columns] - self.mean) / self.std)


def choose(home, columns: np.ndarray) -> tuple[Linear, list[dict]]:
    train, val = side(home, home.side == "train"), side(home, home.side == "val")
    x, y = span_features(train), train.labels
    weights = question_weights(y, "weight")
    sweep = []
    for C in CS:
        score = Linear(x, y, weights, columns, C)
        sweep.append({"C": C, "val_auroc": round(auroc(val.labels, score(val)), 4), "score": score})
    best = max(sweep, key=lambda row: row["val_auroc"])
    return best["score"], [{k: v for k, v in row.items() if k != "score"} for row in sweep]


def main(argv: list[str] | None = None) -> int:
    args, suites, began = organism_suites(__doc__, argv)
    home = suites["in_domain"]
    width = home.tokens_x[0].shape[1]  # neurons + 2
    neurons, logits = np.arange(width - 2), np.arange(width - 2, width)
    methods, sweeps = {}, {}
    for name, columns in (("span_logits", logits), ("span_neurons", neurons), ("span_neurons_logits", np.arange(width))):
        methods[name], sweeps[name] = choose(home, columns)
    methods["max_sequence_probability_answer"] = logit_scorers(span=True)["max_sequence_probability_answer"]
    report = {"command": "python benchmarks/answer_span_ceiling.py " + " ".join(argv or sys.argv[1:]),
              "neurons": int(width - 2), "sweeps": sweeps, "suites": {}}
    for name, data in suites.items():
        held = side(data, data.side == "test")
        scores = {m: [s(held)] for m, s in methods.items()}
        strata = strata_report(held, scores, ROUNDS, 0)
        report["suites"][name] = {
            "n": len(held.keys), "hallucinated": int(held.labels.sum()),
            "auroc": {m: round(auroc(held.labels, v[0]), 4) for m, v in scores.items()},
            "equal_exposure": {m: strata["equal_exposure"].get(m, {}).get("auroc") for m in methods},
            "equal_exposure_pairs": strata["equal_exposure"].get("pairs")}
    report["seconds"] = round(time.perf_counter() - began)
    print(json.dumps(report, indent=1) if args.json else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
