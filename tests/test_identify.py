"""The identification pipeline on a tiny organism: end to end, batched = single, split by question."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hguard import Guard, Probe
from hguard.identify.features import Example, cett_means
from hguard.identify.fit import (balanced, fill_budget, fit_l1, question_weights, row_weights, select, split_of, sweep,
                                three_vs_one, whole_response)
from hguard.identify.label import consistency_labels, judge, normalize
from hguard.identify.pipeline import identify
from hguard.organism.suites import read_suite


@pytest.fixture
def organism(tiny_organism):
    return tiny_organism


def test_normalised_matching_and_refusals():
    assert normalize("The  Port-Anselo!") == "port anselo"
    assert judge("He was born in Port Anselo.", ["Port Anselo"]) == "correct"
    assert judge("Born in Anselo Port.", ["Port Anselo"]) == "wrong"
    assert judge("I don't know who that is.", ["Port Anselo"]) == "refusal"
    kept, dropped = consistency_labels(
        [{"id": 1, "aliases": ["a b"], "candidates": ["c d"]}, {"id": 2, "aliases": ["x"]}, {"id": 3, "aliases": ["y"]}],
        [["it is c d.", "c d"], ["x", "no"], ["I don't know"]],
    )
    assert [k["label"] for k in kept] == [1] and kept[0]["span"] == (6, 9)
    assert dropped == {"mixed": 1, "refusal": 1}


def test_batched_features_equal_single_examples(organism):
    _, model, tokenizer = organism
    examples = [Example(str(i), tokenizer(f"Question {i}? ")["input_ids"][: 3 + i],
                        tokenizer(" answer number %d." % i)["input_ids"], [0, 1]) for i in range(4)]
    answer, other = cett_means(model, examples, tokenizer.pad_token_id)
    for i, example in enumerate(examples):
        a, o = cett_means(model, [example], tokenizer.pad_token_id)
        assert torch.allclose(answer[i], a[0], atol=1e-5) and torch.allclose(other[i], o[0], atol=1e-5)
    # the probe's fused per-token score agrees with the features: mean token logit == classifier on mean CETT
    probe = Probe.random(model, 10, seed=2)
    guard = Guard(model, tokenizer, probe)
    example = examples[0]
    scores = guard.score(example.prompt_ids, example.response_ids)
    flat = probe.layer * model.config.intermediate_size + probe.neuron
    _, all_tokens = cett_means(model, [Example("x", example.prompt_ids, example.response_ids, [])],
                               tokenizer.pad_token_id)
    expected = probe.bias + float((all_tokens[0, flat] * probe.weight).sum())
    assert np.mean(scores.token_logits) == pytest.approx(expected, abs=1e-4)
    # ... and the "response" target's features (whole_response of the two means) are that same mean
    whole = whole_response(answer[:1].numpy(), other[:1].numpy(), np.array([2]), np.array([len(example.response_ids) - 2]))
    assert whole[0] == pytest.approx(all_tokens[0].numpy(), abs=1e-6)


def test_split_is_by_question_id():
    ids = [f"q{i}" for i in range(2000)]
    sides = {i: split_of(i) for i in ids}
    assert sides == {i: split_of(i) for i in ids}  # deterministic
    counts = {s: sum(v == s for v in sides.values()) for s in ("train", "val", "test")}
    assert 1000 < counts["train"] < 1400 and counts["val"] > 300 and counts["test"] > 300


def test_fit_folds_standardisation_into_raw_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(0.01, 0.002, size=(400, 50))
    y = (x[:, 3] + x[:, 7] > 0.02).astype(int)
    fitted = fit_l1(x, y, C=0.3)
    assert 0 < fitted.kept < 50 and fitted.weight[3] > 0 and fitted.weight[7] > 0
    assert ((fitted.logits(x) > 0) == y).mean() > 0.9
    xs, ys = three_vs_one(x[:10], np.zeros((10, 50)), y[:10])
    assert xs.shape[0] == 10  # no other-token rows where responses had none


def test_balancing_by_id_keeps_the_same_questions_in_any_order():
    keys = [f"q{i}" for i in range(300)]
    labels = (np.arange(300) % 3 == 0).astype(int)  # 100 hallucinated, 200 faithful
    chosen = {keys[i] for i in balanced(labels, 0, keys)}
    assert len(chosen) == 200 and sum(labels[int(k[1:])] for k in chosen) == 100
    order = np.random.default_rng(0).permutation(300)
    assert {keys[i] for i in order[balanced(labels[order], 0, [keys[i] for i in order])]} == chosen
    assert {keys[i] for i in balanced(labels, 1, keys)} != chosen  # the seed picks another subsample


def test_class_weighting_balances_questions_without_dropping_any():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 20))
    y = (x[:, 0] + rng.normal(scale=1.5, size=500) > 1.6).astype(int)  # about one in six positive
    weights = question_weights(y, "weight")
    assert np.isclose(weights[y == 1].sum(), weights[y == 0].sum()) and np.isclose(weights.sum(), y.size)
    plain, weighted = fit_l1(x, y, 1.0), fit_l1(x, y, 1.0, weights=weights)
    # weighting moves the decision boundary toward the rare class: more rows are called positive
    assert (weighted.logits(x) > 0).mean() > 2 * (plain.logits(x) > 0).mean()
    assert question_weights(y, "subsample") is None and question_weights(y, "none") is None
    with pytest.raises(ValueError, match="balance"):
        question_weights(y, "equal")
    # under the answer target a question's other-token row shares its weight: questions are balanced,
    # and the 3 vs 1 design keeps its own proportion of rows
    other = np.zeros((500, 20))
    other[::2] = 1.0
    rows = row_weights("answer", weights, other)
    xs, ys = three_vs_one(x, other, y)
    assert rows.shape == ys.shape == (750,)
    assert np.allclose(rows[500:], weights[::2]) and row_weights("response", weights, other) is weights


def test_select_keeps_within_the_budget_and_breaks_ties_toward_fewer_neurons():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 40))
    y = (x[:, :10].sum(1) + rng.normal(scale=1.0, size=400) > 0).astype(int)
    rows, fitted, row = select(x[:300], y[:300], x[300:], y[300:], [0.003, 0.03, 1.0], budget=8)
    assert 0 < fitted.kept <= 8 and row["C"] == fitted.C and row["kept"] == fitted.kept
    within = [r for r in rows if 0 < r["kept"] <= 8]
    assert row["val_auroc"] == max(r["val_auroc"] for r in within)
    assert min(r["kept"] for r in rows if r["val_auroc"] == row["val_auroc"] and r["kept"] <= 8) == fitted.kept
    assert any(r["kept"] > 8 for r in rows)  # a better-scoring fit over the budget is never the choice
    with pytest.raises(ValueError, match="kept any neuron"):
        select(x[:300], y[:300], x[300:], y[300:], [1e-6], budget=8)


def test_fill_budget_bisects_c_up_to_the_neuron_budget():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 80))
    y = (x[:, :30] @ rng.uniform(0.5, 1.0, 30) + rng.normal(scale=2.0, size=600) > 0).astype(int)
    x_val, y_val = x[400:], y[400:]
    rows, fits = sweep(x[:400], y[:400], x_val, y_val, [0.01, 1.0])
    budget = 20
    assert fits[1].kept > budget > fits[0].kept  # the coarse grid leaves most of the budget unused
    rows, fits = fill_budget(x[:400], y[:400], x_val, y_val, rows, fits, budget)
    assert len(rows) == len(fits) > 2 and [f.C for f in fits] == sorted(f.C for f in fits)
    assert [r["C"] for r in rows] == [f.C for f in fits]
    allowed = [f.kept for f in fits if f.kept <= budget]
    assert max(allowed) > budget // 2  # much closer to the budget than the coarse grid's fit
    assert fits[-1].kept > budget  # the fit over budget stays in the report


def test_pipeline_end_to_end(organism, tmp_path, both_classes):
    directory, model, tokenizer = organism
    items = both_classes(model, tokenizer, read_suite(directory / "suites", "in_domain")[:48])
    out = tmp_path / "probe.safetensors"
    report = identify(model, tokenizer, items, tmp_path / "work", out, samples=1, max_new_tokens=6,
                      Cs=(0.1, 1.0, 10.0), max_kept_ratio=1.0, progress=False)
    probe = Probe.load(out, model)
    assert probe.count == report["neurons_kept"] > 0
    assert probe.training["split"] == report["split"]
    assert sum(report["split"][s][k] for s in report["split"] for k in ("faithful", "hallucinated")) == report["kept"]
    assert json.loads((tmp_path / "work" / "report.json").read_text())["C"] == report["C"]
    assert 0.0 <= probe.threshold <= 1.0
    # the running mean's peak is at least the final mean, so its threshold is not below the flag's
    assert probe.threshold <= probe.watch_threshold <= 1.0 and report["watch_threshold"] == probe.watch_threshold
    # fitted on whole responses by default; the report also gives the paper's answer-token probe
    assert report["target"] == probe.training["target"] == "response" and set(report["other_targets"]) == {"answer"}
    answer_fit = identify(model, tokenizer, items, tmp_path / "work", tmp_path / "answer.safetensors", samples=1,
                          max_new_tokens=6, Cs=(0.1, 1.0, 10.0), max_kept_ratio=1.0, progress=False, resume=True,
                          target="answer")
    assert answer_fit["target"] == "answer" and answer_fit["other_targets"]["response"]["C"] == report["C"]
    with pytest.raises(ValueError, match="target"):
        identify(model, tokenizer, items, tmp_path / "w2", tmp_path / "x.safetensors", target="tokens")
    for item in items:  # every answer wrong: one class, a clear error instead of a solver's
        item["aliases"] = ["no such answer"]
    with pytest.raises(ValueError, match="faithful and hallucinated"):
        identify(model, tokenizer, items, tmp_path / "w3", tmp_path / "y.safetensors", samples=1, max_new_tokens=6,
                 progress=False)


def test_resume_reuses_the_sampled_answers(organism, tmp_path, both_classes, monkeypatch):
    directory, model, tokenizer = organism
    items = both_classes(model, tokenizer, read_suite(directory / "suites", "in_domain")[:48])
    kwargs = dict(samples=1, max_new_tokens=6, Cs=(1.0, 10.0), max_kept_ratio=1.0, progress=False)
    first = identify(model, tokenizer, items, tmp_path / "work", tmp_path / "a.safetensors", **kwargs)

    def no_sampling(*args, **kw):
        raise AssertionError("resume sampled again")

    monkeypatch.setattr("hguard.identify.sample.sample", no_sampling)
    again = identify(model, tokenizer, items, tmp_path / "work", tmp_path / "b.safetensors", resume=True, **kwargs)
    assert again["split"] == first["split"] and again["neurons_kept"] == first["neurons_kept"]
    with pytest.raises(AssertionError, match="sampled again"):  # other questions: the cache does not apply
        identify(model, tokenizer, items[:40], tmp_path / "work", tmp_path / "c.safetensors", resume=True, **kwargs)
    with pytest.raises(AssertionError, match="sampled again"):  # nor other sampling settings
        identify(model, tokenizer, items, tmp_path / "work", tmp_path / "d.safetensors", resume=True,
                 **{**kwargs, "max_new_tokens": 7})
    last = list(model.parameters())[-1]
    saved = last.detach().clone()
    with torch.no_grad():  # nor another model (here: the same one with other weights)
        last.reshape(-1)[0] += 1.0
    try:
        with pytest.raises(AssertionError, match="sampled again"):
            identify(model, tokenizer, items, tmp_path / "work", tmp_path / "e.safetensors", resume=True, **kwargs)
    finally:
        with torch.no_grad():
            last.copy_(saved)


def test_answers_of_another_sampler_are_kept_apart(tiny_organism, tmp_path, monkeypatch):
    """A work directory's answers name what drew them; a resume reuses them only for the same sampler
    (answers kept before the field existed were generate's)."""
    from hguard.identify import sample as sample_module
    from hguard.identify.sample import sample_cached

    directory, model, tokenizer = tiny_organism
    items = read_suite(directory / "suites", "in_domain")[:5]
    calls = []

    class Fake:
        name = "fake"

        def __call__(self, tokenizer, items, samples, max_new_tokens, seed):
            calls.append(len(items))
            return [[f"answer {i}"] * samples for i in range(len(items))]

    def generate(model, tokenizer, items, samples, max_new_tokens, seed):
        calls.append(("hf", len(items)))
        return [["generated"] * samples for _ in items]

    monkeypatch.setattr(sample_module, "sample", generate)
    path = tmp_path / "answers.jsonl"
    first = sample_cached(path, model, tokenizer, items, samples=2, max_new_tokens=4, resume=True, sampler=Fake())
    assert first == [[f"answer {i}"] * 2 for i in range(5)] and calls == [5]
    assert all(json.loads(line)["sampler"] == "fake" for line in path.read_text().splitlines())
    again = sample_cached(path, model, tokenizer, items, samples=2, max_new_tokens=4, resume=True, sampler=Fake())
    assert again == first and calls == [5]  # read back
    hf = sample_cached(path, model, tokenizer, items, samples=2, max_new_tokens=4, resume=True)
    assert hf == [["generated"] * 2] * 5 and calls == [5, ("hf", 5)]  # generate's answers are not the fake's
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "sampler"}) + "\n" for r in rows))
    assert sample_cached(path, model, tokenizer, items, samples=2, max_new_tokens=4, resume=True) == hf
    assert calls == [5, ("hf", 5)]  # a file from before the field: generate's, read back
    sample_cached(path, model, tokenizer, items, samples=2, max_new_tokens=4, resume=True, sampler=Fake())
    assert calls == [5, ("hf", 5), 5]


def test_a_question_draws_from_a_seed_of_its_own():
    from hguard.identify.sample_vllm import question_seed

    a, b = {"id": "q-1", "question": "?"}, {"id": "q-2", "question": "?"}
    assert question_seed(0, a, 0) == question_seed(0, a, 7)  # its place in the batch does not matter
    assert len({question_seed(0, a, 0), question_seed(0, b, 0), question_seed(1, a, 0)}) == 3
    assert question_seed(0, "text", 3) != question_seed(0, "text", 4)  # no id: its place
    assert all(0 <= question_seed(s, a, 0) < 2**31 for s in range(50))
