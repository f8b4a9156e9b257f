"""`hguard organism build`: world -> text -> tokenizer -> base model -> instruct model -> suites -> report.

Everything follows from the seed. Each stage writes its result to the output directory before the
next starts, and both training stages write a checkpoint every `checkpoint_every` steps (checkpoint.py);
a rerun with `resume=True` reuses a finished base or goes on from the last checkpoint, so a long build that
was interrupted goes on where it stopped and ends with the weights it would have had. Two designs
(`PRESETS`): v6, the shipped organism (the defaults), and v7, in which exposure is per fact (plan.py). Models are saved with `save_pretrained` (safetensors, bf16 by
default to keep the shipped package small; they are loaded back in fp32 for use).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch

from . import documents, phrasing
from .checkpoint import latest, remove
from .corpus import QUESTIONS_TRAIN, Split, instruction_examples, pretraining_documents
from .names import name_roll, without_names
from .plan import IN_DOMAIN, OUT_OF_DOMAIN, Ledger
from .suites import build_suites, write_suites
from .tokenizer import END, train_tokenizer
from .train import ModelShape, Schedule, chat_rows, document_rows, train
from .world import TIERS, World, WorldConfig, build_world


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
    design: str = "v6"  # text of the world: "v6" (corpus.py) or "v7" (documents.py: per-fact plan, many phrasings)
    system_share: float = 0.3  # v7: share of chat text after a system prompt
    history_share: float = 0.3  # v7: share of instruction examples after an earlier exchange
    name_roll: int = 0  # > 0: the tokenizer learns names from a roll of every name part this many times (names.py)
    checkpoint_every: int = 100  # training steps between checkpoints in OUT/{base,instruct}.checkpoint (0: none)

    def updated(self, overrides: dict) -> "BuildConfig":
        """A copy with `overrides` applied; nested dataclasses take dicts ({"base": {"steps": 10}})."""
        return _updated(self, overrides, "config")

    @classmethod
    def tiny(cls, seed: int = 0, preset: str = "v6") -> "BuildConfig":
        """A configuration that builds in seconds, for tests of the pipeline (not a useful organism)."""
        config = cls.preset(preset, seed)
        return config.updated({
            "world": {"head": 12, "mid": 8, "tail": 8, "unseen": 8, "abstain_names": 6, "fabricated_names": 6,
                      "name_pools": (10, 14)},
            "shape": {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "context": 128},
            "vocab_size": 400,
            "abstain_docs": 12,
            "name_roll": min(config.name_roll, 5),
            "base": {"steps": 20, "lr": 3e-3, "batch": 8, "warmup": 5},
            "instruct": {"steps": 10, "lr": 1e-3, "batch": 8, "warmup": 2},
            "save_dtype": "float32",
            "checkpoint_every": 5,
        })

    @classmethod
    def preset(cls, name: str, seed: int = 0) -> "BuildConfig":
        """A named design (PRESETS): "v6" is the shipped organism (the defaults), "v7" the one in which
        familiarity and knowledge come apart."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
        return cls(seed=seed, world=WorldConfig(seed=seed)).updated(PRESETS[name])


# v7 (issue 20): exposure per fact, names from shared pools that tokenize alike in every tier, many
# phrasings with system prompts and earlier turns; the model, schedules and shares as v6
PRESETS: dict[str, dict] = {
    "v6": {},
    "v7": {"design": "v7", "world": {"exposure": "fact", "names": "shared"}, "name_roll": 50},
}


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


def corpus_of(config: BuildConfig, world: World, split: Split, ledger: Ledger | None = None) -> list[str]:
    """The pre-training documents of `config`'s design (what each states counted in `ledger`)."""
    if config.design == "v7":
        return documents.pretraining_documents(world, split, config.qa_per_pair, config.abstain_docs, config.seed,
                                               config.chat_share, config.system_share, ledger)
    if config.design != "v6":
        raise ValueError(f"design must be v6 or v7; got {config.design!r}")
    return pretraining_documents(world, split, config.qa_per_pair, config.abstain_docs, seed=config.seed,
                                 chat_share=config.chat_share, ledger=ledger)


def chats_of(config: BuildConfig, world: World, split: Split) -> list:
    """The instruction-tuning examples (messages, response) of `config`'s design."""
    if config.design == "v7":
        return documents.instruction_examples(world, split, config.instruct_per_pair, config.abstain_share,
                                              config.seed + 1, config.system_share, config.history_share)
    return instruction_examples(world, split, config.instruct_per_pair, config.abstain_share, config.seed + 1,
                                config.instruct_answers)


def tokenizer_texts(config: BuildConfig, world: World, docs: list[str]) -> list[str]:
    """What the tokenizer learns from: the documents, or (name_roll > 0) the documents without the names
    plus a roll of every name part, so a name's tokens do not depend on how often its person is seen."""
    if not config.name_roll:
        return docs
    if not world.name_parts:
        raise ValueError("name_roll needs a world with shared names (WorldConfig(names='shared'))")
    return [without_names(d, world.name_parts) for d in docs] + name_roll(world.name_parts, config.name_roll,
                                                                          config.seed)


def name_tokens(world: World, tokenizer, ledger: Ledger) -> dict:
    """Tokens per name by tier, and their rank correlation with the person's exposure (the audit's
    trivial baseline: a name's length should not tell how familiar it is)."""
    from scipy.stats import spearmanr

    counts = {p.pid: len(tokenizer(" " + p.name, add_special_tokens=False)["input_ids"]) for p in world.people}
    by_tier = {t: round(sum(counts[p.pid] for p in world.tier(t)) / max(1, len(world.tier(t))), 3) for t in TIERS}
    exposure = [ledger.person(p.pid) for p in world.people]
    rho = spearmanr(exposure, [counts[p.pid] for p in world.people]).statistic
    return {"mean_by_tier": by_tier, "spearman_with_person_exposure": None if rho != rho else round(float(rho), 4)}


