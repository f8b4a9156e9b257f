"""The organism pipeline on a seconds-long configuration: world, text, tokenizer, training, suites."""

from __future__ import annotations

import json

import pytest
import torch

from hguard.organism.build import BuildConfig, build
from hguard.organism.corpus import Split, instruction_examples, pretraining_documents
from hguard.organism.suites import SUITES, build_suites, read_suite
from hguard.organism.world import WorldConfig, build_world


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(BuildConfig.tiny(seed=5), tmp_path_factory.mktemp("organism"), echo=lambda m: None)


def test_world_is_deterministic_and_long_tailed():
    config = WorldConfig(seed=11)
    a, b = build_world(config), build_world(WorldConfig(seed=11))
    assert a.people == b.people and a.fabricated_names == b.fabricated_names
    assert build_world(WorldConfig(seed=12)).people != a.people
    exposures = {t: [p.exposure for p in a.tier(t)] for t in ("head", "mid", "tail", "unseen")}
    assert min(exposures["head"]) > max(exposures["mid"]) >= min(exposures["mid"]) > max(exposures["tail"]) >= 1
    assert set(exposures["unseen"]) == {0}
    names = {p.name for p in a.people}
    assert not names & set(a.abstain_names) and not names & set(a.fabricated_names)
    assert not set(a.abstain_names) & set(a.fabricated_names)


def test_evaluation_questions_never_appear_in_training():
    world = build_world(WorldConfig(seed=2, head=40, mid=30, tail=30, unseen=30, abstain_names=20, fabricated_names=20))
    split = Split.of(world)
    docs = pretraining_documents(world, split, qa_per_pair=3, abstain_docs=40, seed=2)
    chats = instruction_examples(world, split, per_pair=2, abstain_share=0.1, seed=3)
    trained = {(d.split("\nAnswer:")[0].removeprefix("Question: ")) for d in docs if d.startswith("Question:")}
    trained |= {messages[0]["content"] for messages, _ in chats}
    suites = build_suites(world, split)
    for name in ("in_domain", "paraphrase", "other_attribute", "fabricated"):
        assert suites[name], name
        assert not {item["question"] for item in suites[name]} & trained, name
    for item in suites["in_domain"]:  # held-out facts: never asked about that person in training
        assert item["attribute"] not in split.asked.get(item["pid"], ())
    # fabricated people appear nowhere in the training text
    text = " ".join(docs) + " ".join(m[0]["content"] + r for m, r in chats)
    assert not any(item["name"] in text for item in suites["fabricated"])


def test_instruction_answers_put_the_value_after_a_word():
    """Byte-level BPE tokenises a value at the very start of a turn ("1958") differently from the same
    value inside biography text (" 1958"); the default instruction answers keep it after a word."""
    world = build_world(WorldConfig(seed=4, head=20, mid=5, tail=5, unseen=5))
    split = Split.of(world)
    values = {p.name: {a: p.get(a) for a in split.asked.get(p.pid, ())} for p in world.people}
    for style, bare_allowed in (("after_a_word", False), ("any", True)):
        bare = 0
        for messages, response in instruction_examples(world, split, per_pair=3, abstain_share=0.1, seed=3, style=style):
            name = next((n for n in values if n in messages[0]["content"]), None)
            for value in (values.get(name) or {}).values():
                if value in response:
                    assert f" {value}" in response or bare_allowed, response
                    bare += response.startswith(value)
        assert (bare > 0) == bare_allowed, style
    with pytest.raises(ValueError, match="answer style"):
        instruction_examples(world, split, per_pair=1, abstain_share=0.0, seed=0, style="terse")


def test_build_writes_loadable_models_and_suites(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hguard import Guard, Probe

    for stage in ("base", "instruct"):
        model = AutoModelForCausalLM.from_pretrained(built / stage)
        assert model.config.model_type == "llama"
    tokenizer = AutoTokenizer.from_pretrained(built / "instruct")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Who is Zoë? ✓"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|user|>Who is Zoë? ✓<|end|><|assistant|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: any text round-trips
    model = AutoModelForCausalLM.from_pretrained(built / "instruct")
    guard = Guard.from_pretrained(built / "instruct", probe=Probe.random(model, 4))
    [result] = guard.generate([[{"role": "user", "content": "Where was Kalo born?"}]], max_new_tokens=4)
    assert len(result.token_probs) == len(result.token_ids)
    for name in SUITES:
        items = read_suite(built / "suites", name)
        assert items and all("question" in item and "aliases" in item for item in items)
    assert json.loads((built / "build.json").read_text())["config"]["seed"] == 5


def test_build_is_deterministic(built, tmp_path):
    again = build(BuildConfig.tiny(seed=5), tmp_path, echo=lambda m: None)
    from safetensors.torch import load_file

    a = load_file(str(built / "instruct" / "model.safetensors"))
    b = load_file(str(again / "instruct" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_build_equals_one_from_scratch(tmp_path):
    """Instruction tuning starts from the saved (rounded) base either way, so resuming from a finished
    base gives the very instruct weights that a build from scratch gives."""
    import shutil

    from safetensors.torch import load_file

    config = BuildConfig.tiny(seed=6).updated({"save_dtype": "bfloat16"})
    scratch = build(config, tmp_path / "scratch", echo=lambda m: None)
    shutil.copytree(scratch / "base", tmp_path / "resumed" / "base")
    resumed = build(config, tmp_path / "resumed", resume=True, echo=lambda m: None)
    a = load_file(str(scratch / "instruct" / "model.safetensors"))
    b = load_file(str(resumed / "instruct" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_organism_eval_reports_the_headline_fields(built):
    from hguard.organism import load
    from hguard.organism.evaluate import report

    model, tokenizer = load("instruct", built)
    suites = {name: read_suite(built / "suites", name) for name in SUITES}
    result = report(model, tokenizer, suites, samples=2, max_items=20)
    for key in ("params", "accuracy_known", "hallucination_rate_tail", "abstention_rate_tail", "all_correct",
                "all_wrong", "residual_probe_auroc"):
        assert key in result
    assert result["all_correct"] + result["all_wrong"] <= 20
