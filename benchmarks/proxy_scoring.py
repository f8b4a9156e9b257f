"""Proxy-mode scoring of a streamed answer: re-scoring the whole text at every chunk against the
incremental scorer (KV cache, each token run once), on the organism, one chunk per token, interleaved.

    python benchmarks/proxy_scoring.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

NAMES = ["Zibo Garsu", "Kalo Venris", "Rishu Resou", "Vassor Fonis", "Dusfe Kastein", "Vineir Sushol"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=240, help="length of the streamed answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from hguard import Guard
    from hguard.incremental import IncrementalScorer
    from hguard.organism import load

    model, tokenizer = load("instruct")
    guard = Guard(model, tokenizer)
    prompt = f"From the archive: {NAMES[0]}"
    # a long answer in the organism's own words: several biographies it writes, joined
    results = guard.generate([f"From the archive: {n}" for n in NAMES], action=None, max_new_tokens=60, do_sample=False)
    ids = [t for r in results for t in r.token_ids][: args.tokens]
    texts = [tokenizer.decode(ids[: i + 1], skip_special_tokens=True) for i in range(len(ids))]

    def rescore() -> int:
        return sum(len(guard.score(prompt, text).token_ids) + len(guard.encode(prompt)) for text in texts if text)

    def incremental() -> int:
        scorer = IncrementalScorer(guard, prompt)
        for text in texts:
            scorer.score(text)
        return scorer.forwarded

    times: dict[str, list[float]] = {"rescore": [], "incremental": []}
    positions = {}
    for r in range(args.repeats):
        for name, run in ((("rescore", rescore), ("incremental", incremental)) if r % 2 == 0
                          else (("incremental", incremental), ("rescore", rescore))):
            start = time.perf_counter()
            positions[name] = run()
            times[name].append(time.perf_counter() - start)
    report = {
        "answer_tokens": len(ids), "chunks": len(texts), "repeats": args.repeats,
        "rescore_s": round(statistics.median(times["rescore"]), 3),
        "incremental_s": round(statistics.median(times["incremental"]), 3),
        "speedup": round(statistics.median(times["rescore"]) / statistics.median(times["incremental"]), 2),
        "positions_run": positions,
        "command": "python benchmarks/proxy_scoring.py --json",
    }
    print(json.dumps(report, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
