"""Markdown tables of an `hguard eval` report: its human output, and its section of benchmarks/RESULTS.md.

One row per method, one column per suite: AUROC and accuracy on the balanced held-out questions, AUROC
within each kind of familiarity stratum and within each tier, and the forced-answer shares.
"""

from __future__ import annotations

from collections.abc import Callable

STRATA_TITLES = {
    "equal_exposure": "AUROC within equal exposure (label-discordant pairs sharing an exposure count)",
    "within_tier": "AUROC within tiers (pairs in the same tier: head, mid, tail, unseen)",
    "within_tier_attribute": "AUROC within tier and attribute (pairs sharing both)",
}
FORCED_TITLES = {
    "known": "Forced answers, known facts: share of pairs where the score ranks a plausible wrong value above "
             "the true one (same prompt, teacher-forced in the model's own answer)",
    "unknown": "Forced answers, unknown facts: share of pairs where the score ranks the model's own wrong "
               "answer above the true value forced in its place",
    "crossed": "Forced answers, crossed: share of pairs where the score ranks a forced wrong answer about a known "
               "fact above a forced true answer about an unknown one",
}


def interval(entry: dict | None, key: str = "auroc", ci: str | None = None) -> str:
    if not entry or entry.get(key) is None:
        return "n/a"
    bounds = entry.get(ci or f"{key}_ci")
    return f"{entry[key]:.3f}" + (f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "")


def grid(title: str, suites: dict, methods: list[str], cell: Callable[[dict, str], str],
         counts: Callable[[dict], str]) -> list[str]:
    names = list(suites)
    lines = [f"{title}:", "", "| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             "| n | " + " | ".join(counts(suites[n]) for n in names) + " |"]
    lines += [f"| {m} | " + " | ".join(cell(suites[n], m) for n in names) + " |" for m in methods]
    return lines + [""]


def evaluation_tables(report: dict) -> list[str]:
    methods = report.get("methods") or ["h_neurons", "random_neurons", "all_neurons", "residual",  # older reports
                                        "max_sequence_probability", "mean_token_entropy", "perplexity"]
    suites = report["suites"]
    scored = {n: s for n, s in suites.items() if "note" not in s}
    lines = [f"Probe: {report['neurons_kept']} neurons ({report['per_mille']} per mille of {report['total_neurons']}), "
             f"{report['h_neurons']} with positive weight. Baselines fitted on {report['training']}"
             + (f", class balance: {report['balance']} (as the probe)." if "balance" in report else "."), ""]
    for name, suite in suites.items():
        if "note" in suite:
            lines.append(f"- {name}: {suite['held_out']} held-out questions ({suite['faithful']} faithful, "
                         f"{suite['hallucinated']} hallucinated): {suite['note']}")
    if len(scored) < len(suites):
        lines.append("")
    for metric, title in (("auroc", "AUROC (95% bootstrap interval), balanced held-out questions"),
                          ("accuracy", "Accuracy (95% bootstrap interval), balanced held-out questions")):
        lines += grid(title, scored, methods, lambda s, m, k=metric: interval(s.get(m), k),
                      lambda s: str(s.get("balanced", s["held_out"])))
    stratified = {n: s for n, s in scored.items() if "strata" in s}
    for kind, title in STRATA_TITLES.items():
        if stratified:
            lines += grid(title, stratified, methods, lambda s, m, k=kind: interval(s["strata"][k].get(m)),
                          lambda s, k=kind: (f"{s['strata'][k].get('pairs', 0)} pairs"
                                             + (" (by name tokens)" if "name_tokens" in s["strata"][k]["by"] else "")))
    for name, suite in stratified.items():
        tiers = {t: e for t, e in suite["strata"]["tiers"].items() if "pairs" in e}
        if tiers:
            lines += grid(f"AUROC within each tier, {name}", tiers, methods, lambda e, m: interval(e.get(m)),
                          lambda e: f"{e['faithful']}+{e['hallucinated']}")
    forced = {n: s["forced"] for n, s in stratified.items() if "forced" in s and "note" not in s["forced"]}
    for kind, title in FORCED_TITLES.items():
        present = {n: f[kind] for n, f in forced.items() if f.get(kind, {}).get("pairs")}
        if present:
            lines += grid(title, present, methods, lambda e, m: interval(e.get(m), "wrong_higher", "ci"),
                          lambda e: f"{e['pairs']} pairs")
    return lines


def render(report: dict) -> str:
    return "\n".join(evaluation_tables(report))
