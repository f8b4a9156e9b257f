"""Load on the OpenAI-compatible server over loopback: concurrent streaming clients, guard on vs off.

Three `hguard serve` processes serve the same model and probe, as a deployment would: guard on
(dynamic batching), guard off (dynamic batching, no hooks), and guard on with a batch size of one
(requests served one by one). The clients run in this process, so they never share the servers'
interpreter. Rounds alternate on/off in ABBA order so machine noise hits both alike; the one-by-one
server runs once. Each client streams a text completion (a biography opening, so the organism writes
on) of at most `--max-tokens` tokens, greedy; throughput counts the completion tokens each stream's
usage chunk reports. `--on-action off` runs the "on" and one-by-one servers with the guard off too
(an A/A run, keys unchanged): its ratios show the method's own bias.

    python benchmarks/server_load.py --json                       # 32 clients, 200 requests per side
    python benchmarks/server_load.py --json --model path/to/model --probe probe.safetensors
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx


def wait_until_up(process: subprocess.Popen, command: list[str], url: str, within: float, poll: float = 0.2) -> None:
    """Until `url` answers 200; an error if the server exits first or takes longer than `within` seconds."""
    deadline = time.time() + within
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {' '.join(command)}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"the server did not come up within {within:.0f} s")
        time.sleep(poll)


@contextmanager
def serve(args: argparse.Namespace, action: str, batch: int):
    """An `hguard serve` process on a free loopback port; yields (URL, process), stops it on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "hguard.cli", "serve", "--port", str(port), "--served-model-name", "bench",
               "--action", action, "--max-batch-size", str(batch), "--max-queue", str(args.clients * 4),
               "--max-tokens", str(args.max_tokens), "--log-level", "warning"]
    for flag, value in (("--model", args.model), ("--probe", args.probe), ("--threads", args.threads)):
        if value is not None:
            command += [flag, str(value)]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, command, f"{url}/health", within=120.0)
        yield url, process
    finally:
        end(process)


def end(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


NAMES = ["Rishu Resou", "Vassor Fonis", "Dusfe Kastein", "Zibo Garsu", "Vineir Sushol", "Kalo Venris"]


async def one_request(client: httpx.AsyncClient, url: str, max_tokens: int, index: int,
                      extra: dict | None = None) -> tuple[float, int, bool, float | None]:
    """(seconds, completion tokens, whether it ended well, seconds to the first chunk with text or None);
    `extra`: more fields of the request's body."""
    # text completion of a biography opening: the organism writes on for many tokens (a chat answer is short)
    body = {"model": "bench", "prompt": f"From the archive: {NAMES[index % len(NAMES)]}", "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    start = time.perf_counter()
    tokens, ok, first = 0, False, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return time.perf_counter() - start, 0, False, None
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    ok = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return time.perf_counter() - start, tokens, False, first
                    if first is None and any(c.get("text") for c in chunk.get("choices") or []):
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        return time.perf_counter() - start, tokens, False, first
    return time.perf_counter() - start, tokens, ok, first


async def load(url: str, clients: int, requests: int, max_tokens: int, extra: dict | None = None) -> dict:
    latencies: list[float] = []
    firsts: list[float] = []  # time to the first text, per request that had one
    tokens = failed = 0
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients + 4)

    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker() -> None:
            nonlocal tokens, failed
            for index in counter:
                seconds, count, ok, first = await one_request(client, url, max_tokens, index, extra)
                latencies.append(seconds)
                if first is not None:
                    firsts.append(first)
                tokens += count
                failed += 0 if ok else 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {"requests": requests, "failed": failed, "wall_s": wall, "tokens": tokens, "latencies": latencies,
            "firsts": firsts}


def _pid_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc); OSError, ValueError or IndexError
    where it cannot be read."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(process: subprocess.Popen) -> float | None:
    """User + system CPU seconds the server process has used so far (Linux /proc; None elsewhere)."""
    try:
        return _pid_seconds(process.pid)
    except (OSError, ValueError, IndexError):
        return None


