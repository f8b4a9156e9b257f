"""`--sampler vllm` (hguard/identify/sample_vllm.py): vLLM's offline engine draws the consistency samples.

Runs where vLLM is installed (CI: the vLLM venv, `HGUARD_REQUIRE_VLLM=1`, where a missing vLLM fails
instead of skipping), on the organism in fp32.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("HGUARD_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM's CPU default takes most of the machine's memory

from hguard.identify.sample import sample  # noqa: E402
from hguard.identify.sample_vllm import VllmSampler  # noqa: E402
from hguard.organism import SHIPPED, load, path  # noqa: E402
from hguard.organism.suites import read_suite  # noqa: E402

ENGINE = {"max_model_len": 256, "enforce_eager": True}


@pytest.fixture(scope="module")
def items():
    return read_suite(SHIPPED / "suites", "in_domain")[:6]


def test_a_questions_draws_do_not_depend_on_its_batch(items, capfd):
    sampler = VllmSampler(str(path("instruct")), engine_args=ENGINE)
    model, tokenizer = load("instruct")
    first = sampler(tokenizer, items, samples=5, max_new_tokens=20, seed=0)
    assert len(first) == 6 and all(len(answers) == 5 and all(isinstance(a, str) for a in answers) for answers in first)
    assert any(len(set(answers)) > 1 for answers in first)  # sampled, not greedy
    reordered = sampler(tokenizer, [items[4], items[1]], samples=5, max_new_tokens=20, seed=0)
    assert reordered == [first[4], first[1]]
    other_seed = sampler(tokenizer, items, samples=5, max_new_tokens=20, seed=1)
    assert other_seed != first
    assert "INFO" not in capfd.readouterr().out  # vLLM's log stays off stdout, where hguard prints its JSON


def test_one_sample_is_greedy_and_is_generates_answer(items):
    model, tokenizer = load("instruct")
    greedy = VllmSampler(str(path("instruct")), engine_args=ENGINE)(tokenizer, items, samples=1, max_new_tokens=20)
    assert greedy == sample(model, tokenizer, items, samples=1, max_new_tokens=20)
