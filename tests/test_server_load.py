"""Smoke run of benchmarks/server_load.py: real `hguard serve` processes on the organism, a few clients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "server_load.py"


def test_server_load_reports_both_sides():
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--json", "--clients", "3", "--requests", "6", "--rounds", "2",
         "--sequential-requests", "2", "--max-tokens", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for side in ("guard_on", "guard_off"):
        assert report[side]["requests"] == 6 and report[side]["failed"] == 0
        assert report[side]["tokens"] == 6 * 4  # a biography opening runs on past 4 tokens
        assert len(report[side]["round_tokens_per_s"]) == 2
        assert all(ms > 0 for ms in report[side]["round_server_cpu_ms_per_token"])  # Linux: read from /proc
    assert report["one_by_one_guard_on"]["failed"] == 0
    assert len(report["on_over_off_per_round"]) == 2 and report["on_over_off_throughput"] > 0
    assert report["server_cpu_off_over_on"] > 0
    assert report["on_action"] == "flag"  # --on-action off would make an A/A run
