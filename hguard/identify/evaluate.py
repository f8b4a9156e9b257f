"""`hguard eval`: the H-Neuron probe against baselines and controls on every QA suite, with bootstrap
intervals. collected.py keeps and featurises each suite's questions; controls.py holds the controls.

Methods (higher score = more likely hallucinated):
  h_neurons       the probe under evaluation, exactly as the guard applies it, on the CETT means of its
                  training target (fit.py: the whole response, or the answer tokens)
  h_neurons_answer  the same probe on the answer tokens' CETT means only (the paper's reading)
  h_neurons_alone   for a probe with token inputs (token_inputs.py): its neuron part alone, without the
                  token's log-probability and entropy (what the H-Neurons add is h_neurons beside it and
                  beside the logit scores)
  random_neurons  as many random neurons, a standardised L2 logistic fit for the same target, mean of
                  `draws` draws
  all_neurons     a standardised L1 fit over every neuron for the same target, C by validation AUROC
  residual        a standardised L2 logistic probe on the residual stream (SAPLMA-style), layer by validation
  max_sequence_probability, mean_token_entropy, perplexity   lm-polygraph's estimators on the whole
                  response, and (`_answer`) on the answer tokens only
  prompt_only     the probe's logit at the last prompt token (no answer yet); name_tokens, exposure:
                  controls.py's trivial baselines
  fused           candidate (issue 20): a standardised L2 logistic fit over the probe's score, the
                  perplexity and the mean token entropy of the whole response. All three are means over
                  the response's tokens, so this is the mean of one per-token dot product (CETT terms,
                  the token's log-probability, its entropy): a score the guard could give each token.
                  Fitted on the training suite's "val" side: the probe was fitted on "train", where its
                  own score is better than anywhere else and a stack fitted there would lean on it
  logit_fused     the same fit without the probe (what the two logit inputs give alone), also on "val"
Baselines are fitted on the "train" side of the training suite, with the probe's class balancing (the
same class weights, or a subsample drawn by the same rule from its seed), and tuned on its "val" side; every
method's decision threshold is the one with the best accuracy on the balanced "val" side. Suites are
evaluated on their held-out side only (a question whose fact shares a training question's id is
excluded), balanced by subsampling the larger class, and resampled 1,000 times for 95% intervals. The
controls (familiarity strata, forced answers) read every held-out question, not the balanced subsample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..probe import Probe
from ..sites import resolve
from .collected import Collected, collect, fabricated_labels, response_stats  # noqa: F401 (re-exported)
from .controls import forced_report, strata_report, trivial_scorers
from .fit import balanced, check_balance, fit_l1, question_weights
from .tables import render

Scorer = Callable[[Collected], np.ndarray]
LOGIT_SCORES = ("max_sequence_probability", "mean_token_entropy", "perplexity")
SUITES = ("in_domain", "paraphrase", "other_attribute", "fabricated")
HELD_OUT = ("heldout_questions", "heldout_system", "heldout_multiturn")  # benchmarks/heldout_suites.py


def default_suites(directory: str | Path) -> list[str]:
    """The suites `hguard eval` reads by default: the four QA suites, then the held-out phrasing suites
    found in `directory`."""
    return [*SUITES, *(name for name in HELD_OUT if (Path(directory) / f"{name}.jsonl").exists())]


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
def probe_logits(probe: Probe, intermediate: int, cett: np.ndarray, tokens: np.ndarray | None = None) -> np.ndarray:
    """The probe's classifier on mean CETT rows [n, layers * intermediate], exactly as the guard applies it;
    `tokens` [n, 2], the same tokens' mean log-probability and entropy, for a probe with token inputs (None:
    its neuron part alone)."""
    flat = (probe.layer * intermediate + probe.neuron).numpy()
    logits = cett[:, flat] @ probe.weight.numpy().astype(np.float64) + probe.bias
    if tokens is not None and probe.token_weight is not None:
        logits = logits + tokens @ probe.token_weight.numpy().astype(np.float64)
    return logits


def probe_target(probe: Probe) -> str:
    """What the probe was fitted on (probes from before targets existed were fitted on answer tokens)."""
    return str(probe.training.get("target", "answer"))


def probe_scorer(probe: Probe, intermediate: int, target: str | None = None, alone: bool = False) -> Scorer:
    """The probe on each row's means over `target`'s tokens (default: its training target); `alone`: its
    neuron part only."""
    target = target or probe_target(probe)
    return lambda data: probe_logits(probe, intermediate, data.view(target),
                                     None if alone else data.token_means(target))


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


def logit_scorers(span: bool = False) -> dict[str, Scorer]:
    """lm-polygraph's scores on every response token, or (`span`) on the answer tokens only."""
    from .logit_scores import logit_scores

    def tokens(values: list[np.ndarray], data: Collected) -> list[np.ndarray]:
        return [v[a] for v, a in zip(values, data.answer_tokens)] if span else values

    return {name + ("_answer" if span else ""):
            (lambda data, n=name: logit_scores(tokens(data.log_likelihoods, data), tokens(data.entropies, data), [n])[n])
            for name in LOGIT_SCORES}


