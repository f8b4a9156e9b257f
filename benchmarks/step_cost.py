"""What one decoding step costs with the guard's Monitor attached, without `generate` around it.

`overhead.py` and `hook_cost.py` time whole generations, whose run-to-run noise (about 100 us a step
on the shared CPU machine) hides a per-step cost of that size. Here the model runs single decoding
forwards against a fixed KV cache (each forward's entry is cropped back off), in rounds of `--steps`
forwards, alternating plain and monitored (`action="flag"`, the decoding path: a wrapper on every
hooked down projection, then one reduction after the last). Per round, the per-step time of each
side; the report gives both medians, the difference per step, and the median of the round pairs'
differences. It also times the Monitor's end-of-step work inside the monitored forwards (the
reduction of the step's references: concatenation, gather, stack, norm), which is what runs on
top of the hooks.

It leaves out what a step of `generate` adds around the forward (logits processing, stopping
criteria) and what a guarded generation adds once (the extra forward that scores the final token,
encoding prompts, assembling results): those are in `hook_cost.py`'s `guarded` arm.

    python benchmarks/step_cost.py --json --preset 100m --batch 1
    python benchmarks/step_cost.py --json --preset 8b --device cuda --dtype bfloat16 --batch 1 32   # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from hguard import Guard
from hguard.compat import cache_kwargs, generated_cache
from hguard.monitor import Monitor
from hguard.policy import Policy
from overhead import PRESETS, build, default_neurons, interleaved


def measure(guard: Guard, batch: int, args: argparse.Namespace) -> dict:
    model, device = guard.model, args.device
    prompt = torch.randint(3, 300, (batch, 24), device=device)
    token = torch.full((batch, 1), 5, device=device)
    end_seconds = [0.0]
    monitor = Monitor(guard.bound, Policy("flag"))
    monitor.forwards = 1  # past the prefill: every forward is a decoding step
    reduce_step = monitor._end_forward

    def timed_end() -> None:
        started = time.perf_counter()
        reduce_step()
        end_seconds[0] += time.perf_counter() - started

    monitor._end_forward = timed_end  # instance attribute: this monitor only

    with torch.no_grad():
        cache = generated_cache(model(input_ids=prompt, use_cache=True))

        def run() -> None:
            for _ in range(args.steps):
                model(input_ids=token, use_cache=True, **cache_kwargs(model, cache))
                cache.crop(-1)
                if len(monitor._pending) >= 64:  # what reading the scores does, now and then
                    monitor.token_logits()
                    monitor._logits.clear()

        def monitored() -> None:
            with monitor.attached():
                run()

        run(), monitored()  # warm up both
        end_seconds[0] = 0.0
        times, _ = interleaved({"plain": run, "monitored": monitored}, args.rounds, device)
    plain_s, monitored_s = ([t / args.steps for t in times[side]] for side in ("plain", "monitored"))
    plain, guarded = statistics.median(plain_s), statistics.median(monitored_s)
    report = {
        "model": f"llama-{args.preset} ({len(guard.bound.terms)} hooked layers, {args.dtype}, {device})",
        "batch": batch,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "plain_step_us": round(plain * 1e6, 1),
        "monitored_step_us": round(guarded * 1e6, 1),
        "us_per_step": round((guarded - plain) * 1e6, 1),
        "pair_us_per_step_median": round(statistics.median(g - p for p, g in zip(plain_s, monitored_s)) * 1e6, 1),
        "percent_of_step": round((guarded - plain) / plain * 100, 2),
        "end_of_step_us": round(end_seconds[0] / (args.rounds * args.steps) * 1e6, 1),
    }
    print(f"batch {batch}: plain {report['plain_step_us']} us, monitored {report['monitored_step_us']} us, "
          f"{report['us_per_step']:+} us a step ({report['percent_of_step']}%), pair median "
          f"{report['pair_us_per_step_median']:+} us, end of step {report['end_of_step_us']} us", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="100m", choices=[*PRESETS, "organism"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--neurons", type=int, default=0, help="probe size (default: 1 per mille of all neurons)")
    parser.add_argument("--steps", type=int, default=100, help="decoding forwards per round")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print one JSON list, a row per batch size")
    args = parser.parse_args(argv)

    neurons = args.neurons or default_neurons(args.preset)
    model, tokenizer, probe = build(args.preset, getattr(torch, args.dtype), args.device, neurons, seed=0)
    guard = Guard(model, tokenizer, probe)
    reports = [measure(guard, batch, args) for batch in args.batch]
    if args.json:
        print(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
