"""Build and evaluate several organism designs and seeds side by side, then pack the best builds.

Each (design, seed) runs `hguard organism build --set DESIGN --seed S --eval` in its own process, all
at once (on a GPU they share the card; on a CPU run one at a time with --parallel 1). Every design is
a set of `BuildConfig` overrides whose schedule also fits the 2-core CPU budget of the issue (about
two hours), so the design chosen here can be rebuilt on a CPU with the same command. A design is
ranked by the organism goals it meets on every seed (accuracy_known >= 0.90, hallucination_rate_tail
>= 0.30, all_correct >= 500, all_wrong >= 500, residual_probe_auroc >= 0.85), then by its worst
relative margin. The seed-0 builds of the top `--pack` designs are written as tar files (base and
instruct separately, so each stays small) beside `grid.json`.

    python benchmarks/organism_grid.py --device cuda --out $OUT --pack 2
    python benchmarks/organism_grid.py --tiny --parallel 1 --out /tmp/grid     # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

# Two grids ran on an H200 (2026-11-27, results in benchmarks/results/organism-grid-h200-*.json); the
# designs are written relative to today's BuildConfig defaults, which came out of them: "v3-wide"'s
# shape, "v4-vocab"'s vocabulary, and a smaller abstention share (0.08, tried on the CPU after the
# grids showed 0.15 made the model abstain on two thirds of the tail).
GRID1 = {"vocab_size": 2048, "abstain_share": 0.15}
SMALL = {**GRID1, "shape": {"hidden": 192, "heads": 6, "intermediate": 768}}
DESIGNS: dict[str, dict] = {
    "v3": {**SMALL, "base": {"steps": 2000}},
    "v3-abstain": {**SMALL, "base": {"steps": 2000}, "abstain_share": 0.3, "abstain_docs": 3000},
    "v3-wide": GRID1,
    "v3-long": {**SMALL, "base": {"steps": 2600}},
    # second grid: a larger vocabulary turns frequent names into fewer, whole-word tokens (as real
    # tokenizers do for famous names), a possible source of a decodable familiarity signal
    "v4-vocab": {"abstain_share": 0.15},
    "v4-vocab-abstain": {"abstain_share": 0.3, "abstain_docs": 3000},
    "v4": {},
}
GOALS = {"accuracy_known": 0.90, "hallucination_rate_tail": 0.30, "all_correct": 500, "all_wrong": 500,
         "residual_probe_auroc": 0.85}
TINY = {"base": {"steps": 20}}


def margins(result: dict | None) -> dict[str, float]:
    """Per goal: (measured - goal) / goal; -1 where nothing was measured."""
    out = {}
    for key, goal in GOALS.items():
        value = (result or {}).get(key)
        out[key] = -1.0 if value is None else (value - goal) / goal
    return out


def rank_key(runs: list[dict]) -> tuple[int, float]:
    met = sum(m >= 0 for run in runs for m in margins(run.get("eval")).values())
    worst = min((m for run in runs for m in margins(run.get("eval")).values()), default=-1.0)
    return met, worst


def launch(name: str, overrides: dict, seed: int, args, out: Path) -> tuple[subprocess.Popen, Path]:
    directory = out / f"{name}-s{seed}"
    command = [sys.executable, "-m", "hguard.cli", "organism", "build", "--seed", str(seed), "--out",
               str(directory), "--device", args.device, "--set", json.dumps(overrides), "--eval"]
    if args.tiny:
        command.append("--tiny")
    directory.mkdir(parents=True, exist_ok=True)
    log = open(out / f"{name}-s{seed}.log", "w")
    result = open(directory / "eval.json", "w")
    return subprocess.Popen(command, stdout=result, stderr=log), directory


def pack(directory: Path, name: str, out: Path) -> list[str]:
    written = []
    for stage in ("base", "instruct"):
        target = out / f"{name}-{stage}.tar"
        with tarfile.open(target, "w") as tar:
            tar.add(directory / stage, arcname=stage)
            if stage == "instruct":
                for extra in ("build.json", "train_log.jsonl", "world.json", "eval.json"):
                    if (directory / extra).exists():
                        tar.add(directory / extra, arcname=extra)
        written.append(target.name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=sorted(DESIGNS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel", type=int, default=0, help="builds at once (default: all)")
    parser.add_argument("--deadline", type=float, default=0, help="seconds before unfinished builds are stopped")
    parser.add_argument("--pack", type=int, default=1, help="tar the seed-0 builds of the top N designs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny configurations (a smoke run)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    jobs = [(name, seed) for name in args.designs for seed in args.seeds]
    width = args.parallel or len(jobs)
    start = time.time()
    running: dict[tuple[str, int], tuple[subprocess.Popen, Path, float]] = {}
    done: dict[tuple[str, int], dict] = {}
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < width:
            name, seed = pending.pop(0)
            overrides = {**DESIGNS[name], **(TINY if args.tiny else {})}
            process, directory = launch(name, overrides, seed, args, out)
            running[(name, seed)] = (process, directory, time.time())
        for key, (process, directory, began) in list(running.items()):
            late = args.deadline and time.time() - start > args.deadline
            if process.poll() is None and not late:
                continue
            if process.poll() is None:
                process.kill()
                process.wait()
            text = (directory / "eval.json").read_text().strip()
            done[key] = {"design": key[0], "seed": key[1], "overrides": DESIGNS[key[0]], "returncode": process.returncode,
                         "seconds": round(time.time() - began, 1), "eval": json.loads(text) if text else None}
            del running[key]
            print(f"{key[0]} seed {key[1]}: rc {process.returncode}, {done[key]['seconds']} s", file=sys.stderr, flush=True)
        time.sleep(1)

    by_design = {name: [done[(name, s)] for s in args.seeds] for name in args.designs}
    ranking = sorted(by_design, key=lambda name: rank_key(by_design[name]), reverse=True)
    packed = []
    for name in ranking[: args.pack]:
        directory = out / f"{name}-s{args.seeds[0]}"
        if (directory / "instruct" / "model.safetensors").exists():
            packed += pack(directory, name, out)
    summary = {"device": args.device, "seconds": round(time.time() - start, 1), "goals": GOALS,
               "ranking": [{"design": n, "goals_met": rank_key(by_design[n])[0],
                            "worst_margin": round(rank_key(by_design[n])[1], 4)} for n in ranking],
               "runs": list(done.values()), "packed": packed}
    (out / "grid.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["ranking"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