def fused_scorer(parts: Sequence[Scorer], side: Collected, seed: int, balance: str = "none") -> Scorer:
    """A standardised L2 logistic fit over the scores `parts` give each response, on `side` (one that none
    of the parts was fitted on)."""
    def features(data: Collected) -> np.ndarray:
        return np.stack([part(data) for part in parts], axis=1)

    fit = _l2(features(side), side.labels, 1.0, seed, question_weights(side.labels, balance))
    return lambda data: fit.decision_function(features(data))


Methods = dict[str, tuple[list[Scorer], dict]]


def evaluate(probe: Probe, model, training: Collected, suites: dict[str, Collected], *, draws: int = 10,
             rounds: int = 1000, seed: int = 0, Cs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
             logit_baselines: bool = True) -> dict:
    """Fit the baselines on `training` (its train/val sides) and score every suite's held-out side, with
    the controls (familiarity strata, forced answers) beside."""
    from ..progress import progress

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
    methods, skipped = fitted_methods(probe, sites.intermediate_size, train, val, draws=draws, seed=seed, Cs=Cs,
                                      balance=balance, logit_baselines=logit_baselines)
    val_index = balanced(val.labels, seed)
    thresholds = {name: [best_threshold(val.labels[val_index], s(val)[val_index]) for s in scorers]
                  for name, (scorers, _) in methods.items()}
    report = {"neurons_kept": probe.count, "per_mille": round(1000 * probe.count / total, 4),
              "target": probe_target(probe), "h_neurons": int((probe.weight > 0).sum()), "total_neurons": total,
              "training": {side: {"faithful": int((d.labels == 0).sum()), "hallucinated": int(d.labels.sum())}
                           for side, d in (("train", train), ("val", val))},
              "balance": balance, "methods": list(methods), "skipped_methods": skipped,
              "suites": {}}
    for name, data in progress(suites.items(), desc="eval suites", total=len(suites)):
        report["suites"][name] = suite_entry(data, methods, thresholds, rounds, seed)
    return report


def fitted_methods(probe: Probe, intermediate: int, train: Collected, val: Collected, *, draws: int, seed: int,
                   Cs: Sequence[float], balance: str, logit_baselines: bool) -> tuple[Methods, dict]:
    """Every method (module docstring), its baselines fitted on `train` and tuned on `val`, with what each
    reports beside its figures; and the methods skipped, with why."""
    target = probe_target(probe)
    all_neurons, all_info = all_neuron_scorer(train, val, Cs, target, balance)
    residual, residual_info = residual_scorer(train, val, seed, balance)
    methods: Methods = {
        "h_neurons": ([probe_scorer(probe, intermediate)], {}),
        "h_neurons_answer": ([probe_scorer(probe, intermediate, "answer")], {}),
        **({"h_neurons_alone": ([probe_scorer(probe, intermediate, alone=True)], {})}
           if probe.token_weight is not None else {}),
        "random_neurons": (random_scorers(train, probe.count, draws, seed, target, balance), {"draws": draws}),
        "all_neurons": ([all_neurons], all_info),
        "residual": ([residual], residual_info),
    }
    if logit_baselines:
        for span in (False, True):
            methods.update({name: ([scorer], {"library": "lm-polygraph"}) for name, scorer in logit_scorers(span).items()})
        means = [methods[name][0][0] for name in ("perplexity", "mean_token_entropy")]
        methods["fused"] = ([fused_scorer([methods["h_neurons"][0][0], *means], val, seed, balance)],
                            {"inputs": ["h_neurons", "perplexity", "mean_token_entropy"], "fitted_on": "val"})
        methods["logit_fused"] = ([fused_scorer(means, val, seed, balance)],
                                  {"inputs": ["perplexity", "mean_token_entropy"], "fitted_on": "val"})

    def prompt_only(data: Collected) -> np.ndarray:
        if data.last_prompt is None:
            return np.full(len(data.keys), np.nan)
        return probe_logits(probe, intermediate, data.last_prompt)

    skipped = {}
    for name, scorer in {"prompt_only": prompt_only, **trivial_scorers()}.items():
        if np.isnan(scorer(val)).any():  # a suite without names or exposure: nothing to threshold
            skipped[name] = "the training suite lacks it"
        else:
            methods[name] = ([scorer], {})
    return methods, skipped


