"""Cost of the identification pipeline's features and fit against the number of responses.

For each size N, a fresh process featurises N organism responses (CETT of every neuron, the batched
teacher-forced pass of `hguard.identify.features.extract`, written to disk in chunks) and fits the
probe (the rows of the fit's target, whole responses by default or the answer tokens' "3 vs 1" rows,
and the pipeline's selection: the sweep of class-weighted L1 fits over C, bisected up to the 1% neuron
budget). It reports the wall time of each
stage and the process's peak resident memory above what it held once the model was loaded (from
getrusage, so torch's allocations count). Responses are the gold answer for half the questions and a
wrong value for the other half, so both classes exist; sampling is not part of this cost.

    python benchmarks/identify_cost.py --json                 # sizes 250 500 1000 2000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time


def one(size: int, batch: int, target: str) -> dict:
    import numpy as np
    import torch

    from hguard.identify.features import Example, extract, read_chunks
    from hguard.identify.fit import question_weights, row_weights, select, training_set, whole_response
    from hguard.identify.pipeline import DEFAULT_CS
    from hguard.identify.sample import prompt_ids
    from hguard.organism import SHIPPED, load
    from hguard.organism.suites import read_suite

    torch.manual_seed(0)
    model, tokenizer = load("instruct")
    items = random.Random(0).sample(read_suite(SHIPPED / "suites", "in_domain"), size)
    examples, labels = [], []
    for i, item in enumerate(items):
        value = item["answer"] if i % 2 == 0 else item["candidates"][i % len(item["candidates"])]
        response = f"{value}."
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        examples.append(Example(str(item["id"]), prompt_ids(tokenizer, item), ids, list(range(len(ids) - 1)) or [0]))
        labels.append(i % 2)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        paths = extract(model, examples, tokenizer.pad_token_id, work, batch=batch, progress=False)
        features_s = time.perf_counter() - start
        answer = np.concatenate([a.numpy() for _, a, _ in read_chunks(paths)])
        other = np.concatenate([o.numpy() for _, _, o in read_chunks(paths)])
    y = np.array(labels)
    start = time.perf_counter()
    lengths = np.array([len(e.response_ids) for e in examples])
    spans = np.array([len(e.answer_tokens) for e in examples])
    whole = whole_response(answer, other, spans, lengths - spans)
    x, xy = training_set(target, answer, other, whole, y)
    weights = row_weights(target, question_weights(y, "weight"), other)
    rows, _, _ = select(x, xy, whole if target == "response" else answer, y, DEFAULT_CS,
                        int(0.01 * answer.shape[1]), weights)
    fit_s = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"responses": size, "target": target, "neurons": int(answer.shape[1]), "features_s": round(features_s, 2),
            "features_per_s": round(size / features_s, 1), "fit_s": round(fit_s, 2), "fits": len(rows),
            "fit_rows": int(x.shape[0]), "peak_mb_above_model": round((peak_kb - base_kb) / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--target", choices=("response", "answer"), default="response", help="the fit's target")
    parser.add_argument("--json", action="store_true", help="print only the JSON list")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.batch, args.target)))
        return 0
    rows = []
    for size in args.sizes:  # one process per size: peak memory is per process
        result = subprocess.run([sys.executable, __file__, "--one", str(size), "--batch", str(args.batch),
                                 "--target", args.target],
                                capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        if not args.json:
            print(rows[-1], file=sys.stderr)
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
