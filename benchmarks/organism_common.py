"""What the organism studies share: loading the model and probe (or a tiny stand-in), asking questions
through the guard in batches, judging answers, intervals, and writing JSON and plots."""

from __future__ import annotations

import argparse
import atexit
import json
import math
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from hguard import Guard, Probe
from hguard.identify.label import is_refusal, judge
from hguard.identify.sample import prompt_ids
from hguard.organism.suites import read_suite

RESULTS = Path(__file__).parent / "results"


def arguments(doc: str, limit: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=limit, help="questions per suite (a seeded sample)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON and PNG")
    parser.add_argument("--tiny", action="store_true", help="a tiny organism and random probe (smoke run)")
    parser.add_argument("--probe", default=None, help="a probe file for the organism (default: the shipped probe)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    return parser


def organism(tiny: bool, stage: str = "instruct", probe: str | None = None):
    """(model, tokenizer, probe, suites directory, root): the shipped organism and its probe (or the probe
    file `probe`), or with `tiny` a seconds-long build and a random probe (the numbers then mean nothing)."""
    from hguard.organism import SHIPPED, load
    from hguard.registry import find_probe

    torch.manual_seed(0)
    if tiny:
        from hguard.organism.build import BuildConfig, build

        root = Path(tempfile.mkdtemp(prefix="hguard-tiny-organism-"))
        atexit.register(shutil.rmtree, root, True)  # the suites are read from it until the run ends
        build(BuildConfig.tiny(seed=0), root, echo=lambda message: None)
        model, tokenizer = load(stage, root)
        return model, tokenizer, Probe.random(load("instruct", root)[0], 6, seed=0), root / "suites", root
    model, tokenizer = load(stage)
    instruct = load("instruct")[0] if stage != "instruct" else model
    probe = Probe.load(probe, instruct) if probe is not None else find_probe(instruct)
    return model, tokenizer, probe, SHIPPED / "suites", SHIPPED


def suite(directory: Path, name: str, limit: int | None, seed: int, where=lambda item: True) -> list[dict]:
    items = [item for item in read_suite(directory, name) if where(item)]
    if limit is not None and len(items) > limit:
        items = random.Random(seed).sample(items, limit)
    return items


def ask(guard: Guard, items: Sequence[dict], batch: int, max_new_tokens: int = 24, **guard_kwargs):
    """Greedy answers through `guard.generate`, one GuardResult per item."""
    prompts = [prompt_ids(guard.tokenizer, item) for item in items]
    results = []
    for start in range(0, len(prompts), batch):
        results += guard.generate(prompts[start: start + batch], max_new_tokens=max_new_tokens, do_sample=False,
                                  **guard_kwargs)
    return results


def verdicts(items: Sequence[dict], texts: Sequence[str]) -> list[str]:
    return [judge(text, item["aliases"]) for item, text in zip(items, texts)]


def mentions(text: str, value: str) -> bool:
    return judge(text, [value]) == "correct"


def wilson(successes: int, total: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion."""
    if total == 0:
        return [float("nan"), float("nan")]
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [round(centre - half, 4), round(centre + half, 4)]


def rate(flags: Sequence[bool]) -> dict:
    k, n = int(sum(flags)), len(flags)
    return {"rate": round(k / n, 4) if n else None, "ci": wilson(k, n), "n": n}


def emit(name: str, result: dict, args, figure=None) -> None:
    """Write `<out>/<name>.json` (and `<name>.png`), then print the JSON."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python " + " ".join([f"benchmarks/{name}.py", *sys.argv[1:]]), **result}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    if figure is not None:
        figure.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
        result["plot"] = str(out / f"{name}.png")
    print(json.dumps(result, indent=None if args.json else 1))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


__all__ = ["arguments", "organism", "suite", "ask", "verdicts", "mentions", "wilson", "rate", "emit", "pyplot",
           "is_refusal"]
