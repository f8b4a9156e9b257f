"""The controls of `hguard eval` (controls.py) on inputs whose right answer is known by construction, the
held-out phrasing suites, and the chat-form items they need."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hguard.identify.collected import Collected, featurise, name_tokens
from hguard.identify.controls import (discordant_pairs, forced_report, forced_sets, pair_auroc, strata_report,
                                      swap, trivial_scorers)
from hguard.identify.evaluate import auroc, default_suites, logit_scorers, probe_logits
from hguard.identify.features import Example, cett_means, cett_pools
from hguard.identify.sample import plain_prompt, prompt_ids
from hguard.identify.tables import render

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def hand_built(labels, scores, items) -> tuple[Collected, dict]:
    n = len(labels)
    data = Collected([f"q{i}" for i in range(n)], np.array(labels), np.array(["test"] * n, object),
                     np.zeros((n, 1)), np.zeros((n, 1)), np.zeros((n, 1, 1)),
                     records=[{"item": item, "label": y} for item, y in zip(items, labels)],
                     name_tokens=np.array([float(item.get("tokens", np.nan)) for item in items]))
    return data, {name: [np.array(s, dtype=float)] for name, s in scores.items()}


def test_pair_auroc_is_the_mann_whitney_auroc_on_all_pairs():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    s = np.round(rng.normal(size=80) + y, 1)  # ties
    i, j = discordant_pairs(y, ["one"] * 80)
    assert len(i) == y.sum() * (1 - y).sum()
    result = pair_auroc([s[y == 1]], [s[y == 0]], i, j, rounds=200, seed=0)
    assert result["auroc"] == pytest.approx(auroc(y, s), abs=1e-4)
    assert result["auroc_ci"][0] < result["auroc"] < result["auroc_ci"][1]


def test_strata_separate_familiarity_from_the_signal_within_it():
    # Two exposure strata. `familiar` only says which stratum a question is in (high = rarely seen); `within`
    # ranks the hallucinated question above the faithful one inside each stratum but is lower overall.
    rows = [  # (label, exposure, familiar, within)
        (1, 1, 5.0, 1.0), (1, 1, 5.0, 1.2), (1, 1, 5.0, 1.1), (0, 1, 5.0, 0.0),
        (0, 30, 0.0, 10.0), (0, 30, 0.0, 10.1), (0, 30, 0.0, 10.2), (1, 30, 0.0, 11.0),
    ]
    items = [{"exposure": e, "tier": "tail" if e == 1 else "head", "attribute": "city", "tokens": 4 if e == 1 else 2}
             for _, e, _, _ in rows]
    labels = [r[0] for r in rows]
    data, scores = hand_built(labels, {"familiar": [r[2] for r in rows], "within": [r[3] for r in rows]}, items)
    assert auroc(np.array(labels), np.array(scores["familiar"][0])) == 0.75  # familiarity alone looks good
    assert auroc(np.array(labels), np.array(scores["within"][0])) == 7 / 16  # and the signal looks bad
    report = strata_report(data, scores, rounds=50, seed=0)
    exposure = report["equal_exposure"]
    assert exposure["pairs"] == 3 * 1 + 1 * 3 and exposure["strata"] == 2
    assert exposure["familiar"]["auroc"] == 0.5  # ties within every stratum
    assert exposure["within"]["auroc"] == 1.0
    assert report["within_tier"]["within"]["auroc"] == 1.0
    assert report["tiers"]["head"] == {"faithful": 3, "hallucinated": 1, "pairs": 3,
                                       "familiar": report["tiers"]["head"]["familiar"],
                                       "within": report["tiers"]["head"]["within"]}
    assert report["tiers"]["tail"]["within"]["auroc"] == 1.0
    # without exposure the strata fall back to name-token counts (here the same partition)
    for item in items:
        del item["exposure"]
    fallback = strata_report(data, scores, rounds=10, seed=0)["equal_exposure"]
    assert fallback["by"] == ["name_tokens"] and fallback["within"]["auroc"] == 1.0 and "note" in fallback
    data.name_tokens = np.full(len(items), np.nan)
    assert "skipped" in strata_report(data, scores, rounds=10, seed=0)["equal_exposure"]["note"]


def test_trivial_baselines():
    items = [{"exposure": 30, "tokens": 2}, {"exposure": 1, "tokens": 5}]
    data, _ = hand_built([0, 1], {}, items)
    scorers = trivial_scorers()
    assert list(scorers["exposure"](data)) == [-30.0, -1.0]  # less exposure = more likely made up
    assert list(scorers["name_tokens"](data)) == [2.0, 5.0]


def record(item_id, response, value, label, source):
    start = response.index(value)
    item = {"id": item_id, "answer": "Dunmere", "aliases": ["Dunmere"], "tier": "head",
            "candidates": ["Velamor", "Kessrin", "dunmere"]}
    return {"item": item, "label": label, "response": response, "span": (start, start + len(value)),
            "span_source": source}


def test_forced_sets_swap_the_value_in_the_models_own_answer():
    known = record("a", "Born in Dunmere.", "Dunmere", 0, "alias")
    unknown = record("b", "In Kessrin.", "Kessrin", 1, "candidate")
    whole = record("c", "No idea", "No idea", 1, "whole_response")  # no value located: no forced answer
    fabricated = {**known, "item": {**known["item"], "answer": None, "aliases": []}}
    sets = forced_sets([known, unknown, whole, fabricated], seed=0)
    [wrong], [true] = sets["known_wrong"], sets["unknown_true"]
    assert wrong["label"] == 1 and wrong["response"] in ("Born in Velamor.", "Born in Kessrin.")  # never an alias
    assert wrong["response"][slice(*wrong["span"])] in ("Velamor", "Kessrin")
    assert true == {**unknown, "label": 0, "response": "In Dunmere.", "span": (3, 10), "span_source": "forced"}
    assert forced_sets([known], seed=0) == forced_sets([known], seed=0)  # deterministic
    assert swap(known, "Port Anselo")["response"] == "Born in Port Anselo."


def test_forced_report_pairs_by_question_and_crosses_known_with_unknown():
    def rows(keys, labels, values, exposures):
        data, _ = hand_built(labels, {}, [{"exposure": e, "tier": "head" if e > 9 else "tail"} for e in exposures])
        data.keys, data.cett = list(keys), np.array(values, dtype=float)[:, None]
        return data

    own = rows(["k1", "k2", "u1"], [0, 0, 1], [0.0, 0.2, 1.0], [30, 20, 1])  # two known facts, one unknown
    own.forced = {"known_wrong": rows(["k2", "k1"], [1, 1], [0.1, 2.0], [20, 30]),  # k2's wrong scores lower
                  "unknown_true": rows(["u1"], [0], [0.5], [1])}
    methods = {"truth": [lambda d: d.cett[:, 0]], "exposure": [trivial_scorers()["exposure"]]}
    report = forced_report(own, methods, rounds=20, seed=0)
    assert report["known"]["pairs"] == 2 and report["known"]["tiers"] == {"head": 2}
    assert report["known"]["truth"]["wrong_higher"] == 0.5  # k1: 2.0 > 0.0; k2: 0.1 < 0.2
    assert report["known"]["exposure"]["wrong_higher"] == 0.5  # same prompt: ties
    assert report["unknown"]["truth"]["wrong_higher"] == 1.0  # own wrong 1.0 > forced true 0.5
    crossed = report["crossed"]
    assert crossed["pairs"] == 2 and crossed["truth"]["wrong_higher"] == 0.5  # 2.0 > 0.5, 0.1 < 0.5
    assert crossed["exposure"]["wrong_higher"] == 0.0  # familiarity calls the true answers the made-up ones
    assert forced_report(rows(["x"], [0], [0.0], [1]), methods, 5, 0) == {
        "note": "no forced answers (no true value, or none located in the responses)"}


@pytest.fixture(scope="module")
def shipped():
    from hguard.organism import load

    return load("instruct")


# Held-out in-domain facts about well-known people that the shipped organism answers right (greedy).
KNOWN = [("in_domain-2-year", "Born in 1956."), ("in_domain-5-employer", "Employed by Vesk Mills."),
         ("in_domain-7-city", "In Tallow Reach."), ("in_domain-13-occupation", "A seed trader.")]


def test_forced_answers_on_the_organism(shipped):
    from hguard.organism import SHIPPED
    from hguard.organism.suites import read_suite

    model, tokenizer = shipped
    items = {i["id"]: i for i in read_suite(SHIPPED / "suites", "in_domain") if i["id"] in dict(KNOWN)}
    kept = []
    for key, response in KNOWN:
        item = items[key]
        start = response.index(item["answer"])
        kept.append({"item": item, "label": 0, "response": response, "span": (start, start + len(item["answer"])),
                     "span_source": "alias"})
    data = featurise(model, tokenizer, kept)
    data.forced = {k: featurise(model, tokenizer, v) for k, v in forced_sets(data.records).items()}
    wrong = data.forced["known_wrong"]
    assert len(wrong.keys) == len(KNOWN) and not data.forced["unknown_true"].keys
    for own, forced in zip(data.records, wrong.records):
        assert forced["response"] != own["response"]
        assert forced["response"][: own["span"][0]] == own["response"][: own["span"][0]]  # same answer form
    methods = {name: [scorer] for name, scorer in logit_scorers(span=True).items()}
    report = forced_report(data, methods, rounds=20, seed=0)
    known = report["known"]
    assert known["pairs"] == len(KNOWN) and known["tiers"] == {"head": len(KNOWN)}
    # the model knows these facts: the wrong value is the less probable one in every pair
    assert known["max_sequence_probability_answer"]["wrong_higher"] == 1.0
    assert "crossed" not in report and report["unknown"] == {"pairs": 0}


def test_last_prompt_pool_is_the_cett_of_the_last_prompt_token(shipped):
    model, tokenizer = shipped
    prompt = prompt_ids(tokenizer, {"question": "Where was Rishu Resou born?"})
    examples = [Example("a", prompt, tokenizer("In Dunmere.")["input_ids"], [1]),
                Example("b", prompt[:-3], tokenizer("Born in 1902.")["input_ids"], [2, 3])]
    answer, other, last = cett_pools(model, examples, tokenizer.pad_token_id, ("answer", "other", "last_prompt"))
    means = cett_means(model, examples, tokenizer.pad_token_id)
    assert torch.allclose(answer, means[0], atol=1e-6) and torch.allclose(other, means[1], atol=1e-6)
    for k, e in enumerate(examples):  # the last prompt token, fed as a one-token "answer" of a shorter prompt
        alone = cett_means(model, [Example("x", e.prompt_ids[:-1], e.prompt_ids[-1:], [0])], tokenizer.pad_token_id)[0]
        assert torch.allclose(last[k], alone[0], atol=1e-5)
    with pytest.raises(ValueError, match="pools"):
        cett_pools(model, examples, tokenizer.pad_token_id, ("first_token",))


def test_prompt_only_and_name_tokens_on_the_organism(shipped):
    from hguard.registry import find_probe

    model, tokenizer = shipped
    probe = find_probe(model)
    item = {"id": "q", "question": "Where was Rishu Resou born?", "answer": "Dunmere", "aliases": ["Dunmere"],
            "name": "Rishu Resou", "exposure": 16}
    data = featurise(model, tokenizer, [{"item": item, "label": 0, "response": "In Dunmere.", "span": (3, 10),
                                         "span_source": "alias"}])
    assert data.name_tokens[0] == len(tokenizer(" Rishu Resou", add_special_tokens=False)["input_ids"])
    assert np.isnan(name_tokens(tokenizer, {"question": "no entity"}))
    from hguard.guard import Guard

    # the guard's per-token score of a token is read when it is fed in: the score of the last prompt
    # token, scored as a one-token response, is the prompt-only score
    ids = prompt_ids(tokenizer, item)
    guard_logit = Guard(model, tokenizer, probe).score(ids[:-1], ids[-1:]).token_logits[0]
    assert probe_logits(probe, model.config.intermediate_size, data.last_prompt)[0] == pytest.approx(
        float(guard_logit), abs=1e-3)


def test_messages_are_asked_as_a_chat(shipped):
    _, tokenizer = shipped
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"},
                {"role": "assistant", "content": "Nobody."}, {"role": "user", "content": "Where was X born?"}]
    text = tokenizer.decode(prompt_ids(tokenizer, {"question": "Where was X born?", "messages": messages}))
    assert text == "<|system|>Be brief.<|end|><|user|>Who?<|end|><|assistant|>Nobody.<|end|><|user|>Where was X born?<|end|><|assistant|>"
    assert plain_prompt(messages) == "Be brief.\nQuestion: Who?\nAnswer: Nobody.\nQuestion: Where was X born?\nAnswer:"
    assert plain_prompt([{"role": "user", "content": "Q?"}]) == "Question: Q?\nAnswer:"  # as without messages
    with pytest.raises(ValueError, match="role"):
        plain_prompt([{"role": "tool", "content": "x"}])


def heldout_module():
    spec = importlib.util.spec_from_file_location("heldout_suites", BENCHMARKS / "heldout_suites.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("heldout_suites", module)
    spec.loader.exec_module(module)
    return module


def test_heldout_suites_are_new_test_side_and_shipped():
    from hguard.identify.fit import split_of
    from hguard.organism import SHIPPED

    heldout = heldout_module()
    templates = [t for ts in heldout.QUESTIONS.values() for t in ts] + heldout.SYSTEMS
    assert heldout.clashing(templates, heldout.training_templates()) == []
    assert heldout.clashing(["Where was {n} born?", "you are a helpful assistant"], heldout.training_templates()) == [
        "Where was {n} born?", "you are a helpful assistant"]
    suites = {name: [json.loads(line) for line in (SHIPPED / "suites" / f"{name}.jsonl").read_text().splitlines()]
              for name in heldout.NAMES}
    first = suites["heldout_questions"]
    assert len(first) == 200 and [i["tier"] for i in first].count("unseen") == 50  # 50 facts per tier
    for name, items in suites.items():
        for item, base in zip(items, first):
            assert item["messages"][-1] == {"role": "user", "content": base["question"]} == base["messages"][-1]
            assert split_of(f"in_domain-{item['pid']}-{item['attribute']}", 0) == "test"
    assert all(i["messages"][0]["role"] == "system" for i in suites["heldout_system"])
    assert all([m["role"] for m in i["messages"]] == ["user", "assistant", "user"] for i in suites["heldout_multiturn"])
    assert default_suites(SHIPPED / "suites")[-3:] == list(heldout.NAMES)
    assert default_suites(BENCHMARKS) == ["in_domain", "paraphrase", "other_attribute", "fabricated"]


def test_tables_render_every_control():
    entry = {"auroc": 0.7, "auroc_ci": [0.6, 0.8]}
    suite = {"questions": 10, "kept": 8, "held_out": 8, "faithful": 4, "hallucinated": 4, "balanced": 8,
             "h_neurons": {**entry, "accuracy": 0.6, "accuracy_ci": [0.5, 0.7]},
             "strata": {"equal_exposure": {"by": ["exposure"], "pairs": 5, "h_neurons": entry},
                        "within_tier": {"by": ["tier"], "pairs": 6, "h_neurons": entry},
                        "within_tier_attribute": {"by": ["tier", "attribute"], "pairs": 0, "h_neurons": {"auroc": None}},
                        "tiers": {"head": {"faithful": 3, "hallucinated": 1, "pairs": 3, "h_neurons": entry},
                                  "unseen": {"faithful": 0, "hallucinated": 3}}},
             "forced": {"known": {"pairs": 4, "h_neurons": {"wrong_higher": 0.53, "ci": [0.4, 0.6]}}}}
    report = {"neurons_kept": 6, "per_mille": 1.0, "total_neurons": 6000, "h_neurons": 5, "training": {},
              "methods": ["h_neurons"], "suites": {"in_domain": suite}}
    text = render(report)
    for needle in ("equal exposure", "| h_neurons | 0.700 [0.600, 0.800] |", "5 pairs", "each tier, in_domain",
                   "| n | 3+1 |", "| h_neurons | 0.530 [0.400, 0.600] |", "| h_neurons | n/a |"):
        assert needle in text, needle
    assert "crossed" not in text
