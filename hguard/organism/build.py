"""`hguard organism build`: world -> text -> tokenizer -> base model -> instruct model -> suites -> report.

Everything follows from the seed. Each stage writes its result to the output directory before the
next starts, and a rerun with `resume=True` skips stages whose output exists, so a long build that was
interrupted goes on where it stopped. Models are saved with `save_pretrained` (safetensors, bf16 by
default to keep the shipped package small; they are loaded back in fp32 for use).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch

from .corpus import Split, instruction_examples, pretraining_documents
from .suites import build_suites, write_suites
from .tokenizer import END, train_tokenizer
from .train import ModelShape, Schedule, chat_rows, document_rows, train
from .world import World, WorldConfig, build_world


@dataclass
class BuildConfig:
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    shape: ModelShape = field(default_factory=lambda: ModelShape(hidden=256, layers=6, heads=8, intermediate=1024))
    vocab_size: int = 4096  # frequent names become few whole-word tokens, as in real tokenizers
    qa_per_pair: int = 3  # question-answer documents per asked (person, attribute) in pre-training
    abstain_docs: int = 1500  # "I don't know" documents about never-seen names in pre-training
    chat_share: float = 0.5  # share of pre-training question-answer documents written in chat format
    base: Schedule = field(default_factory=lambda: Schedule(steps=1200, lr=3e-3, batch=32, warmup=100))
    instruct_per_pair: int = 3
    abstain_share: float = 0.05  # "I don't know" share of instruction tuning (more: the tail abstains instead of hallucinating)
    instruct_answers: str = "after_a_word"  # answer templates of instruction tuning (corpus.ANSWER_STYLES)
    replay: float = 2.0  # pre-training rows mixed into instruction tuning, per chat row (against forgetting)
    instruct: Schedule = field(default_factory=lambda: Schedule(steps=250, lr=3e-4, batch=32, warmup=20))
    save_dtype: str = "bfloat16"

    def updated(self, overrides: dict) -> "BuildConfig":
        """A copy with `overrides` applied; nested dataclasses take dicts ({"base": {"steps": 10}})."""
        return _updated(self, overrides, "config")

    @classmethod
    def tiny(cls, seed: int = 0) -> "BuildConfig":
        """A configuration that builds in seconds, for tests of the pipeline (not a useful organism)."""
        return cls(
            seed=seed,
            world=WorldConfig(seed=seed, head=12, mid=8, tail=8, unseen=8, abstain_names=6, fabricated_names=6),
            shape=ModelShape(hidden=32, layers=2, heads=2, intermediate=64, context=128),
            vocab_size=400,
            abstain_docs=12,
            base=Schedule(steps=20, lr=3e-3, batch=8, warmup=5),
            instruct=Schedule(steps=10, lr=1e-3, batch=8, warmup=2),
            save_dtype="float32",
        )


def _updated(obj, overrides: dict, where: str):
    known = {f.name: f for f in fields(obj)}
    changes = {}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"{where} has no field {key!r}; known: {sorted(known)}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key} takes an object of fields; got {value!r}")
            value = _updated(current, value, f"{where}.{key}")
        elif isinstance(current, tuple):
            value = tuple(value)
        changes[key] = value
    return replace(obj, **changes)


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def build(config: BuildConfig, out: str | Path, resume: bool = False, echo=print, device: str = "cpu") -> Path:
    """Build the organism into `out` (base/, instruct/, suites/, world.json, build.json), training on
    `device` (the schedule is the same on any device; the weights differ by rounding)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    start = time.time()
    config.world.seed = config.seed
    world = build_world(config.world)
    split = Split.of(world)
    (out / "world.json").write_text(json.dumps(world.summary(), indent=1))
    docs = pretraining_documents(world, split, config.qa_per_pair, config.abstain_docs, seed=config.seed,
                                 chat_share=config.chat_share)
    counts = write_suites(build_suites(world, split, seed=config.seed), out / "suites")
    echo(f"world: {len(world.people)} people, {len(docs)} documents; suites {counts}")

    from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

    base_dir, instruct_dir = out / "base", out / "instruct"
    if resume and (base_dir / "model.safetensors").exists():
        echo("base: resumed from disk")
    else:
        tokenizer = train_tokenizer(docs, config.vocab_size)
        end_id = tokenizer.convert_tokens_to_ids(END)
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(config.shape.config(tokenizer, end_id)).to(device)
        ids, labels = document_rows(docs, tokenizer, config.shape.context)
        echo(f"base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {ids.shape[0]} rows "
             f"of {config.shape.context} tokens, {config.base.steps} steps")
        train(model, ids, labels, config.base, seed=config.seed,
              log=lambda r: (_log(log_path, {"stage": "base", **r}), echo(f"base {r}")))
        _save(model, tokenizer, base_dir, config.save_dtype)
    # instruction tuning always starts from the saved base (rounded to save_dtype), so a build from
    # scratch and one resumed from its base give the same instruct model
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    examples = instruction_examples(world, split, config.instruct_per_pair, config.abstain_share, config.seed + 1,
                                    config.instruct_answers)
    ids, labels = chat_rows(examples, tokenizer, config.shape.context, END)
    echo(f"instruct: {len(examples)} chat examples in {ids.shape[0]} rows, {config.instruct.steps} steps")
    if config.replay > 0:
        doc_ids, doc_labels = document_rows(docs, tokenizer, config.shape.context)
        generator = torch.Generator().manual_seed(config.seed + 2)
        take = torch.randperm(doc_ids.shape[0], generator=generator)[: int(config.replay * ids.shape[0])]
        ids, labels = torch.cat([ids, doc_ids[take]]), torch.cat([labels, doc_labels[take]])
    train(model, ids, labels, config.instruct, seed=config.seed + 1,
          log=lambda r: (_log(log_path, {"stage": "instruct", **r}), echo(f"instruct {r}")))
    _save(model, tokenizer, instruct_dir, config.save_dtype)
    summary = {"config": asdict(config), "build_seconds": round(time.time() - start, 1),
               "torch": torch.__version__, "device": _device_name(device), "documents": len(docs),
               "chat_examples": len(examples), "suites": counts}
    (out / "build.json").write_text(json.dumps(summary, indent=1, default=str))
    return out


def _device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return str(device)


def _save(model, tokenizer, directory: Path, dtype: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    copy.to(getattr(torch, dtype)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_world(seed: int, config: WorldConfig | None = None) -> tuple[World, Split]:
    config = config or WorldConfig(seed=seed)
    config.seed = seed
    world = build_world(config)
    return world, Split.of(world)
