"""How fast each sampler draws identify's consistency samples: transformers' `generate` (sample.sample)
against vLLM's offline engine (sample_vllm.VllmSampler), on the same questions, in alternating rounds.

Each round times both on the first `--questions` questions of a suite (10 samples each, the paper's
settings). vLLM's time is reported whole (engine start-up included, as identify pays it once per
call) and without its start-up. Run it where vLLM is installed (its venv):

    VLLM_CPU_KVCACHE_SPACE=2 /work/venv-vllm/bin/python benchmarks/sampler_speed.py --json
    ... --model runs/organism-v7x4/instruct --suite runs/organism-v7x4/suites/in_domain.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved model's directory (default: the organism)")
    parser.add_argument("--suite", default=None, help="a suite's JSONL (default: the organism's in_domain)")
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hguard.identify.sample import sample
    from hguard.identify.sample_vllm import VllmSampler
    from hguard.organism import SHIPPED, path

    model_dir = args.model or str(path("instruct"))
    suite = args.suite or str(SHIPPED / "suites" / "in_domain.jsonl")
    items = [json.loads(line) for line in open(suite)][: args.questions]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    class Timed(VllmSampler):
        def __call__(self, *a, **kw):
            from vllm import LLM

            started = {}
            real = LLM.generate

            def generate(llm, *ga, **gkw):
                started["at"] = time.perf_counter()
                return real(llm, *ga, **gkw)

            LLM.generate = generate
            try:
                return super().__call__(*a, **kw)
            finally:
                LLM.generate = real
                self.generate_started = started.get("at")

    vllm = Timed(model_dir, engine_args={"max_model_len": 256})
    rounds = []
    for _ in range(args.rounds):
        began = time.perf_counter()
        hf_answers = sample(model, tokenizer, items, samples=10)
        hf = time.perf_counter() - began
        began = time.perf_counter()
        vllm_answers = vllm(tokenizer, items, samples=10)
        ended = time.perf_counter()
        rounds.append({"hf_s": round(hf, 1), "vllm_s": round(ended - began, 1),
                       "vllm_without_start_s": round(ended - vllm.generate_started, 1),
                       "hf_answer_chars": sum(len(a) for q in hf_answers for a in q),
                       "vllm_answer_chars": sum(len(a) for q in vllm_answers for a in q)})
    report = {"command": "python benchmarks/sampler_speed.py " + " ".join(argv or sys.argv[1:]),
              "model": model_dir, "questions": len(items), "samples": 10, "threads": torch.get_num_threads(),
              "rounds": rounds,
              "median_hf_over_vllm": round(statistics.median(r["hf_s"] / r["vllm_s"] for r in rounds), 2),
              "median_hf_over_vllm_without_start": round(statistics.median(
                  r["hf_s"] / r["vllm_without_start_s"] for r in rounds), 2)}
    print(json.dumps(report, indent=1) if args.json else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
