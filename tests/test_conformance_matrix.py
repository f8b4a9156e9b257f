"""The conformance matrix (hguard/conformance.py): every causal-LM model_type in transformers' auto mapping
either passes, on a tiny random config saved and loaded back through from_pretrained, everything
test_guard.py proves on its seven architectures (streamed == teacher-forced scores at batch 1 and 4 with
prompts of different lengths, in fp32 within 1e-4, proxy mode's scores of growing answers scored
together equal to teacher-forced ones, and the invariants of flag, abstain, dampen and scale),
or is refused by `resolve` with an UnsupportedModelError naming the type and the reason, or is listed in
NOT_BUILT with the reason it cannot be built from a config alone. Nothing in between. The README's table
is this matrix's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from hguard import Guard, Probe, UnsupportedModelError, resolve
from hguard import conformance
from hguard.tiny import build_tokenizer

from conftest import PROMPTS
import guard_checks as checks

README = Path(__file__).resolve().parent.parent / "README.md"
NEW_TOKENS = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows() -> dict[str, conformance.Row]:
    return {t: conformance.row(t) for t in conformance.TYPES}


def _load_tiny(model_type: str, directory: Path):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conformance.tiny_config(model_type, len(tokenizer))).eval()
    assert sum(p.numel() for p in model.parameters()) < 5_000_000, "not a tiny config"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return (AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(directory))


@pytest.mark.parametrize("model_type", conformance.TYPES)
def test_each_type_passes_or_is_refused_by_name(model_type, rows, tmp_path):
    row = rows[model_type]
    if row.refusal is not None and row.refusal.startswith("not built"):
        pytest.skip(f"{model_type}: {row.refusal}")
    if row.refusal is not None:
        model, _ = conformance._meta_model(model_type)
        with pytest.raises(UnsupportedModelError, match=re.escape(repr(model.config.model_type))):
            resolve(model)
        return
    model, tokenizer = _load_tiny(model_type, tmp_path)
    sites = resolve(model)
    assert conformance.where(sites) == row.where
    guard = Guard(model, tokenizer, Probe.random(model, 12, seed=1))  # a few neurons, over every layer
    assert len(guard.bound.terms) == sites.num_layers
    checks.streamed_equals_teacher_forced(guard, PROMPTS[:1], NEW_TOKENS)
    checks.streamed_equals_teacher_forced(guard, PROMPTS, NEW_TOKENS)  # prompts of different lengths
    checks.abstain_extremes(guard, PROMPTS, NEW_TOKENS)
    checks.proxy_scores_equal_teacher_forced(guard, PROMPTS, NEW_TOKENS)
    with_tokens = Guard(model, tokenizer, Probe.random(model, 12, seed=1, token_weight=torch.tensor([0.7, -0.4])))
    checks.proxy_scores_equal_teacher_forced(with_tokens, PROMPTS, NEW_TOKENS)  # the logits' terms too
    half = Guard(model, tokenizer, Probe.random(model, sites.num_layers * sites.intermediate_size // 2, seed=1))
    checks.alpha_one_is_plain_generate(half, PROMPTS, NEW_TOKENS + 2)
    checks.alpha_zero_is_zeroed_columns(half, PROMPTS, NEW_TOKENS + 2)
    checks.dampen_acts_from_the_step_after_the_flag(half, PROMPTS, NEW_TOKENS + 2)
    for action in ("dampen", "scale"):
        checks.scores_under_intervention_are_unintervened(guard, action, PROMPTS, NEW_TOKENS + 2,
                                                          count=sites.intermediate_size // 2)


def test_the_readme_table_is_the_matrix(rows):
    text = README.read_text()
    made_with = re.search(r"^transformers (\S+): \d+ of", text, flags=re.M)
    assert made_with, "README.md lost its supported-models table"
    if made_with.group(1) != transformers.__version__:  # another release has other types
        pytest.skip(f"README's table is of transformers {made_with.group(1)}, this is {transformers.__version__}")
    table = conformance.markdown([rows[t] for t in conformance.TYPES])
    assert table in text, "README.md's supported-models table drifted: run python -m hguard.conformance --markdown"


def test_mixture_of_experts_types_pass(rows):
    """The routed experts' neurons are read (hguard/experts.py): Mixtral and Qwen3-MoE, the issue's two, pass
    the same checks as the dense types; every MoE type that is refused says why."""
    for model_type in ("mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss"):
        assert rows[model_type].refusal is None and rows[model_type].where.endswith(".experts"), model_type
    for model_type, row in rows.items():
        if row.refusal is not None and "mixture-of-experts" in row.refusal:
            assert row.refusal.startswith("refused: a mixture-of-experts model that hguard cannot read: "), model_type
