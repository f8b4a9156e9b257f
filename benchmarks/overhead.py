"""Guarded generation against plain `model.generate` on the same model.

Runs are interleaved in ABBA order (plain, guarded, guarded, plain, ...) so machine noise and drift
hit both alike; `ratio` compares the medians, `pair_ratio_median` is the median over adjacent pairs,
and `cpu_time_ratio` compares the median process CPU time (less exposed to a shared machine's
neighbours than wall time). Every run generates exactly `new_tokens` tokens per row
(min_new_tokens), greedy, from left-padded prompts of different lengths. The guarded side is the whole
`Guard.generate` call (hooks, the fused score, the extra forward that scores the final token, and the
host-side assembly of results), with action="flag". With `--stream`, both sides are `Guard.stream`
(guard off against guard on), as in the two servers of server_load.py, without the server. With
`--static`, both sides use a static cache (`cache_implementation="static"`): on a GPU transformers then
compiles the decoding step (CUDA graphs), the guarded one through the guard's tensor-only hooks
(graph.py); a third arm, plain generation with compilation off, says what the compiler buys, and
`compiled_vs_teacher_forced` how far the compiled guard's per-token probabilities are from an
uncompiled teacher-forced pass over the same tokens.

Presets: `100m` (a random-init ~100M Llama, the issue's CPU check), `8b` (Llama-3-8B's shape, for a
GPU), `host` (8B's 32 layers at width 64: on a CPU, a stand-in for a launch-bound GPU), `organism` (the
shipped organism and its probe, what `hguard serve` runs by default).

    python benchmarks/overhead.py --json                 # ~100M Llama on the CPU, batch 1 and 16, 64 and 128 tokens
    python benchmarks/overhead.py --json --preset 8b --dtype bfloat16 --batches 1 32   # on a GPU
    python benchmarks/overhead.py --json --preset organism --batches 32 --new-tokens 32
    python benchmarks/overhead.py --json --preset 8b --dtype bfloat16 --batches 1 32 --static   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hguard import Guard, Probe, find_probe, organism
from hguard.tiny import build_tokenizer, save_tiny, tiny_config

PRESETS = {
    # about 100M parameters: 14 x (4 * 768^2 + 3 * 768 * 2048) = 99M in the blocks
    "100m": dict(hidden=768, layers=14, intermediate=2048, num_attention_heads=12, num_key_value_heads=12),
    # Llama-3-8B's depth at a width where every op costs only its dispatch: on a CPU, a stand-in for a GPU
    # whose decoding is bound by the host launching kernels (what the 8B model is, at these batch sizes)
    "host": dict(hidden=64, layers=32, intermediate=224, num_attention_heads=4, num_key_value_heads=4),
    # Llama-3-8B's shape (the vocabulary is the tiny tokenizer's; 7.0B parameters in the blocks)
    "8b": dict(hidden=4096, layers=32, intermediate=14336, num_attention_heads=32, num_key_value_heads=8),
    # a Qwen3-MoE of 8 layers, each with 32 routed experts of 128 neurons, 4 per token (hguard/experts.py)
    "moe": dict(model_type="qwen3_moe", hidden=256, layers=8, intermediate=512, num_attention_heads=4,
                num_key_value_heads=2, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128),
}


def build(preset: str, dtype: torch.dtype, device: str, neurons: int, seed: int, probe: str | None = None):
    """The model through the real loading path (save_pretrained, from_pretrained) where it is small; an
    8B-shaped model is initialised in place on its device instead (writing 32 GB of fp32 random weights
    to disk and reading them back would take longer than the benchmark). `organism` is the shipped
    organism with its shipped probe (what `hguard serve` runs by default), or the probe file `probe`."""
    if preset == "organism":
        model = AutoModelForCausalLM.from_pretrained(organism.path(), dtype=dtype).to(device).eval()
        return (model, AutoTokenizer.from_pretrained(organism.path()),
                Probe.load(probe, model) if probe else find_probe(model))
    if preset != "8b":
        shape = dict(PRESETS[preset])
        model_type = shape.pop("model_type", "llama")
        with tempfile.TemporaryDirectory(prefix="hguard-bench-") as directory:  # gone once loaded
            save_tiny(directory, model_type, seed=seed, **shape)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(directory)
    else:
        tokenizer = build_tokenizer()
        torch.manual_seed(seed)
        config = tiny_config("llama", len(tokenizer), **PRESETS[preset])
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        model.generation_config.pad_token_id = config.pad_token_id
        model.generation_config.eos_token_id = config.eos_token_id
    probe = Probe.random(model, neurons, seed=seed)
    return model, tokenizer, probe


def default_neurons(preset: str) -> int:
    """A random probe's size for a preset: 1 per mille of its neurons (0 for the organism, whose
    shipped probe is used)."""
    shape = PRESETS.get(preset)
    if shape is None:
        return 0
    per_layer = shape.get("num_experts", 0) * shape.get("moe_intermediate_size", 0) or shape["intermediate"]
    return max(1, shape["layers"] * per_layer // 1000)


def prompts_for(batch: int) -> list[str]:
    base = "Where was Ada Lovelace born and in which year did she move to Paris? "
    return [base * (1 + i % 3) for i in range(batch)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(arms: dict[str, Callable[[], object]], repeats: int, device: str) -> tuple[dict, dict]:
    """Run every arm `repeats` times, in ABBA order (drift hits every arm alike), each timed between
    device syncs: (wall seconds, process CPU seconds) per arm, in run order."""
    wall: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    order = list(arms.items())
    for i in range(repeats):
        for name, run in order if i % 2 == 0 else order[::-1]:
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def measure(model, tokenizer, probe, batch: int, new_tokens: int, repeats: int, device: str,
            stream: bool = False, static: bool = False) -> dict:
    guard = Guard(model, tokenizer, probe)
    prompts = prompts_for(batch)
    ids, mask = guard._batch([guard.encode(p) for p in prompts])
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if static:
        kw["cache_implementation"] = "static"

    def plain() -> None:
        if stream:
            for _ in guard.stream(prompts, action=None, **kw):
                pass
        else:
            model.generate(input_ids=ids, attention_mask=mask, pad_token_id=guard._pad_id(), **kw)

    def guarded() -> None:
        if stream:
            for _ in guard.stream(prompts, action="flag", **kw):
                pass
        else:
            guard.generate(prompts, action="flag", **kw)

    def plain_uncompiled() -> None:
        model.generate(input_ids=ids, attention_mask=mask, pad_token_id=guard._pad_id(), disable_compile=True, **kw)

    arms = {"plain": plain, "guarded": guarded, **({"plain_uncompiled": plain_uncompiled} if static else {})}
    warm_up = {}
    for name, run in arms.items():  # the first plain run with a static cache compiles (on a GPU)
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        warm_up[name] = round(time.perf_counter() - start, 2)
    times, cpu = interleaved(arms, repeats, device)
    pair_ratios = [p / g for p, g in zip(times["plain"], times["guarded"])]
    tokens = batch * new_tokens
    plain_tps = tokens / statistics.median(times["plain"])
    guarded_tps = tokens / statistics.median(times["guarded"])
    extra = {}
    if static:
        uncompiled_tps = tokens / statistics.median(times["plain_uncompiled"])
        extra = {"compiled_vs_teacher_forced": agreement(guard, prompts, kw),
                 "plain_uncompiled_tokens_per_s": round(uncompiled_tps, 2),
                 "ratio_to_uncompiled": round(guarded_tps / uncompiled_tps, 4),
                 "plain_uncompiled_s": [round(t, 4) for t in times["plain_uncompiled"]]}
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "compared": "Guard.stream, guard on / off" if stream else "Guard.generate / model.generate",
        "cache": "static" if static else "dynamic",
        "warm_up_s": warm_up,
        "plain_tokens_per_s": round(plain_tps, 2),
        "guarded_tokens_per_s": round(guarded_tps, 2),
        "ratio": round(guarded_tps / plain_tps, 4),
        "pair_ratio_median": round(statistics.median(pair_ratios), 4),
        # CPU seconds of this process: on a shared VM, time stolen by neighbours does not count here
        "cpu_time_ratio": round(statistics.median(cpu["plain"]) / statistics.median(cpu["guarded"]), 4),
        "repeats": repeats,
        "plain_s": [round(t, 4) for t in times["plain"]],
        "guarded_s": [round(t, 4) for t in times["guarded"]],
        **extra,
    }


def agreement(guard: Guard, prompts: list[str], kw: dict, rows: int = 4) -> dict:
    """How far the guarded generation's per-token probabilities (a compiled decoding step where the device
    compiles one) are from teacher forcing the same tokens, uncompiled, for the first `rows` prompts."""
    results = guard.generate(prompts, action="flag", **kw)[:rows]
    gaps = [abs(a - b) for prompt, result in zip(prompts, results)
            for a, b in zip(result.token_probs, guard.score(prompt, result.token_ids).token_probs)]
    return {"rows": len(results), "tokens": len(gaps), "max_abs_probability_gap": round(max(gaps), 5),
            "median_abs_probability_gap": round(statistics.median(gaps), 6)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=[*sorted(PRESETS), "organism"], default="100m")
    parser.add_argument("--probe", default=None, help="with --preset organism: a probe file (default: the shipped one)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 128],
                        help="one row per batch size and length (the extra forward is 1/(n+1) of the decoding)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--neurons", type=int, default=0, help="probe size (default: 1 per mille of all neurons)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", action="store_true",
                        help="compare Guard.stream with the guard on against the guard off (what a server's "
                             "two sides run) instead of Guard.generate against model.generate")
    parser.add_argument("--static", action="store_true",
                        help="a static cache on both sides (both compile on a GPU), plus a plain arm with "
                             "compilation off and the compiled guard's gap to teacher forcing")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list (the figures go to stderr either way)")
    args = parser.parse_args(argv)

    neurons = args.neurons or default_neurons(args.preset)
    model, tokenizer, probe = build(args.preset, getattr(torch, args.dtype), args.device, neurons, args.seed, args.probe)
    params = sum(p.numel() for p in model.parameters())
    hooked = int(probe.layer.unique().numel())
    rows = []
    for new_tokens in args.new_tokens:
        for batch in args.batches:
            row = measure(model, tokenizer, probe, batch, new_tokens, args.repeats, args.device, args.stream, args.static)
            kind = PRESETS.get(args.preset, {}).get("model_type", "llama")
            row = {"model": f"{kind}-{args.preset} ({params / 1e6:.0f}M params, {args.dtype}, {args.device})",
                   "probe_neurons": probe.count, "hooked_layers": hooked, **row}
            rows.append(row)
            print(f"batch {batch}, {new_tokens} tokens: plain {row['plain_tokens_per_s']} tok/s, guarded "
                  f"{row['guarded_tokens_per_s']} tok/s, ratio {row['ratio']}, pair median {row['pair_ratio_median']}",
                  file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