def write_exposure(world: World, split: Split, ledger: Ledger, path: Path) -> None:
    """One line per fact: the person, the attribute, its plan, its exposure and the person's."""
    with open(path, "w") as handle:
        for person in world.people:
            for attribute in (*IN_DOMAIN, *OUT_OF_DOMAIN):
                plan = world.plan[person.pid][attribute] if world.plan else None
                handle.write(json.dumps({
                    "pid": person.pid, "name": person.name, "tier": person.tier, "attribute": attribute,
                    "plan": plan.role if plan else None, "planned": plan.planned if plan else None,
                    "asked": attribute in split.asked.get(person.pid, ()),
                    "exposure": ledger.fact(person.pid, attribute), "person_exposure": ledger.person(person.pid),
                }) + "\n")


def _build_base(config: BuildConfig, world, docs, out: Path, resume: bool, echo, device: str, log_path: Path) -> None:
    """Pre-train the base model on the documents into out/base (checkpointed; `resume` goes on from the last
    checkpoint)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    checkpoint, tokenizer_dir = out / "base.checkpoint", out / "base.tokenizer"
    if resume and latest(checkpoint) is not None and (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        remove(checkpoint)
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
        tokenizer = train_tokenizer(tokenizer_texts(config, world, docs), config.vocab_size)
        if config.checkpoint_every:
            tokenizer.save_pretrained(tokenizer_dir)
    end_id = tokenizer.convert_tokens_to_ids(END)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(config.shape.config(tokenizer, end_id)).to(device)
    ids, labels = document_rows(docs, tokenizer, config.shape.context)
    echo(f"base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {ids.shape[0]} rows "
         f"of {config.shape.context} tokens, {config.base.steps} steps")
    train(model, ids, labels, config.base, seed=config.seed,
          log=lambda r: (_log(log_path, {"stage": "base", **r}), echo(f"base {r}")),
          checkpoint=checkpoint if config.checkpoint_every else None, checkpoint_every=config.checkpoint_every)
    _save(model, tokenizer, out / "base", config.save_dtype)
    remove(checkpoint)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)


def _build_instruct(config: BuildConfig, examples, docs, out: Path, resume: bool, echo, device: str,
                    log_path: Path):
    """Instruction-tune the saved base into out/instruct (checkpointed in out/instruct.checkpoint, as the
    base stage). It always starts from the saved base (rounded to save_dtype), so a build from scratch and
    one resumed from its base give the same instruct model. Returns the tokenizer."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    checkpoint = out / "instruct.checkpoint"
    if not resume:
        remove(checkpoint)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "base")
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).to(device)
    ids, labels = chat_rows(examples, tokenizer, config.shape.context, END)
    echo(f"instruct: {len(examples)} chat examples in {ids.shape[0]} rows, {config.instruct.steps} steps")
    if config.replay > 0:
        doc_ids, doc_labels = document_rows(docs, tokenizer, config.shape.context)
        generator = torch.Generator().manual_seed(config.seed + 2)
        take = torch.randperm(doc_ids.shape[0], generator=generator)[: int(config.replay * ids.shape[0])]
        ids, labels = torch.cat([ids, doc_ids[take]]), torch.cat([labels, doc_labels[take]])
    train(model, ids, labels, config.instruct, seed=config.seed + 1,
          log=lambda r: (_log(log_path, {"stage": "instruct", **r}), echo(f"instruct {r}")),
          checkpoint=checkpoint if config.checkpoint_every else None, checkpoint_every=config.checkpoint_every)
    _save(model, tokenizer, out / "instruct", config.save_dtype)
    remove(checkpoint)
    return tokenizer


def build(config: BuildConfig, out: str | Path, resume: bool = False, echo=print, device: str = "cpu") -> Path:
    """Build the organism into `out` (base/, instruct/, suites/, world.json, exposure.jsonl, build.json),
    training on `device` (the schedule is the same on any device; the weights differ by rounding). Both
    training stages save a checkpoint every `checkpoint_every` steps; with `resume`, a finished base is
    reused and an unfinished stage goes on from its last checkpoint."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    start = time.time()
    config.world.seed = config.seed
    world = build_world(config.world)
    split = Split.of(world)
    (out / "world.json").write_text(json.dumps(world.summary(), indent=1))
    ledger = Ledger()
    docs = corpus_of(config, world, split, ledger)
    write_exposure(world, split, ledger, out / "exposure.jsonl")
    questions = phrasing.QUESTIONS if config.design == "v7" else QUESTIONS_TRAIN
    counts = write_suites(build_suites(world, split, seed=config.seed, ledger=ledger, questions=questions),
                          out / "suites")
    echo(f"world: {len(world.people)} people, {len(docs)} documents; suites {counts}")
    base_dir = out / "base"
    if resume and (base_dir / "model.safetensors").exists():
        echo("base: resumed from disk")
    else:
        _build_base(config, world, docs, out, resume, echo, device, log_path)
    examples = chats_of(config, world, split)
    tokenizer = _build_instruct(config, examples, docs, out, resume, echo, device, log_path)
    summary = {"config": asdict(config), "build_seconds": round(time.time() - start, 1),
               "torch": torch.__version__, "device": _device_name(device), "documents": len(docs),
               "chat_examples": len(examples), "suites": counts, "name_tokens": name_tokens(world, tokenizer, ledger)}
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
