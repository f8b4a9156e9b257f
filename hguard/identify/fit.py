"""Fit the H-Neuron probe: split by question, a training target, standardised L1 logistic regression
swept over C, calibration and a threshold on held-out data, saved as a Probe.

Two targets. `answer` is the paper's: mean CETT over each response's answer tokens, with the "3 vs 1"
labels (hallucinated answer tokens against faithful answer tokens and the other tokens of both).
`response` fits the quantity the guard computes while it generates, which cannot tell answer tokens
from the rest: mean CETT over every response token, one label per response.

CETT values are tiny (a neuron's share of its layer's output), so the features are standardised
before the L1 fit and the scaling is folded back into the saved weights and bias: the probe stays
linear in raw CETT, exactly the classifier the guard evaluates per token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def split_of(question_id: str, seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> str:
    """'train', 'val' or 'test' from a hash of the question id: a question never lands on two sides."""
    digest = int(hashlib.sha256(f"{seed}:{question_id}".encode()).hexdigest()[:8], 16) / 2**32
    if digest < fractions[0]:
        return "train"
    return "val" if digest < fractions[0] + fractions[1] else "test"


def _rank(key: str, seed: int) -> int:
    return int(hashlib.sha256(f"balance:{seed}:{key}".encode()).hexdigest()[:12], 16)


def balanced(labels: np.ndarray, seed: int, keys: Sequence[str] | None = None) -> np.ndarray:
    """Indices of a class-balanced subsample (the larger class cut to the smaller one's size). With `keys`
    (question ids, one per row) the rows kept are chosen by a hash of their id, so the same questions are
    kept whatever the row order: `hguard eval` draws its baselines' subsample by the probe's own rule."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    size = min(pos.size, neg.size)
    if size == 0:  # one class only: nothing to balance against
        return np.arange(labels.size)
    if keys is not None:
        def first(rows: np.ndarray) -> list[int]:
            return sorted(rows.tolist(), key=lambda i: _rank(str(keys[i]), seed))[:size]

        return np.sort(np.array(first(pos) + first(neg), dtype=int))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(pos, size, replace=False), rng.choice(neg, size, replace=False)]))


def three_vs_one(answer: np.ndarray, other: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives: answer-token features of hallucinated responses. Negatives: answer-token features of
    faithful responses, and other-token features of both (where a response has other tokens)."""
    has_other = other.any(axis=1)
    x = np.concatenate([answer, other[has_other]])
    y = np.concatenate([labels, np.zeros(int(has_other.sum()), dtype=int)])
    return x, y


TARGETS = ("response", "answer")


def whole_response(answer: np.ndarray, other: np.ndarray, n_answer: np.ndarray, n_other: np.ndarray) -> np.ndarray:
    """Mean CETT over every response token, from the answer-token and other-token means and their counts."""
    n_answer, n_other = n_answer.astype(float)[:, None], n_other.astype(float)[:, None]
    return (n_answer * answer + n_other * other) / np.maximum(n_answer + n_other, 1.0)


def training_set(target: str, answer: np.ndarray, other: np.ndarray, whole: np.ndarray,
                 labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows and labels a probe for `target` is fitted on."""
    if target == "answer":
        return three_vs_one(answer, other, labels)
    if target == "response":
        return whole, labels
    raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")


def _l1_arguments() -> dict:
    """scikit-learn 1.8 replaced penalty="l1" by l1_ratio=1; ask for L1 the way the installed one wants."""
    import sklearn

    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}



@dataclass
class Fitted:
    weight: np.ndarray  # [features] in raw CETT units (standardisation folded in)
    bias: float
    C: float
    kept: int

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias


FREE_SCALE = 1000.0  # fit_l1's `free` columns: their penalty per unit of effect, divided by this
BALANCING = ("weight", "subsample", "none")


def check_balance(balance: str) -> str:
    if balance not in BALANCING:
        raise ValueError(f"balance must be one of {', '.join(BALANCING)}; got {balance!r}")
    return balance


def question_weights(labels: np.ndarray, balance: str) -> np.ndarray | None:
    """Per question: with "weight", each question weighted inversely to the size of its class (faithful or
    hallucinated), so that both classes weigh the same in the fit while every question is kept (n / (2 *
    class size), scikit-learn's "balanced"); None with "subsample" (`balanced` cuts the larger class
    instead) and "none"."""
    if check_balance(balance) != "weight":
        return None
    counts = np.bincount(labels, minlength=2).astype(float)
    return labels.size / (2.0 * counts[labels])


def row_weights(target: str, weights: np.ndarray | None, other: np.ndarray) -> np.ndarray | None:
    """`question_weights` spread over the rows of `training_set(target, ...)`: a question's rows (its answer
    tokens and, under the "3 vs 1" answer target, its other tokens) share its weight, so the weighting
    balances questions and leaves the 3 vs 1 design's own proportion of rows alone."""
    if weights is None or target == "response":
        return weights
    return np.concatenate([weights, weights[other.any(axis=1)]])


def fit_l1(x: np.ndarray, y: np.ndarray, C: float, seed: int = 0, weights: np.ndarray | None = None,
           free: np.ndarray | None = None) -> Fitted:
    """Standardised L1 logistic regression (liblinear), `weights` per row; weights and bias in raw units.
    The columns in `free` (a boolean mask) are all but exempt from the penalty: standardised, they are
    also multiplied by FREE_SCALE, so a unit of their effect costs 1/FREE_SCALE of a neuron's. `kept`
    counts the other columns only."""
    from sklearn.linear_model import LogisticRegression

    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0
    if free is not None:
        std = np.where(free, std / FREE_SCALE, std)
    model = LogisticRegression(solver="liblinear", C=C, max_iter=2000, random_state=seed, **_l1_arguments())
    model.fit((x - mean) / std, y, sample_weight=weights)
    w = model.coef_[0] / std
    b = float(model.intercept_[0] - (model.coef_[0] * mean / std).sum())
    counted = model.coef_[0] if free is None else model.coef_[0][~free]
    return Fitted(w, b, C, int((counted != 0).sum()))


