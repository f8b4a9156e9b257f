"""Markdown tables for benchmarks/RESULTS.md, read from the JSON the studies wrote (so the page's numbers
are the measured ones). Prints one section per JSON file found in benchmarks/results/.

    python benchmarks/results_tables.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hguard.identify.tables import evaluation_tables as evaluation

RESULTS = Path(__file__).parent / "results"


def pct(entry: dict) -> str:
    if entry.get("rate") is None:
        return "n/a"
    low, high = entry["ci"]
    return f"{entry['rate']:.3f} [{low:.3f}, {high:.3f}] (n={entry['n']})"


def ci(entry: dict, key: str) -> str:
    if key not in entry:
        return "n/a"
    low, high = entry[f"{key}_ci"]
    return f"{entry[key]:.3f} [{low:.3f}, {high:.3f}]"


def intervention(data: dict) -> list[str]:
    names = ["false_premise", "sycophancy", "counterfactual", "hallucination_tail", "accuracy_known"]
    lines = []
    for key, curve in data["curves"].items():
        lines += [f"{key} ({data['neurons']} neurons):", "", "| alpha | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for alpha, row in curve.items():
            lines.append(f"| {alpha} | " + " | ".join(pct(row[n]) for n in names) + " |")
        lines.append("")
    lines.append(f"Change from alpha {data['alphas'][0]} to {data['alphas'][-1]}: `{json.dumps(data['change_alpha_0_to_3'])}`")
    return lines


def origins(data: dict) -> list[str]:
    lines = ["| suite | instruct probe on base answers: AUROC | on instruct answers: AUROC |", "|---|---|---|"]
    for name, row in data["transfer"].items():
        lines.append(f"| {name} | {ci(row['base'], 'auroc')} (n={row['base'].get('answers')}) | "
                     f"{ci(row['instruct'], 'auroc')} (n={row['instruct'].get('answers')}) |")
    d = data["drift"]
    lines += ["", f"Drift: {d['h_neurons']} H-Neurons of {d['neurons']}; mean normalised rank {d['mean_normalised_rank_h']} "
              f"(all neurons {d['mean_normalised_rank_all']}; 1 = least drift); one-sided Mann-Whitney p = {d['p_value_one_sided']:.3g}"]
    return lines


def actions(data: dict) -> list[str]:
    f, a, d = data["flag"], data["abstain"], data["dampen"]
    rc = a["risk_coverage"]
    lines = [f"Flag at threshold {f['threshold']:.3f}: precision {pct(f['precision'])}, recall {pct(f['recall'])}, "
             f"flag rate on answers {pct(f['flag_rate_answers'])}; the model's own refusals: {f['refusals']}, "
             f"flagged {pct(f['refusals_flagged'])}; unguarded hallucination rate on answers "
             f"{pct(f['hallucination_rate_unguarded'])}.", "",
             "| abstain, running mean against | withheld (of refusals) | answers kept | hallucination rate among "
             "answers given | hallucinations withheld | correct answers lost |", "|---|---|---|---|---|---|"]
    for label, row in (("the watch threshold (default)", a), ("the flag threshold", data.get("abstain_at_flag_threshold"))):
        if row is None:
            continue
        level = row.get("watch_threshold", row["threshold"])  # five digits where three would read 1.000
        lines.append(f"| {label} {level:.3f} | {pct(row['withheld'])} " if level < 0.9995 else
                     f"| {label} {level:.5f} | {pct(row['withheld'])} ")
        lines[-1] += (
                     f"({pct(row['withheld_among_refusals'])}) | {pct(row['coverage_of_answers'])} | "
                     f"{pct(row['hallucination_rate_answered'])} | {pct(row['hallucinations_withheld'])} | "
                     f"{pct(row['correct_lost'])} |")
    lines += ["",
              f"| score | AURC | risk at the guard's coverage ({rc['guard_coverage']}) |", "|---|---|---|"]
    for name, row in rc["curves"].items():
        lines.append(f"| {name} | {row['aurc']} | {row['risk_at_guard_coverage']} |")
    lines += ["", "| guard | hallucination rate, tail | accuracy, known people |", "|---|---|---|"]
    for name in ("off", "dampen"):
        lines.append(f"| {name} | {pct(d[name]['hallucination_tail'])} | {pct(d[name]['accuracy_known'])} |")
    return lines


def main() -> int:
    controls = sorted(RESULTS.glob("eval-controls-*.json"))  # the latest `hguard eval` with its controls
    studies = [("eval", evaluation), *((p.stem, evaluation) for p in controls[-1:]), ("intervention", intervention),
               ("origins", origins), ("actions", actions),
               # the shipped probe since 2026-12-01 (token inputs): RESULTS.md section 7
               ("eval-token-inputs-2026-12-01", evaluation), ("actions-token-inputs", actions)]
    for name, render in studies:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            print(f"<!-- {path} missing -->", file=sys.stderr)
            continue
        data = json.loads(path.read_text())
        print(f"### {name}\n\n`{data.get('command', '')}`\n")
        print("\n".join(render(data)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
