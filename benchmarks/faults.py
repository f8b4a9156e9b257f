"""The fault campaign of issue 22 against live `hguard serve` processes (loopback only; it stops by itself).

Two servers on the organism (or --model): one hosting the model, one proxying the misbehaving upstream
of fault_corpus.py (in this process). Each gets the hostile-body corpus on both endpoints, streamed
and not; the proxy also gets every upstream mode on both endpoints, streamed and not. The whole corpus
runs --rounds times in the same server processes. After every case a normal request must answer
within --quick seconds (else the case counts as wedged). Counted per server over all rounds: cases
tried and their classes (2xx, 4xx, upstream_5xx = 502/504 for a failed upstream, hguard_5xx,
truncated streams, leaks of upstream internals), wedged, the slowest follow-up, and the seconds from
SIGTERM (sent with a stream open) to exit.

Memory, each figure the process's VmRSS after a few normal requests: `rss_before_mb` after the
warm-up (before any hostile case), `rss_after_rounds_mb` after each round, `rss_peak_mb` its VmHWM.
`rss_change` is the last round against before (what the campaign left behind, the issue's figure);
`rss_change_after_first_round` is the last round against the first: a leak keeps growing there, a
high-water mark (the allocator keeping what the first round's large bodies freed) does not.

    python benchmarks/faults.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_corpus import (CHAT, TEXT, UPSTREAM_MODES, MisbehavingUpstream, answered, classify,  # noqa: E402
                          hostile_bodies, normal_body, send)
from server_load import wait_until_up  # noqa: E402

MODEL = "faults"


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def serve(args: argparse.Namespace, *extra: str):
    """An `hguard serve` process on a free loopback port; yields (URL, process); stopped on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "hguard.cli", "serve", "--port", str(port), "--served-model-name", MODEL,
               "--log-level", "critical", "--shutdown-timeout", str(args.shutdown_timeout), *extra]
    for flag, value in (("--model", args.model), ("--probe", args.probe)):
        if value is not None:
            command += [flag, value]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, command, f"{url}/v1/models", within=180.0, poll=0.3)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {"tried": 0}
        self.wedged: list[str] = []
        self.slowest_follow_up = 0.0

    def add(self, kind: str) -> None:
        self.counts["tried"] += 1
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def follow_up(self, client: httpx.Client, url: str, case: str, quick: float) -> None:
        for path in (CHAT, TEXT):
            reply = send(client, url, path, normal_body(path, MODEL), timeout=quick)
            self.slowest_follow_up = max(self.slowest_follow_up, reply.seconds)
            if not answered(reply, path) or reply.seconds > quick:
                self.wedged.append(case)
                return


def warm(url: str) -> None:
    with httpx.Client() as client:
        for _ in range(3):
            for path in (CHAT, TEXT):
                for stream in (False, True):
                    send(client, url, path, normal_body(path, MODEL, stream))


def hostile(url: str, tally: Tally, quick: float) -> None:
    with httpx.Client() as client:
        for name, path, body in hostile_bodies(MODEL):
            tally.add(classify(send(client, url, path, body)))
            tally.follow_up(client, url, name, quick)


def upstream_modes(url: str, upstream: MisbehavingUpstream, tally: Tally, quick: float) -> None:
    with httpx.Client() as client:
        for mode in UPSTREAM_MODES:
            for path in (CHAT, TEXT):
                for stream in (False, True):
                    upstream.mode = mode
                    tally.add(classify(send(client, url, path, normal_body(path, MODEL, stream))))
                    upstream.mode = "ok"
                    tally.follow_up(client, url, f"{mode} {path} stream={stream}", quick)


def stop(url: str, process: subprocess.Popen) -> dict:
    """SIGTERM with a stream open: seconds to exit, and whether the open stream ended with [DONE]."""
    done = {}

    def long_stream() -> None:
        body = {**normal_body(TEXT, MODEL, True), "max_tokens": 200, "metadata": {"upstream_mode": "stall mid-answer"}}
        reply = send(httpx.Client(), url, TEXT, body, timeout=60)
        done["reply"] = reply

    thread = threading.Thread(target=long_stream)
    thread.start()
    time.sleep(1.0)
    start = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        return {"exit_s": None}
    thread.join(60)
    reply = done.get("reply")
    return {"exit_s": round(time.perf_counter() - start, 2), "open_stream_class": classify(reply) if reply else None}


def campaign(url: str, process, rounds: int, run) -> tuple[Tally, dict]:
    """`run(tally)` `rounds` times after a warm-up; the tally and the memory figures (module docstring)."""
    warm(url)
    before, after, tally = rss_mb(process.pid), [], Tally()
    for _ in range(rounds):
        run(tally)
        warm(url)
        after.append(rss_mb(process.pid))
    return tally, {"rounds": rounds, "rss_before_mb": round(before, 1),
                   "rss_after_rounds_mb": [round(a, 1) for a in after],
                   "rss_peak_mb": round(rss_mb(process.pid, "VmHWM"), 1),
                   "rss_change": round(after[-1] / before - 1, 3),
                   "rss_change_after_first_round": round(after[-1] / after[0] - 1, 3)}


def report(name: str, tally: Tally, memory: dict) -> dict:
    return {"server": name, **tally.counts, "wedged": len(tally.wedged), "wedged_cases": tally.wedged[:10],
            "slowest_follow_up_s": round(tally.slowest_follow_up, 2), **memory}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line (default: a table too)")
    parser.add_argument("--model", default=None, help="model to serve (default: the organism)")
    parser.add_argument("--probe", default=None, help="its probe (default: the registered one)")
    parser.add_argument("--quick", type=float, default=10.0, help="seconds a follow-up request may take")
    parser.add_argument("--upstream-timeout", type=float, default=2.0, help="the proxy's --upstream-timeout")
    parser.add_argument("--rounds", type=int, default=3, help="times the whole corpus runs in the same servers")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0, help="the servers' --shutdown-timeout")
    args = parser.parse_args()

    results = []
    with MisbehavingUpstream() as upstream:
        with serve(args) as (url, process):
            tally, memory = campaign(url, process, args.rounds, lambda tally: hostile(url, tally, args.quick))
            results.append(report("hosted", tally, memory))
            results[-1].update(stop(url, process))
        with serve(args, "--upstream", upstream.url, "--upstream-timeout", str(args.upstream_timeout)) as (url, process):
            def both(tally: Tally) -> None:
                hostile(url, tally, args.quick)
                upstream_modes(url, upstream, tally, args.quick)

            tally, memory = campaign(url, process, args.rounds, both)
            results.append(report("proxy", tally, memory))
            results[-1].update(stop(url, process))
    summary = {"servers": results, "command": " ".join(sys.argv),
               "hguard_5xx": sum(r.get("hguard_5xx", 0) for r in results),
               "truncated": sum(r.get("truncated", 0) for r in results),
               "wedged": sum(r["wedged"] for r in results), "leaks": sum(r.get("leak", 0) for r in results)}
    if not args.json:
        for r in results:
            print({k: v for k, v in r.items() if k != "wedged_cases"}, file=sys.stderr)
    print(json.dumps(summary))
    return 0 if summary["hguard_5xx"] == summary["truncated"] == summary["wedged"] == summary["leaks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
