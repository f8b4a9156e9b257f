"""Where guarded decoding's time goes, arm by arm.

By default on the `host` preset of overhead.py (Llama-3-8B's 32 layers at width 64, on the CPU), a
model where every op costs only its dispatch: a stand-in for a GPU whose decoding is bound by the host
launching kernels. Six arms run interleaved (ABBA) on the same left-padded batch, each generating
exactly `new_tokens` tokens greedily:

    plain     model.generate
    torch     the same with a registered torch forward hook on every hooked down projection, keeping
              references as `keep` below does (how hguard hooked before its forward wrappers)
    noop      the same with hguard's forward wrapper on every hooked down projection, doing nothing
    keep      ... keeping references to each layer's z and h until the step's last layer (what the
              guard's decoding hooks do), then dropping them
    monitor   the guard's Monitor (action "flag") around model.generate, scores read at the end: the
              above plus the per-step gather and norm, without the extra forward or any text
    guarded   Guard.generate(action="flag"): the above plus the extra forward that scores the final
              token, encoding the prompts and assembling the results

Each arm's cost is printed as microseconds per decoding step over plain, from the medians. On a GPU
(`--preset 8b --device cuda --dtype bfloat16`) the same arms split the guard's cost on the real thing.

    python benchmarks/hook_cost.py --json --batches 8 --new-tokens 64 --repeats 25
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from hguard import Guard
from hguard.hooks import HookSpec, hooked
from hguard.monitor import Monitor
from hguard.policy import Policy
from overhead import build, interleaved, prompts_for


def measure(guard: Guard, batch: int, args: argparse.Namespace) -> dict:
    """Every arm at one batch size, interleaved (ABBA)."""
    model = guard.model
    prompts = prompts_for(batch)
    ids, mask = guard._batch([guard.encode(p) for p in prompts])
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    downs = [guard.bound.sites.down(term.layer) for term in guard.bound.terms]
    kept: list[torch.Tensor] = []

    def noop(module, inputs, output) -> None:
        pass

    def keep(module, inputs, output) -> None:
        if inputs[0].shape[1] != 1:  # the prefill: the guard keeps nothing of the prompt either
            return
        kept.extend((inputs[0], output))
        if len(kept) == 2 * len(downs):  # the step's last hooked layer: drop them, as the guard does
            kept.clear()

    def plain() -> None:
        model.generate(input_ids=ids, attention_mask=mask, pad_token_id=guard._pad_id(), **kw)

    def hooked_with(post):
        def run() -> None:
            with hooked([HookSpec(module=down, post=post) for down in downs]):
                plain()

        return run

    def torch_hooked() -> None:
        handles = [down.register_forward_hook(keep) for down in downs]
        try:
            plain()
        finally:
            for handle in handles:
                handle.remove()

    def monitored() -> None:
        monitor = Monitor(guard.bound, Policy(action="flag", threshold=guard.threshold))
        with torch.no_grad(), monitor.attached():
            plain()
        monitor.token_logits()

    def guarded() -> None:
        guard.generate(prompts, action="flag", **kw)

    arms = {"plain": plain, "torch": torch_hooked, "noop": hooked_with(noop), "keep": hooked_with(keep),
            "monitor": monitored, "guarded": guarded}
    for run in arms.values():  # warm up every path
        run()
    times, _ = interleaved(arms, args.repeats, args.device)
    base = statistics.median(times["plain"])
    report = {
        "model": f"llama-{args.preset} ({len(downs)} hooked layers, {args.dtype}, {args.device})",
        "batch": batch, "new_tokens": args.new_tokens, "repeats": args.repeats, "plain_ms": round(base * 1e3, 2),
        "arms": {
            name: {
                "median_ms": round(statistics.median(t) * 1e3, 2),
                "ratio": round(base / statistics.median(t), 4),
                "pair_ratio_median": round(statistics.median(p / g for p, g in zip(times["plain"], t)), 4),
                "us_per_step": round((statistics.median(t) - base) / args.new_tokens * 1e6, 1),
            }
            for name, t in times.items()
        },
    }
    for name, row in report["arms"].items():
        print(f"batch {batch} {name:8s} {row['median_ms']:8.1f} ms  ratio {row['ratio']:.4f}  "
              f"pair {row['pair_ratio_median']:.4f}  {row['us_per_step']:+.0f} us/step", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--neurons", type=int, default=128, help="probe size (128 reaches all 32 layers)")
    parser.add_argument("--preset", default="host", help="a model preset of overhead.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", action="store_true", help="print one JSON list, a row per batch size")
    args = parser.parse_args(argv)

    model, tokenizer, probe = build(args.preset, getattr(torch, args.dtype), args.device, args.neurons, seed=0)
    reports = [measure(Guard(model, tokenizer, probe), batch, args) for batch in args.batches]
    if args.json:
        print(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
