"""Does refitting the L1-selected neurons without the L1 penalty (a "relaxed lasso") help the probe?

Reads the features and answers an `hguard identify` run left in its work directory, repeats the
pipeline's split and "3 vs 1" training set, and for several C compares the L1 probe with an L2 refit
on the same neurons (at most 1% of all neurons: larger selections keep their largest standardised
weights), each refit's C chosen on the validation side. AUROC on answer-token features, held-out
questions only. An experiment for issue 4, not part of the shipped pipeline.

    python benchmarks/relaxed_refit.py --work runs/identify --data hguard/organism/weights/suites/in_domain.jsonl --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="the --work directory of an hguard identify run")
    parser.add_argument("--data", required=True, help="the questions that run used (JSONL)")
    parser.add_argument("--Cs", type=float, nargs="+", default=[0.01, 0.015, 0.02, 0.03, 0.1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from hguard.identify.features import read_chunks
    from hguard.identify.fit import balanced, fit_l1, split_of, three_vs_one
    from hguard.identify.label import consistency_labels

    work = Path(args.work)
    items = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    answers = [json.loads(line)["answers"] for line in (work / "answers.jsonl").read_text().splitlines() if line.strip()]
    kept, _ = consistency_labels(items, answers)
    labels = {str(r["item"]["id"]): r["label"] for r in kept}
    keys, answer, other = [], [], []
    for chunk_keys, a, o in read_chunks(sorted((work / "features").glob("*.safetensors"))):
        keys += chunk_keys
        answer.append(a.numpy())
        other.append(o.numpy())
    answer_x, other_x = np.concatenate(answer), np.concatenate(other)
    y = np.array([labels[k] for k in keys])
    side = np.array([split_of(k, args.seed) for k in keys])
    train = np.flatnonzero(side == "train")
    train = train[balanced(y[train], args.seed)]
    x, t = three_vs_one(answer_x[train], other_x[train], y[train])
    val, test = side == "val", side == "test"
    cap = int(0.01 * answer_x.shape[1])

    def auroc(scores, mask) -> float:
        return round(float(roc_auc_score(y[mask], scores)), 4)

    def refit(selected, C):
        mean, std = x[:, selected].mean(0), x[:, selected].std(0)
        std[std == 0] = 1.0
        model = LogisticRegression(C=C, max_iter=5000).fit((x[:, selected] - mean) / std, t)
        return lambda z: ((z[:, selected] - mean) / std) @ model.coef_[0] + model.intercept_[0]

    rows = []
    for C in args.Cs:
        fitted = fit_l1(x, t, C, args.seed)
        selected = np.flatnonzero(fitted.weight)
        row = {"C": C, "kept": int(selected.size), "l1_val_auroc": auroc(fitted.logits(answer_x[val]), val),
               "l1_test_auroc": auroc(fitted.logits(answer_x[test]), test)}
        if selected.size > cap:
            selected = np.argsort(-np.abs(fitted.weight * x.std(0)))[:cap]
            row["truncated_to"] = cap
        val_auroc, C2 = max((auroc(refit(selected, C2)(answer_x[val]), val), C2)
                            for C2 in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 10.0))
        row.update(refit_C=C2, refit_val_auroc=val_auroc,
                   refit_test_auroc=auroc(refit(selected, C2)(answer_x[test]), test))
        rows.append(row)
    report = {"responses": int(y.size), "train_rows": int(x.shape[0]), "cap": cap, "rows": rows,
              "command": "python benchmarks/relaxed_refit.py --work " + args.work + " --data " + args.data + " --json"}
    print(json.dumps(report, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
