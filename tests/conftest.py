"""Shared fixtures: tiny random models saved to disk and loaded back through from_pretrained."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hguard import Guard, Probe
from hguard.tiny import save_tiny

import openai_schema

PROMPTS = ["Where was Ada born?", "The quick brown fox jumps over", "Hi", "Numbers like 1024 and 3.14 appear in"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """model_type -> directory with a saved tiny model and tokenizer (built once per session)."""
    cache: dict[str, str] = {}

    def get(model_type: str, seed: int = 0, **config_kw) -> str:
        key = f"{model_type}-{seed}-{sorted(config_kw.items())}"
        if key not in cache:
            cache[key] = str(save_tiny(tmp_path_factory.mktemp(model_type), model_type, seed=seed, **config_kw))
        return cache[key]

    return get


def load(directory: str):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory)


@pytest.fixture
def make_guard(tiny_dirs):
    """(model_type, probe neurons) -> a Guard on a freshly loaded tiny model with a random probe."""

    def make(model_type: str = "llama", count: int = 12, seed: int = 1, **probe_kw) -> Guard:
        model, tokenizer = load(tiny_dirs(model_type))
        return Guard(model, tokenizer, Probe.random(model, count, seed=seed, **probe_kw))

    return make


@pytest.fixture(scope="session")
def tiny_organism(tmp_path_factory):
    """(directory, model, tokenizer) of a seconds-long organism build, shared by the pipeline tests."""
    from hguard.organism import load as load_organism
    from hguard.organism.build import BuildConfig, build

    directory = build(BuildConfig.tiny(seed=9), tmp_path_factory.mktemp("tiny-organism"), echo=lambda m: None)
    model, tokenizer = load_organism("instruct", directory)
    return directory, model, tokenizer


@pytest.fixture
def both_classes():
    """The tiny organism knows nothing: make every other greedy answer 'correct' so both classes exist."""
    from hguard.identify.sample import sample

    def relabel(model, tokenizer, items: list[dict]) -> list[dict]:
        greedy = sample(model, tokenizer, items, samples=1, max_new_tokens=6)
        for i, (item, [answer]) in enumerate(zip(items, greedy)):
            words = answer.split()
            if i % 2 == 0 and words:
                item["aliases"] = [words[0]]
            item["candidates"] = []
        return items

    return relabel


@pytest.fixture(autouse=True)
def _replies_follow_openai_schema():
    """Every reply an hguard server sent during the test (recorded by LiveServer) validates against the
    official OpenAI schemas (tests/openai_spec/); the test fails otherwise."""
    start = len(openai_schema.RECORDED)
    yield
    openai_schema.VALIDATED.append(openai_schema.check(openai_schema.RECORDED[start:]))


def pytest_terminal_summary(terminalreporter):
    if openai_schema.RECORDED:
        terminalreporter.write_line(f"OpenAI schema: {sum(openai_schema.VALIDATED)} objects from "
                                    f"{len(openai_schema.RECORDED)} replies validated")