def tree_cpu_seconds(pid: int) -> float | None:
    """cpu_seconds of a process and of all its descendants (vLLM's engine runs in a child process)."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += _pid_seconds(current)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    pending += [int(child) for child in handle.read().split()]
        except (OSError, ValueError, IndexError):
            if current == pid:
                return None
    return total


def measured(url: str, process: subprocess.Popen, clients: int, requests: int, max_tokens: int) -> dict:
    """One load round, with the server's CPU seconds spent on it."""
    before = cpu_seconds(process)
    run = asyncio.run(load(url, clients, requests, max_tokens))
    after = cpu_seconds(process)
    run["server_cpu_s"] = after - before if before is not None and after is not None else None
    return run


def summarise(runs: list[dict]) -> dict:
    latencies = sorted(x for run in runs for x in run["latencies"])
    wall = sum(run["wall_s"] for run in runs)
    tokens = sum(run["tokens"] for run in runs)
    return {
        "requests": sum(run["requests"] for run in runs),
        "failed": sum(run["failed"] for run in runs),
        "p50_latency_s": round(statistics.median(latencies), 4),
        "p99_latency_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 4),
        "tokens_per_s": round(tokens / wall, 2),
        "tokens": tokens,
        "round_tokens_per_s": [round(run["tokens"] / run["wall_s"], 2) for run in runs],
        # the server process's CPU time per completion token: what the guard costs the server itself,
        # less exposed than throughput to the clients and neighbours that share the cores
        "round_server_cpu_ms_per_token": [
            round(1000 * run["server_cpu_s"] / run["tokens"], 3) if run.get("server_cpu_s") and run["tokens"] else None
            for run in runs
        ],
    }


def cpu_ratio(on: dict, off: dict) -> float | None:
    """Median server CPU per token with the guard off over with it on (1.0: the guard costs nothing)."""
    on_cpu = [x for x in on["round_server_cpu_ms_per_token"] if x]
    off_cpu = [x for x in off["round_server_cpu_ms_per_token"] if x]
    if not on_cpu or not off_cpu:
        return None
    return round(statistics.median(off_cpu) / statistics.median(on_cpu), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=200, help="per side (guard on / off)")
    parser.add_argument("--rounds", type=int, default=4, help="ABBA rounds the requests are split into")
    parser.add_argument("--sequential-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="default: the built-in organism")
    parser.add_argument("--probe", default=None, help="default: the known probe of the model")
    parser.add_argument("--threads", type=int, default=None, help="passed to hguard serve --threads")
    parser.add_argument("--on-action", default="flag", choices=["flag", "abstain", "off"],
                        help="the guarded side's action; 'off' makes an A/A run that shows the method's own bias")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    per_round = max(1, args.requests // args.rounds)
    results: dict[str, list[dict]] = {"on": [], "off": []}
    with serve(args, args.on_action, args.clients) as on, serve(args, "off", args.clients) as off:
        asyncio.run(load(on[0], 4, 8, args.max_tokens))  # warm up
        asyncio.run(load(off[0], 4, 8, args.max_tokens))
        for r in range(args.rounds):
            order = [("on", on), ("off", off)] if r % 2 == 0 else [("off", off), ("on", on)]
            for name, (url, process) in order:
                results[name].append(measured(url, process, args.clients, per_round, args.max_tokens))
    with serve(args, args.on_action, 1) as (url, process):
        asyncio.run(load(url, 1, 2, args.max_tokens))
        sequential = measured(url, process, args.clients, args.sequential_requests, args.max_tokens)
    on_s, off_s, seq_s = summarise(results["on"]), summarise(results["off"]), summarise([sequential])
    pairs = [a / b for a, b in zip(on_s["round_tokens_per_s"], off_s["round_tokens_per_s"])]
    report = {
        "model": args.model or "organism",
        "probe": args.probe or "the known probe of the model",
        "on_action": args.on_action,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "guard_on": on_s,
        "guard_off": off_s,
        "one_by_one_guard_on": seq_s,
        "on_over_off_throughput": round(on_s["tokens_per_s"] / off_s["tokens_per_s"], 4),
        "on_over_off_per_round": [round(p, 4) for p in pairs],
        "on_over_off_median_round": round(statistics.median(pairs), 4),
        "server_cpu_off_over_on": cpu_ratio(on_s, off_s),
        "batched_over_one_by_one": round(on_s["tokens_per_s"] / seq_s["tokens_per_s"], 2),
    }
    print(json.dumps(report, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