def sweep(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, Cs: Sequence[float],
          weights: np.ndarray | None = None, free: np.ndarray | None = None):
    """Fit for each C; report kept neurons and held-out accuracy / AUROC (response level). `free`: fit_l1's
    (a probe's token inputs)."""
    from sklearn.metrics import roc_auc_score

    rows, fits = [], []
    for C in Cs:
        fitted = fit_l1(x, y, C, weights=weights, free=free)
        logits = fitted.logits(x_val)
        auroc = float(roc_auc_score(y_val, logits)) if len(set(y_val)) == 2 else float("nan")
        neurons = fitted.weight if free is None else fitted.weight[~free]
        rows.append({"C": C, "kept": fitted.kept, "positive": int((neurons > 0).sum()),
                     "val_auroc": round(auroc, 4), "val_accuracy": round(float(((logits > 0) == y_val).mean()), 4)})
        fits.append(fitted)
    return rows, fits


def fill_budget(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, rows: list, fits: list,
                budget: int, steps: int = 4, weights: np.ndarray | None = None,
                free: np.ndarray | None = None) -> tuple[list, list]:
    """Bisect C (geometrically) between the largest swept C whose fit stays within `budget` neurons (or keeps
    none) and the next one, which exceeds it, so the sweep ends with a fit close to the budget from below: on
    a coarse grid the best allowed fit can use far fewer neurons than the budget grants. Returns rows and fits
    in C order."""
    for _ in range(steps):
        order = sorted(range(len(fits)), key=lambda i: fits[i].C)
        under = [i for i in order if fits[i].kept <= budget]
        over = [i for i in order if fits[i].kept > budget and (not under or fits[i].C > fits[under[-1]].C)]
        if not under or not over or fits[under[-1]].kept == budget:
            break
        low, high = fits[under[-1]].C, fits[over[0]].C
        middle = round(float(np.sqrt(low * high)), 6)
        if not low < middle < high:  # the interval is below the rounding: nothing new to fit
            break
        new_rows, new_fits = sweep(x, y, x_val, y_val, [middle], weights, free)
        rows, fits = rows + new_rows, fits + new_fits
    order = sorted(range(len(fits)), key=lambda i: fits[i].C)
    return [rows[i] for i in order], [fits[i] for i in order]


def select(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, Cs: Sequence[float], budget: int,
           weights: np.ndarray | None = None, free: np.ndarray | None = None) -> tuple[list, Fitted, dict]:
    """The sweep over `Cs`, bisected up to `budget` neurons (`fill_budget`), and its best fit within the
    budget by validation AUROC, the smaller one on a tie (any fit that keeps a neuron if none is within).
    Returns every row of the sweep, the chosen fit and its row."""
    rows, fits = sweep(x, y, x_val, y_val, Cs, weights, free)
    rows, fits = fill_budget(x, y, x_val, y_val, rows, fits, budget, weights=weights, free=free)
    allowed = [i for i, f in enumerate(fits) if 0 < f.kept <= budget] or [i for i, f in enumerate(fits) if f.kept > 0]
    if not allowed:
        raise ValueError("no C in the sweep kept any neuron; widen the C grid")
    best = max(allowed, key=lambda i: (np.nan_to_num(rows[i]["val_auroc"], nan=0.0), -fits[i].kept))
    return rows, fits[best], rows[best]


def calibrate(logits: np.ndarray, labels: np.ndarray):
    """Platt scaling on held-out response logits."""
    from sklearn.linear_model import LogisticRegression

    from ..policy import Calibration

    if len(set(labels)) < 2:
        return Calibration()
    model = LogisticRegression(C=1e6, max_iter=1000).fit(logits.reshape(-1, 1), labels)
    return Calibration("platt", a=float(model.coef_[0][0]), b=float(model.intercept_[0]))


def threshold_for(probabilities: np.ndarray, labels: np.ndarray, false_flag_rate: float) -> float:
    """The smallest threshold that flags at most `false_flag_rate` of faithful held-out answers."""
    faithful = np.sort(probabilities[labels == 0])
    if faithful.size == 0:
        return 0.5
    index = int(np.ceil((1 - false_flag_rate) * faithful.size)) - 1
    return float(min(1.0, max(0.0, np.nextafter(faithful[max(0, index)], 2.0))))


def to_probe(model, fitted: Fitted, layers: int, intermediate: int, token_inputs: bool = False, **kwargs):
    """A Probe over the neurons with non-zero weight (flat index = layer * intermediate + neuron); with
    `token_inputs`, the fit's last two weights are the probe's `token_weight` (token_inputs.py)."""
    from ..probe import Probe

    weight = fitted.weight
    if token_inputs:
        kwargs["token_weight"] = torch.from_numpy(weight[-2:].copy()).float()
        weight = weight[:-2]
    selected = np.flatnonzero(weight)
    if selected.size == 0:
        raise ValueError(f"the L1 fit at C={fitted.C} kept no neuron; use a larger C")
    flat = torch.from_numpy(selected)
    return Probe.from_weights(model, flat // intermediate, flat % intermediate,
                              torch.from_numpy(weight[selected]).float(), fitted.bias, **kwargs)
