"""Smoke runs of the guard-overhead benchmarks on the host-bound preset: the keys the issue names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--json", *args], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_overhead_prints_one_row_per_batch_and_length():
    rows = run("overhead.py", "--preset", "host", "--batches", "1", "2", "--new-tokens", "3", "5", "--repeats", "2")
    assert [(r["new_tokens"], r["batch"]) for r in rows] == [(3, 1), (3, 2), (5, 1), (5, 2)]
    for row in rows:
        assert row["compared"] == "Guard.generate / model.generate"
        assert {"model", "batch", "new_tokens", "plain_tokens_per_s", "guarded_tokens_per_s", "ratio"} <= row.keys()
        assert row["hooked_layers"] >= 1 and len(row["plain_s"]) == len(row["guarded_s"]) == 2
        assert abs(row["ratio"] - row["guarded_tokens_per_s"] / row["plain_tokens_per_s"]) < 1e-3


def test_hook_cost_times_every_arm():
    [report] = run("hook_cost.py", "--batches", "2", "--new-tokens", "4", "--repeats", "2")
    assert report["batch"] == 2 and report["model"].startswith("llama-host")
    assert list(report["arms"]) == ["plain", "torch", "noop", "keep", "monitor", "guarded"]
    assert report["arms"]["plain"]["ratio"] == 1.0
    assert all(arm["median_ms"] > 0 for arm in report["arms"].values())


def test_step_cost_times_plain_and_monitored_steps():
    [report] = run("step_cost.py", "--preset", "host", "--neurons", "64", "--batch", "2", "--steps", "3", "--rounds", "2")
    assert report["batch"] == 2 and report["model"].startswith("llama-host")
    assert report["plain_step_us"] > 0 and report["monitored_step_us"] > 0
    assert report["end_of_step_us"] > 0  # the monitored forwards did run the end-of-step reduction
    assert abs(report["us_per_step"] - (report["monitored_step_us"] - report["plain_step_us"])) < 0.2


def test_overhead_on_the_shipped_organism_uses_its_probe():
    [row] = run("overhead.py", "--preset", "organism", "--batches", "2", "--new-tokens", "3", "--repeats", "1",
                "--stream")
    assert row["model"].startswith("llama-organism") and row["batch"] == 2
    assert row["compared"] == "Guard.stream, guard on / off"
    from hguard import Probe
    from hguard.registry import SHIPPED

    shipped = Probe.load(SHIPPED / "organism.safetensors")
    assert row["probe_neurons"] == shipped.count and row["hooked_layers"] == shipped.layer.unique().numel()
