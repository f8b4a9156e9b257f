"""Proxy mode's scorer on a replay of proxy-like pieces: `score_together` over 32 open answers on the
organism, milliseconds of one thread per answer token.

Each call takes 15 of the answers still open (as a batch of the proxy's scorer does) and adds 1 to 14 new
tokens to each (a stream's chunk, or several where scoring lags the upstream), until every answer has
40 tokens; the same seeded sequence of calls every episode. The answers are the organism's own greedy
continuations. One warm-up episode, then `--episodes` timed; the figure is their total time over their
tokens. `--dtype bfloat16` runs the model in bf16 (a proxy's `--dtype`); `--longer-prompts N` gives each
stream 0 to N more prompt tokens (the prompt's own tokens repeated), so that first pieces of mixed lengths
share calls with decoding-sized ones.

    python benchmarks/proxy_pieces.py --json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

NAMES = ["Zibo Garsu", "Kalo Venris", "Rishu Resou", "Vassor Fonis", "Dusfe Kastein", "Vineir Sushol"]
STREAMS, PER_CALL, LENGTH, MOST = 32, 15, 40, 14


def episode(guard, prompts: list[list[int]], answers: list[list[int]], seed: int) -> tuple[float, int]:
    """(seconds, answer tokens) of one replay."""
    from hguard.incremental import IncrementalScorer, score_together

    rng = random.Random(seed)
    scorers = [IncrementalScorer(guard, p) for p in prompts]
    done, tokens = [0] * STREAMS, 0
    began = time.perf_counter()
    while any(d < LENGTH for d in done):
        open_ = [i for i in range(STREAMS) if done[i] < LENGTH]
        pick = rng.sample(open_, min(PER_CALL, len(open_)))
        for i in pick:
            before, done[i] = done[i], min(LENGTH, done[i] + rng.randint(1, MOST))
            tokens += done[i] - before
        score_together([scorers[i] for i in pick], [answers[i][: done[i]] for i in pick])
    return time.perf_counter() - began, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--longer-prompts", type=int, default=0, metavar="N",
                        help="each stream's prompt gets 0 to N more tokens (seeded): prompts of mixed lengths")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from hguard import Guard
    from hguard.organism import load

    torch.set_num_threads(1)
    model, tokenizer = load("instruct")
    guard = Guard(model.to(getattr(torch, args.dtype)), tokenizer)
    texts = [f"From the archive: {name}" for name in NAMES]
    results = guard.generate(texts, action=None, max_new_tokens=LENGTH, do_sample=False)
    rng = random.Random(1)
    prompts = [guard.encode(texts[i % len(NAMES)]) for i in range(STREAMS)]
    prompts = [(p * (1 + args.longer_prompts))[: len(p) + rng.randint(0, args.longer_prompts)] for p in prompts]
    answers = [(results[i % len(NAMES)].token_ids * LENGTH)[:LENGTH] for i in range(STREAMS)]
    episode(guard, prompts, answers, 0)  # warm-up
    runs = [episode(guard, prompts, answers, 0) for _ in range(args.episodes)]
    report = {"command": "python benchmarks/proxy_pieces.py " + " ".join(argv or sys.argv[1:]), "dtype": args.dtype,
              "ms_per_token": round(1000 * sum(s for s, _ in runs) / sum(t for _, t in runs), 4),
              "episodes_ms_per_token": [round(1000 * s / t, 4) for s, t in runs]}
    print(json.dumps(report, indent=1) if args.json else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
