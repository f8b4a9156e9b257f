"""`hguard eval` on a tiny organism: statistics, scorers, the logit baselines and the report's shape."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from hguard import Probe
from hguard.cli import main
from hguard.identify.evaluate import (
    Collected, auroc, balanced, best_threshold, bootstrap, evaluate_suites, fabricated_labels, fact_side,
    probe_logits, probe_scorer, probe_target, response_stats,
)
from hguard.identify.features import Example, cett_means
from hguard.identify.logit_scores import logit_scores
from hguard.identify.tables import render
from hguard.organism.suites import read_suite

METHODS = ("h_neurons", "h_neurons_answer", "random_neurons", "all_neurons", "residual", "max_sequence_probability",
           "mean_token_entropy", "perplexity", "max_sequence_probability_answer", "mean_token_entropy_answer",
           "perplexity_answer", "fused", "logit_fused", "prompt_only", "name_tokens", "exposure")


@pytest.fixture
def organism(tiny_organism):
    return tiny_organism


def test_auroc_matches_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # rounding makes ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auroc(np.ones(5), np.arange(5)))


def test_balanced_threshold_and_bootstrap():
    y = np.array([1] * 30 + [0] * 10)
    index = balanced(y, seed=0)
    assert (y[index] == 1).sum() == (y[index] == 0).sum() == 10
    s = np.array([2.0] * 30 + [0.0] * 10)
    t = best_threshold(y, s)
    assert 0.0 < t < 2.0
    result = bootstrap(y, [s], [t], rounds=50, seed=0)
    assert result["auroc"] == 1.0 and result["accuracy"] == 1.0 and result["auroc_ci"] == [1.0, 1.0]
    noisy = bootstrap(y, [y + np.random.default_rng(1).normal(size=40)], [0.5], rounds=200, seed=0)
    low, high = noisy["auroc_ci"]
    assert low <= noisy["auroc"] <= high and 0.5 < noisy["auroc"] < 1.0 and high - low > 0.05


def test_logit_scores_are_lm_polygraphs():
    ll = [np.log([0.5, 0.25]), np.log([0.9])]
    ent = [np.array([0.2, 0.4]), np.array([1.0])]
    scores = logit_scores(ll, ent)
    assert scores["max_sequence_probability"] == pytest.approx([np.log(8), -np.log(0.9)])
    assert scores["perplexity"] == pytest.approx([np.log(8) / 2, -np.log(0.9)])
    assert scores["mean_token_entropy"] == pytest.approx([0.3, 1.0])
    import sys

    assert "lm_polygraph.estimators.max_probability" in sys.modules  # the library's own estimator ran


def test_fabricated_labels_need_unanimous_samples():
    items = [{"id": i, "question": "q", "aliases": []} for i in range(3)]
    samples = [["I don't know who X is."] * 3, ["Velamor."] * 3, ["Velamor.", "I have no information about X."]]
    kept, dropped = fabricated_labels(items, samples)
    assert [k["label"] for k in kept] == [0, 1] and dropped == {"mixed": 1}


def test_sides_follow_the_fact_not_the_phrasing():
    a = {"id": "in_domain-3-city", "pid": 3, "attribute": "city"}
    b = {"id": "paraphrase-3-city", "pid": 3, "attribute": "city"}
    assert fact_side(a) == fact_side(b)
    assert fact_side({"id": "q-17"}) in ("train", "val", "test")


def test_scorer_and_response_stats_agree_with_the_model(organism):
    _, model, tokenizer = organism
    examples = [Example(str(i), tokenizer(f"Question {i}? ")["input_ids"][: 3 + i],
                        tokenizer(" answer number %d." % i)["input_ids"], [0, 1]) for i in range(3)]
    probe = Probe.random(model, 8, seed=1)
    answer, other = cett_means(model, examples, tokenizer.pad_token_id)
    residual, ll, ent = response_stats(model, examples, tokenizer.pad_token_id)
    scores = probe_logits(probe, model.config.intermediate_size, answer.numpy())
    flat = probe.layer * model.config.intermediate_size + probe.neuron
    expected = probe.bias + (answer[:, flat] * probe.weight).sum(1)
    assert scores == pytest.approx(expected.numpy(), abs=1e-5)
    for i, example in enumerate(examples):  # padded batch == one unpadded pass per example
        ids = torch.tensor([example.prompt_ids + example.response_ids])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0], -1)
        start = len(example.prompt_ids)
        want = logp[start - 1:-1].gather(1, ids[0, start:, None])[:, 0]
        assert ll[i] == pytest.approx(want.numpy(), abs=1e-4)
        assert ent[i] == pytest.approx((-(logp.exp() * logp).sum(-1))[start - 1:-1].numpy(), abs=1e-4)
        states = torch.stack(out.hidden_states)[:, 0, [start, start + 1]].mean(1)
        assert residual[i] == pytest.approx(states.numpy(), abs=1e-4)


def test_report_has_every_method_per_suite(organism, both_classes):
    directory, model, tokenizer = organism
    train = both_classes(model, tokenizer, read_suite(directory / "suites", "in_domain"))
    para = both_classes(model, tokenizer, read_suite(directory / "suites", "paraphrase"))
    probe = Probe.random(model, 6, seed=0, training={"target": "response"})
    report = evaluate_suites(model, tokenizer, probe, {"in_domain": train, "paraphrase": para}, samples=1,
                             max_new_tokens=6, draws=2, rounds=20, Cs=(1.0, 10.0))
    assert report["target"] == "response" and report["neurons_kept"] == 6 and report["per_mille"] == pytest.approx(1000 * 6 / (2 * 64))
    for name in ("in_domain", "paraphrase"):
        suite = report["suites"][name]
        assert suite["held_out"] <= suite["kept"] <= suite["questions"]
        if "note" in suite:
            continue
        for method in METHODS:
            entry = suite[method]
            assert 0.0 <= entry["auroc"] <= 1.0 and 0.0 <= entry["accuracy"] <= 1.0
            assert entry["auroc_ci"][0] <= entry["auroc"] + 1e-9 and entry["auroc"] <= entry["auroc_ci"][1] + 1e-9
        strata = suite["strata"]
        assert strata["equal_exposure"]["by"] == ["exposure"] and set(METHODS) <= set(strata["within_tier"])
        held = suite["faithful"] + suite["hallucinated"]
        assert sum(t["faithful"] + t["hallucinated"] for t in strata["tiers"].values()) == held
        forced = suite["forced"]  # every faithful question has a wrong value to force (the alias was found)
        assert "note" in forced or forced["known"]["pairs"] == suite["faithful"]
    assert report["methods"] == list(METHODS) and report["skipped_methods"] == {}
    assert "equal exposure" in render(report)
    assert report["training"]["train"]["faithful"] > 0 and report["training"]["val"]["hallucinated"] > 0


def test_probe_is_scored_on_the_features_of_its_target(organism):
    _, model, _ = organism
    rng = np.random.default_rng(0)
    n, width = 5, model.config.num_hidden_layers * model.config.intermediate_size
    answer, other = rng.random((n, width)), rng.random((n, width))
    tokens = np.array([[1, 0], [2, 3], [1, 1], [3, 1], [2, 0]])
    data = Collected([str(i) for i in range(n)], np.zeros(n, int), np.array(["test"] * n, object), answer, other,
                     np.zeros((n, 1, 1)), [np.zeros(1)] * n, [np.zeros(1)] * n, tokens=tokens)
    whole = (tokens[:, :1] * answer + tokens[:, 1:] * other) / tokens.sum(1, keepdims=True)
    assert data.view("response") == pytest.approx(whole) and data.where(np.arange(n) > 2).view("response") == pytest.approx(whole[3:])
    for target, features in (("response", whole), ("answer", answer)):
        probe = Probe.random(model, 6, seed=3, training={"target": target})
        assert probe_scorer(probe, model.config.intermediate_size)(data) == pytest.approx(
            probe_logits(probe, model.config.intermediate_size, features))
    assert probe_target(Probe.random(model, 6)) == "answer"  # probes from before targets existed


def test_eval_reuses_kept_answers_and_those_of_identify(organism, both_classes, tmp_path, monkeypatch):
    from hguard.identify.pipeline import identify

    directory, model, tokenizer = organism
    train = both_classes(model, tokenizer, read_suite(directory / "suites", "in_domain")[:40])
    para = read_suite(directory / "suites", "paraphrase")[:30]
    common = dict(samples=1, max_new_tokens=6, seed=3)
    identify(model, tokenizer, train, tmp_path, tmp_path / "p.safetensors", Cs=(1.0, 10.0), max_kept_ratio=1.0,
             progress=False, **common)
    probe = Probe.random(model, 6, seed=0)
    options = dict(draws=2, rounds=20, Cs=(1.0, 10.0), work=tmp_path, **common)
    sampled = []
    real = __import__("hguard.identify.sample", fromlist=["sample"]).sample
    monkeypatch.setattr("hguard.identify.sample.sample", lambda *a, **k: sampled.append(len(a[2])) or real(*a, **k))
    first = evaluate_suites(model, tokenizer, probe, {"in_domain": train, "paraphrase": para}, resume=True, **options)
    assert sampled == [first["suites"]["paraphrase"]["questions"]]  # the training suite came from identify
    assert (tmp_path / "paraphrase.answers.jsonl").exists()
    again = evaluate_suites(model, tokenizer, probe, {"in_domain": train, "paraphrase": para}, resume=True, **options)
    assert len(sampled) == 1 and again["suites"] == first["suites"]


def test_eval_cli_refuses_missing_suites(organism, tmp_path, capsys):
    assert main(["eval", "--model", str(organism[0] / "instruct"), "--suites", str(tmp_path), "--json"]) == 2
    assert "in_domain.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("training, balance", [
    ({"target": "response"}, "none"),
    ({"target": "response", "balance": "weight"}, "weight"),
    ({"target": "answer", "balance": "subsample", "seed": 0}, "subsample"),
    ({"target": "answer", "balanced_train": True}, "subsample"),  # probes from before "balance" existed
])
def test_baselines_are_fitted_with_the_probes_balancing(organism, training, balance):
    from hguard.identify.evaluate import evaluate

    _, model, _ = organism
    rng = np.random.default_rng(0)
    n, width = 90, model.config.num_hidden_layers * model.config.intermediate_size
    labels = ((np.arange(n) // 3) % 3 == 0).astype(int)  # one hallucinated question in three, on every side
    planted = labels[:, None] * 2.0 * (np.arange(width) < 4)  # four neurons that tell the classes apart
    cett, other = rng.random((n, width)) + planted, rng.random((n, width)) + planted
    side = np.array(["train", "val", "test"] * 30, dtype=object)
    data = Collected([f"q{i}" for i in range(n)], labels, side, cett, other,
                     rng.normal(size=(n, 2, 4)), [np.zeros(2)] * n, [np.zeros(2)] * n,
                     tokens=np.tile([2, 3], (n, 1)))
    probe = Probe.random(model, 4, seed=0, training=training)
    report = evaluate(probe, model, data, {"in_domain": data}, draws=2, rounds=10, Cs=(1.0,), logit_baselines=False)
    train = report["training"]["train"]
    assert report["balance"] == balance
    if balance == "subsample":  # the larger class cut to the smaller one's size
        assert train["faithful"] == train["hallucinated"] == 10
    else:
        assert (train["faithful"], train["hallucinated"]) == (20, 10)
    assert report["suites"]["in_domain"]["all_neurons"]["auroc"] > 0.9  # the planted neurons are found
    bad = Probe.random(model, 4, seed=0, training={"balance": "equal"})
    with pytest.raises(ValueError, match="balance"):
        evaluate(bad, model, data, {"in_domain": data}, draws=1, rounds=5, Cs=(1.0,), logit_baselines=False)
