"""Controls for `hguard eval`: what a detection figure must be read beside (DESIGN.md, "Honesty of the
science"). Every score is "higher = more likely hallucinated", as in evaluate.py.

Trivial baselines, no model internals except the prompt:
  name_tokens   tokens in the person's name (rare names are split into more tokens)
  exposure      minus the person's training exposure (organism suites carry it per item)
  prompt_only   the probe's logit at the last prompt token, before any answer exists (evaluate.py)
Familiarity strata: AUROC over the label-discordant pairs (one hallucinated, one faithful question)
that share a stratum: an exposure count (else a name-token count on suites without exposure), a tier,
a tier and attribute; and the AUROC within each tier alone. Ties count half; intervals resample the
questions of each class (1,000 rounds, 95% percentiles).
Forced answers, teacher-forced in the model's own answer form (its first sampled response, with the
value swapped): `known` = for faithful questions (the model is always right), the true answer against
a plausible wrong value of the same attribute, paired by question; `unknown` = for hallucinated
questions whose wrong value was found, the model's own wrong answer against the true value forced in
its place; `crossed` = every forced wrong answer about a known person against every forced true
answer about an unknown one (does the score follow truth or familiarity?). Each reports the share of
pairs in which a score ranks the wrong answer above the true one (1.0 = always right, 0.5 = chance).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .collected import Collected

Scorer = Callable[["Collected"], np.ndarray]
STRATA = {"equal_exposure": ("exposure",), "within_tier": ("tier",), "within_tier_attribute": ("tier", "attribute")}
TIERS = ("head", "mid", "tail", "unseen")
FORCED = ("known_wrong", "unknown_true")


# ---- trivial baselines ----------------------------------------------------------------------------
def trivial_scorers() -> dict[str, Scorer]:
    """The baselines that read no activations (the prompt-only probe score is evaluate.py's)."""
    def name_tokens(data: "Collected") -> np.ndarray:
        return np.full(len(data.keys), np.nan) if data.name_tokens is None else data.name_tokens

    return {"name_tokens": name_tokens, "exposure": lambda data: -data.item_field("exposure")}


# ---- pairwise AUROC with a stratified bootstrap ---------------------------------------------------
def _compare(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return (pos > neg) + 0.5 * (pos == neg)


def pair_auroc(pos_scores: Sequence[np.ndarray], neg_scores: Sequence[np.ndarray], i: np.ndarray, j: np.ndarray,
               rounds: int, seed: int, paired: bool = False) -> dict:
    """Share of pairs (pos_scores[i[k]], neg_scores[j[k]]) ranked the right way (ties half), a mean over
    the scorers (one array per scorer on each side), with a 95% bootstrap interval: `paired` resamples
    the pairs, otherwise each side's rows (the pairs keep the product of their rows' counts)."""
    if len(i) == 0:
        return {"auroc": None, "pairs": 0}
    c = np.mean([_compare(p[i], n[j]) for p, n in zip(pos_scores, neg_scores)], axis=0)  # [pairs]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(rounds):
        if paired:
            w = np.bincount(rng.integers(0, len(c), len(c)), minlength=len(c)).astype(float)
        else:
            size_p, size_n = len(pos_scores[0]), len(neg_scores[0])
            wp = np.bincount(rng.integers(0, size_p, size_p), minlength=size_p)
            wn = np.bincount(rng.integers(0, size_n, size_n), minlength=size_n)
            w = (wp[i] * wn[j]).astype(float)
        if w.sum() > 0:
            draws.append(float((w * c).sum() / w.sum()))
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
    return {"auroc": round(float(c.mean()), 4), "auroc_ci": [round(float(low), 4), round(float(high), 4)],
            "pairs": int(len(c))}


def discordant_pairs(labels: np.ndarray, strata: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(i, j): indices into the hallucinated rows and into the faithful rows of every pair that shares a
    stratum (rows whose stratum is None are in none)."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    strata = np.array([None if s is None else str(s) for s in strata], dtype=object)
    same = (strata[pos][:, None] == strata[neg][None, :]) & (strata[pos] != None)[:, None]  # noqa: E711
    return np.nonzero(same)


def strata_report(data: Collected, scores: dict[str, list[np.ndarray]], rounds: int, seed: int) -> dict:
    """AUROC of every method within each kind of stratum (see the module docstring), on `data`'s rows."""
    items = [r["item"] for r in data.records] if data.records else [{}] * len(data.keys)
    pos, neg = data.labels == 1, data.labels == 0

    def auroc_within(strata: Sequence) -> dict:
        i, j = discordant_pairs(data.labels, strata)
        out = {"pairs": int(len(i)), "strata": len({str(s) for s in np.asarray(strata, dtype=object)[np.r_[
            np.flatnonzero(pos)[i], np.flatnonzero(neg)[j]]]})}
        for method, values in scores.items():
            out[method] = pair_auroc([v[pos] for v in values], [v[neg] for v in values], i, j, rounds, seed)
            out[method].pop("pairs", None)
        return out

    report = {}
    for name, fields in STRATA.items():
        if all(all(f in item and item[f] is not None for f in fields) for item in items):
            report[name] = {"by": list(fields), **auroc_within([tuple(item[f] for f in fields) for item in items])}
        elif name == "equal_exposure" and data.name_tokens is not None and not np.isnan(data.name_tokens).any():
            report[name] = {"by": ["name_tokens"], "note": "no exposure in this suite: strata by name-token count",
                            **auroc_within(data.name_tokens)}
        else:
            report[name] = {"by": list(fields), "note": f"items without {' and '.join(fields)}: skipped"}
    tiers = [str(item.get("tier")) for item in items]
    report["tiers"] = {}
    for tier in sorted(set(tiers) - {"None"}, key=lambda t: (TIERS + (t,)).index(t)):
        mask = np.array([t == tier for t in tiers])
        entry = {"faithful": int((mask & neg).sum()), "hallucinated": int((mask & pos).sum())}
        if min(entry.values()) > 0:
            entry.update(auroc_within([tier if m else None for m in mask]))
            entry.pop("strata", None)
        report["tiers"][tier] = entry
    return report


# ---- forced answers -------------------------------------------------------------------------------
def _pick(options: Sequence[str], key: str, seed: int) -> str:
    """A deterministic choice by a hash of the question id (no draw depends on row order)."""
    return sorted(options, key=lambda o: hashlib.sha256(f"forced:{seed}:{key}:{o}".encode()).hexdigest())[0]


def swap(record: dict, value: str) -> dict:
    """`record` with the value at its answer span replaced by `value` (the span follows)."""
    start, end = record["span"]
    response = record["response"][:start] + value + record["response"][end:]
    return {**record, "response": response, "span": (start, start + len(value)), "span_source": "forced"}


def forced_sets(records: Sequence[dict], seed: int = 0) -> dict[str, list[dict]]:
    """The forced answers of a suite's held-out records: `known_wrong` (faithful records, their true value
    swapped for another value of the attribute, labelled 1) and `unknown_true` (hallucinated records
    whose wrong value was located, the true value swapped in, labelled 0). Records without a true answer
    (fabricated people) or without a located value give none."""
    known, unknown = [], []
    for record in records:
        item = record["item"]
        truth = item.get("answer")
        if not truth or not item.get("aliases"):
            continue
        aliases = {a.lower() for a in item["aliases"]}
        if record["label"] == 0 and record.get("span_source") == "alias":
            wrong = [c for c in item.get("candidates", []) if c and c.lower() not in aliases]
            if wrong:
                known.append({**swap(record, _pick(wrong, str(item["id"]), seed)), "label": 1})
        elif record["label"] == 1 and record.get("span_source") == "candidate":
            unknown.append({**swap(record, truth), "label": 0})
    return {"known_wrong": known, "unknown_true": unknown}


def forced_report(data: Collected, methods: dict[str, list[Scorer]], rounds: int, seed: int) -> dict:
    """The three forced-answer comparisons of the module docstring for every method, on `data`'s rows
    (the held-out side) and its forced sets."""
    own = {k: i for i, k in enumerate(data.keys)}
    sets = {name: data.forced[name] for name in FORCED if name in data.forced and data.forced[name].keys}
    if not sets:
        return {"note": "no forced answers (no true value, or none located in the responses)"}
    scores = {name: {m: [s(d) for s in scorers] for m, scorers in methods.items()}
              for name, d in (("own", data), *sets.items())}
    report = {}
    for name, forced, truth_is_own in (("known", "known_wrong", True), ("unknown", "unknown_true", False)):
        d = sets.get(forced)
        keys = [k for k in (d.keys if d is not None else []) if k in own]
        entry = {"pairs": len(keys)}
        if keys:
            f = np.array([d.keys.index(k) for k in keys])
            o = np.array([own[k] for k in keys])
            tiers: dict[str, int] = {}
            for k in f:
                tier = str(d.records[k]["item"].get("tier"))
                tiers[tier] = tiers.get(tier, 0) + 1
            entry["tiers"] = tiers
            for method in methods:
                wrong, true = ((scores[forced][method], scores["own"][method]) if truth_is_own
                               else (scores["own"][method], scores[forced][method]))
                wi, ti = (f, o) if truth_is_own else (o, f)
                result = pair_auroc(wrong, true, wi, ti, rounds, seed, paired=True)
                entry[method] = {"wrong_higher": result["auroc"], "ci": result.get("auroc_ci")}
        report[name] = entry
    if len(sets) == len(FORCED):
        pos, neg = len(sets["known_wrong"].keys), len(sets["unknown_true"].keys)
        i, j = np.repeat(np.arange(pos), neg), np.tile(np.arange(neg), pos)
        entry = {"pairs": int(pos * neg)}
        for method in methods:
            result = pair_auroc(scores["known_wrong"][method], scores["unknown_true"][method], i, j, rounds, seed)
            entry[method] = {"wrong_higher": result["auroc"], "ci": result.get("auroc_ci")}
        report["crossed"] = entry
    return report
