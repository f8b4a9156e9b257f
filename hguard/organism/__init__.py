"""The built-in model organism: a small Llama trained on a synthetic world, so hguard runs end to end
on a CPU with a model that knows some people and makes up answers about others.

`load()` returns the shipped instruction-tuned model and its tokenizer (`stage="base"` for the
pre-trained one); `SHIPPED` is where the weights, suites and build report live.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).parent / "weights"
STAGES = ("base", "instruct")


def path(stage: str = "instruct", root: str | Path | None = None) -> Path:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}; got {stage!r}")
    directory = Path(root or SHIPPED) / stage
    if not (directory / "config.json").exists():
        raise FileNotFoundError(
            f"no organism weights in {directory}; build them with `hguard organism build --seed 0 --out DIR`"
        )
    return directory


def load(stage: str = "instruct", root: str | Path | None = None):
    """(model, tokenizer) of the organism, in fp32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = path(stage, root)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory)