def suite_entry(data: Collected, methods: Methods, thresholds: dict[str, list[float]], rounds: int,
                seed: int) -> dict:
    """One suite's report: every method on its held-out side (balanced, bootstrapped), and the controls."""
    held = data.where(data.side == "test")
    entry = {"questions": data.questions, "kept": len(data.keys), "held_out": len(held.keys),
             "faithful": int((held.labels == 0).sum()), "hallucinated": int(held.labels.sum()),
             "dropped": data.dropped}
    if min(entry["faithful"], entry["hallucinated"]) < 2:
        return {**entry, "note": "fewer than 2 questions in a class: no AUROC"}
    scores = {method: [s(held) for s in scorers] for method, (scorers, _) in methods.items()}
    usable = {m: v for m, v in scores.items() if not any(np.isnan(x).any() for x in v)}
    index = balanced(held.labels, seed)
    entry["balanced"] = int(index.size)
    for method, (_, info) in methods.items():
        if method not in usable:
            entry[method] = {"note": "some items lack it"}
            continue
        entry[method] = {**bootstrap(held.labels[index], [v[index] for v in scores[method]], thresholds[method],
                                     rounds, seed), **info}
    entry["strata"] = strata_report(held, usable, rounds, seed)
    entry["forced"] = forced_report(held, {m: methods[m][0] for m in usable}, rounds, seed)
    return entry


def fact_side(item: dict, seed: int = 0) -> str:
    """The split side of the fact a question asks about: an organism question (pid, attribute) shares the
    side of the in-domain question about that fact, so no fact is both fitted on and evaluated."""
    from .fit import split_of

    if item.get("pid") is not None and item.get("attribute"):
        return split_of(f"in_domain-{item['pid']}-{item['attribute']}", seed)
    return split_of(str(item["id"]), seed)


def evaluate_suites(model, tokenizer, probe: Probe, suites: dict[str, list[dict]], *, training: str = "in_domain",
                    limit: int | None = None, samples: int = 10, max_new_tokens: int = 50, seed: int = 0,
                    work: str | Path | None = None, resume: bool = False, sampler=None,
                    echo=lambda message: None, **options) -> dict:
    """Collect every suite (the others on their held-out side; each at most `limit` questions) and evaluate
    the probe against the baselines and controls; the report's tables go to `echo` (the CLI's stderr).
    Sides follow the split of the probe's fit (the seed in its training metadata, else `seed`); `seed`
    drives sampling and the bootstrap.

    With `work`, each suite's sampled answers are kept there (`<suite>.answers.jsonl`; the training
    suite's in `answers.jsonl`, where `hguard identify` keeps its own), and `resume` reads back answers
    sampled for the same questions and settings: pointed at an identify run's work directory, the
    training suite is not sampled again. `sampler`: what draws the answers (sample_cached)."""
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
                                  max_new_tokens=max_new_tokens, seed=seed, cache=cache, resume=resume, name=name,
                                  sampler=sampler)
        echo(f"{name}: {len(items)} questions, {len(collected[name].keys)} kept, dropped {collected[name].dropped}")
    report = evaluate(probe, model, collected[training], collected, seed=seed, **options)
    report.update(samples_per_question=samples, training_suite=training, limit=limit)
    echo("the probe against baselines and controls\n" + render(report))  # the human-readable report
    return report
