"""What recording metrics costs, per generated token, against what generating that token costs.

The server records per token (time to first token or inter-token latency, the token's hallucination
probability) and per request (outcome counters, latency, prompt tokens). This times exactly those
recording calls on a Metrics instance, many times over, and divides by the time the organism takes
to generate a token in a real batched run measured in the same process (Guard.generate, batch 32,
32 new tokens). Prints one JSON object.

    python benchmarks/metrics_cost.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from hguard.metrics import Metrics
from hguard.results import GuardResult
from hguard.server.engine import Job, Settings, Timing


def recording_seconds_per_token(tokens_per_request: int = 32, requests: int = 2000) -> float:
    metrics = Metrics("bench")
    loop = asyncio.new_event_loop()
    settings = Settings(1.0, 1.0, (), None, "flag", None, None)
    jobs = [Job(rows=[[1, 2, 3]], max_new_tokens=tokens_per_request, settings=settings, loop=loop)
            for _ in range(requests)]
    result = GuardResult("text", list(range(tokens_per_request)), [0.3 + 0.01 * i for i in range(tokens_per_request)],
                         0.42, "flagged", "length", "flag")
    start = time.perf_counter()
    for job in jobs:
        job.started = job.enqueued
        timing = Timing(metrics, [job])
        for _ in range(tokens_per_request):
            timing.token(job)
        timing.result(job, result, 0.5)
        metrics.labels(metrics.requests, endpoint="chat", status="200", action="flag", verdict="flagged").inc()
        metrics.labels(metrics.prompt_tokens).inc(3)
        metrics.labels(metrics.request_latency).observe(0.5)
        metrics.labels(metrics.probe_step).observe(1e-4)
    loop.close()
    return (time.perf_counter() - start) / (requests * tokens_per_request)


def generation_seconds_per_token(batch: int = 32, new_tokens: int = 32) -> float:
    from hguard import Guard
    from hguard.organism import load

    model, tokenizer = load()
    guard = Guard(model, tokenizer)
    prompts = [f"From the archive: person {i}" for i in range(batch)]
    guard.generate(prompts, max_new_tokens=4)
    start = time.perf_counter()
    results = guard.generate(prompts, max_new_tokens=new_tokens, do_sample=False)
    return (time.perf_counter() - start) / sum(len(r.token_ids) for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.parse_args(argv)
    recording = min(recording_seconds_per_token() for _ in range(3))
    generation = generation_seconds_per_token()
    print(json.dumps({"recording_us_per_token": round(recording * 1e6, 3),
                      "generation_us_per_token": round(generation * 1e6, 1),
                      "recording_share_of_generation": round(recording / generation, 5)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
