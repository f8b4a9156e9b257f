"""The v7 organism (issue 20): exposure per fact, names that tokenize alike in every tier, training
phrasings apart from every evaluation phrasing, and base training that resumes from checkpoints."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_controls import heldout_module  # benchmarks/heldout_suites.py, as the held-out suites' test loads it

from hguard.organism.build import BuildConfig, build, chats_of, corpus_of, tokenizer_texts
from hguard.organism.corpus import QUESTIONS_HELD_OUT, Split
from hguard.organism.plan import IN_DOMAIN, OUT_OF_DOMAIN, Ledger
from hguard.organism.suites import DOUBT, FALSE_PREMISE, build_suites
from hguard.organism.world import WorldConfig, build_world

def tiny():
    config = BuildConfig.tiny(seed=3, preset="v7")
    world = build_world(config.world)
    split = Split.of(world)
    ledger = Ledger()
    docs = corpus_of(config, world, split, ledger)
    return config, world, split, ledger, docs


def named(name: str) -> re.Pattern:
    return re.compile(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])")


def test_every_fact_is_stated_as_often_as_the_plan_says():
    config, world, split, ledger, docs = tiny()
    for person in world.people:
        mentioning = [d for d in docs if named(person.name).search(d)]
        assert len(mentioning) == ledger.person(person.pid), person.name  # counted from the text itself
        for attribute in (*IN_DOMAIN, *OUT_OF_DOMAIN):
            fact = world.plan[person.pid][attribute]
            asked = attribute in split.asked.get(person.pid, ())
            assert ledger.fact(person.pid, attribute) == fact.planned + asked * config.qa_per_pair
            stating = sum(bool(named(person.get(attribute)).search(d)) for d in mentioning)
            assert stating == ledger.fact(person.pid, attribute), (person.name, attribute, fact)
    roles = {(p.tier, f.role) for p in world.people for a, f in world.plan[p.pid].items() if a in IN_DOMAIN}
    assert {("head", "withheld"), ("head", "thin"), ("tail", "boosted")} <= roles
    for person in world.people:  # only facts stated in every biography are asked
        assert all(world.plan[person.pid][a].role == "full" for a in split.asked.get(person.pid, ()))


def test_the_full_world_crosses_familiarity_with_knowledge():
    """Hundreds of facts about well-known people the model cannot know, known facts about rarely seen ones."""
    world = build_world(BuildConfig.preset("v7").world)
    split = Split.of(world)
    cells = world.plan_summary()
    assert cells["head"]["withheld"] >= 300 and cells["tail"]["boosted"] >= 200 and cells["mid"]["boosted"] >= 50
    held_out_withheld = sum(world.plan[p.pid][a].role == "withheld" for p in world.tier("head") for a in split.held_out(p)
                            if a in IN_DOMAIN)
    assert held_out_withheld == cells["head"]["withheld"]  # every one of them is a test question
    boosted = [world.plan[p.pid][a].planned for p in world.tier("tail") for a in IN_DOMAIN
               if world.plan[p.pid][a].role == "boosted"]
    assert min(boosted) >= 9 and max(p.exposure for p in world.tier("tail")) <= 2
    assert build_world(WorldConfig(seed=0)).plan is None  # v6 stays v6


def test_suites_carry_the_exposure_of_the_fact_and_of_the_person():
    config, world, split, ledger, docs = tiny()
    suites = build_suites(world, split, seed=3, ledger=ledger)
    for name, items in suites.items():
        for item in items:
            for key in ("exposure", "person_exposure", "candidates", "aliases", "pid", "attribute", "name"):
                assert key in item, (name, key)
            if item["pid"] is not None:
                assert item["exposure"] == ledger.fact(item["pid"], item["attribute"])
                assert item["person_exposure"] == ledger.person(item["pid"])
                assert item["plan"] == world.plan[item["pid"]][item["attribute"]].role
    in_domain = suites["in_domain"]
    assert any(i["tier"] == "head" and i["exposure"] <= 1 for i in in_domain)
    assert any(i["tier"] == "tail" and i["exposure"] >= 8 for i in in_domain)
    assert any(i["exposure"] < i["person_exposure"] for i in in_domain)


def pattern(template: str) -> re.Pattern:
    """A template as a regex: a name for {n}, any value for {v} and {w}."""
    text = re.escape(template)
    for slot in ("n", "v", "w"):
        text = text.replace(re.escape("{" + slot + "}"), r"[A-Z0-9][\w' ]*?" if slot == "n" else r".+?")
    return re.compile(text)


def training_text(config, world, split, docs) -> str:
    chats = chats_of(config, world, split)
    return "\n".join(docs + [m["content"] for messages, _ in chats for m in messages] + [r for _, r in chats])


def test_no_evaluation_phrasing_appears_in_training():
    heldout = heldout_module()
    config, world, split, ledger, docs = tiny()
    text = training_text(config, world, split, docs)
    evaluation = ([t for ts in heldout.QUESTIONS.values() for t in ts] + heldout.SYSTEMS
                  + [t for ts in QUESTIONS_HELD_OUT.values() for t in ts] + list(FALSE_PREMISE.values()) + [DOUBT])
    found = [t for t in evaluation if pattern(t).search(text)]
    assert found == []
    from hguard.organism.phrasing import QUESTIONS, SYSTEMS

    ours = [t for ts in QUESTIONS.values() for t in ts] + SYSTEMS
    assert sum(bool(pattern(t).search(text)) for t in ours) > len(ours) / 2  # the check can fail
    assert heldout.clashing(ours, evaluation) == []
    # every chat shape is trained: plain, after a system prompt, after an earlier exchange
    shapes = {tuple(m["role"] for m in messages) for messages, _ in chats_of(config, world, split)}
    assert {("user",), ("system", "user"), ("user", "assistant", "user")} <= shapes


def test_names_tokenize_alike_whatever_the_exposure():
    from scipy.stats import spearmanr

    from hguard.organism.tokenizer import train_tokenizer

    config = BuildConfig.preset("v7")
    world = build_world(config.world)
    split = Split.of(world)
    ledger = Ledger()
    docs = corpus_of(config, world, split, ledger)
    seen_parts = {part for p in world.people if p.tier != "unseen" for part in p.name.split()}
    assert seen_parts == world.name_parts  # every part of every name, fabricated ones too, is trained
    text = "\n".join(docs)
    assert not any(named(n).search(text) for n in world.fabricated_names[:50])
    tokenizer = train_tokenizer(tokenizer_texts(config, world, docs), config.vocab_size)
    counts = [len(tokenizer(" " + p.name, add_special_tokens=False)["input_ids"]) for p in world.people]
    means = {t: sum(c for c, p in zip(counts, world.people) if p.tier == t) / len(world.tier(t))
             for t in ("head", "mid", "tail", "unseen")}
    assert max(means.values()) - min(means.values()) < 0.25, means
    assert abs(spearmanr([ledger.person(p.pid) for p in world.people], counts).statistic) < 0.1


def _weights(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_an_interrupted_base_resumed_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    from hguard.organism import train as train_module

    config = BuildConfig.tiny(seed=4, preset="v7")
    whole = build(config, tmp_path / "whole", echo=lambda m: None)
    plain = build(config.updated({"checkpoint_every": 0}), tmp_path / "plain", echo=lambda m: None)
    saves = []
    original = train_module.save_checkpoint

    def killed_after_the_second(directory, model, optimizer, rng, state):
        original(directory, model, optimizer, rng, state)
        saves.append(state["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # the session ends right after the step-10 checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", killed_after_the_second)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        build(config, cut, echo=lambda m: None)
    assert saves == [5, 10] and (cut / "base.checkpoint" / "state.json").exists() and not (cut / "base").exists()
    monkeypatch.setattr(train_module, "save_checkpoint", original)
    build(config, cut, resume=True, echo=lambda m: None)
    assert not (cut / "base.checkpoint").exists()
    assert '"resumed_at_step": 10' in (cut / "train_log.jsonl").read_text()
    for stage in ("base", "instruct"):
        a, b, c = _weights(whole / stage), _weights(cut / stage), _weights(plain / stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a), stage


def test_an_interrupted_instruction_tuning_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from hguard.organism import train as train_module

    config = BuildConfig.tiny(seed=4, preset="v7")
    whole = build(config, tmp_path / "whole", echo=lambda m: None)
    saves = []
    original = train_module.save_checkpoint

    def killed_in_instruction_tuning(directory, model, optimizer, rng, state):
        original(directory, model, optimizer, rng, state)
        saves.append((directory.name, state["step"]))
        if directory.name == "instruct.checkpoint":
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", killed_in_instruction_tuning)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        build(config, cut, echo=lambda m: None)
    assert saves[-1] == ("instruct.checkpoint", 5) and (cut / "base" / "model.safetensors").exists()
    assert not (cut / "instruct").exists()
    monkeypatch.setattr(train_module, "save_checkpoint", original)
    build(config, cut, resume=True, echo=lambda m: None)
    assert not (cut / "instruct.checkpoint").exists()
    log = [json.loads(line) for line in (cut / "train_log.jsonl").read_text().splitlines()]
    assert {"stage": "instruct", "resumed_at_step": 5} in log
    a, b = _weights(whole / "instruct"), _weights(cut / "instruct")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_build_without_resume_starts_instruction_tuning_afresh(tmp_path):
    config = BuildConfig.tiny(seed=4, preset="v7")
    stale = tmp_path / "instruct.checkpoint"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text("{}")
    build(config, tmp_path, echo=lambda m: None)
    assert not stale.exists() and (tmp_path / "instruct" / "model.safetensors").exists()


def test_organism_eval_reports_goals_by_fact(tmp_path):
    from hguard.organism import load
    from hguard.organism.evaluate import by_fact, report
    from hguard.organism.suites import SUITES, read_suite

    built = build(BuildConfig.tiny(seed=2, preset="v7"), tmp_path, echo=lambda m: None)
    model, tokenizer = load("instruct", built)
    suites = {name: read_suite(built / "suites", name) for name in SUITES}
    result = report(model, tokenizer, suites, samples=2, max_items=30)
    for key in ("accuracy_known_facts", "hallucination_rate_unknown_facts_of_seen_people", "head_all_correct",
                "head_all_wrong", "greedy_by_plan", "accuracy_known", "all_wrong", "residual_probe_auroc"):
        assert key in result
    items = [{"exposure": 20, "person_exposure": 30, "tier": "head", "plan": "full", "aliases": ["Dunmere"]},
             {"exposure": 0, "person_exposure": 30, "tier": "head", "plan": "withheld", "aliases": ["Velamor"]},
             {"exposure": 0, "person_exposure": 0, "tier": "unseen", "plan": "unseen", "aliases": ["Kessrin"]}]
    facts = by_fact(items, ["Born in Dunmere.", "Born in Dunmere.", "Born in Dunmere."],
                    ["all_correct", "all_wrong", "all_wrong"])
    assert facts["accuracy_known_facts"] == 1.0 and facts["hallucination_rate_unknown_facts_of_seen_people"] == 1.0
    assert facts["greedy_by_fact"]["unknown_of_seen_people"]["questions"] == 1  # the unseen person is not counted
    assert (facts["head_all_correct"], facts["head_all_wrong"]) == (1, 1)
    assert facts["greedy_by_plan"]["withheld"]["wrong"] == 1.0
