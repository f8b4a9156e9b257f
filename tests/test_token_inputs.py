"""A probe's token inputs (issue 20): the token's log-probability and entropy inside the fused score."""

from __future__ import annotations

import pytest
import torch

from hguard import Guard, Probe
from hguard.probe import ProbeFormatError
from hguard.token_inputs import log_probability_and_entropy

from conftest import PROMPTS, load
from guard_checks import TOL, abstain_extremes, dampen_acts_from_the_step_after_the_flag, streamed_equals_teacher_forced

WEIGHT = torch.tensor([-0.7, 0.9])


def token_guard(tiny_dirs, model_type: str = "llama", count: int = 12, weight: torch.Tensor = WEIGHT) -> Guard:
    model, tokenizer = load(tiny_dirs(model_type))
    return Guard(model, tokenizer, Probe.random(model, count, seed=1, token_weight=weight))


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "mixtral"])  # gemma2: final soft-capping; mixtral: experts
@pytest.mark.parametrize("batch", [1, 4])
def test_streamed_scores_equal_teacher_forced(tiny_dirs, arch, batch):
    streamed_equals_teacher_forced(token_guard(tiny_dirs, arch), PROMPTS[:batch])


def test_the_term_is_the_models_own_log_probability_and_entropy(tiny_dirs):
    """score(with token inputs) - score(neurons alone) == u0 log p(token) + u1 H, from a plain forward."""
    guard = token_guard(tiny_dirs)
    plain = Guard(guard.model, guard.tokenizer, Probe.random(guard.model, 12, seed=1))
    prompt, response = PROMPTS[0], guard.generate([PROMPTS[0]], max_new_tokens=8, do_sample=False)[0].token_ids
    assert response
    with_tokens, alone = guard.score(prompt, response), plain.score(prompt, response)
    ids = torch.tensor([guard.encode(prompt) + response])
    with torch.no_grad():
        logits = guard.model(input_ids=ids).logits[0]
    start = ids.shape[1] - len(response)
    log_p, entropy = log_probability_and_entropy(logits[start - 1:-1], ids[0, start:])
    expected = WEIGHT[0] * log_p + WEIGHT[1] * entropy
    difference = torch.tensor(with_tokens.token_logits, dtype=torch.float64) - torch.tensor(alone.token_logits, dtype=torch.float64)
    assert torch.allclose(difference, expected.double(), atol=TOL)
    assert expected.abs().max() > 0.1  # the term is not negligible here


@pytest.mark.parametrize("action", ["abstain", "dampen"])
def test_actions_keep_their_invariants(tiny_dirs, action):
    guard = token_guard(tiny_dirs, count=40)
    if action == "abstain":
        abstain_extremes(guard, PROMPTS)
    else:
        dampen_acts_from_the_step_after_the_flag(guard, PROMPTS)


def test_the_probe_file_round_trips_as_version_3(tiny_dirs, tmp_path):
    from safetensors import safe_open

    guard = token_guard(tiny_dirs)
    path = guard.probe.save(tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["version"] == "3"
    again = Probe.load(path, guard.model)
    assert torch.equal(again.token_weight, WEIGHT)
    assert Probe.load(Probe.random(guard.model, 4).save(tmp_path / "q.safetensors")).token_weight is None
    with pytest.raises(ProbeFormatError, match="token_weight"):
        Probe.random(guard.model, 4, token_weight=torch.tensor([1.0, float("nan")]))
    # a file whose version says otherwise than its tensors (here: version 3 without token_weight)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    del tensors["token_weight"]
    from hguard.probe import _checksum

    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**metadata, "checksum": _checksum(tensors)})
    with pytest.raises(ProbeFormatError, match="version 3 probe without a token_weight"):
        Probe.load(tmp_path / "bad.safetensors")
    with pytest.raises(ProbeFormatError, match="token_weight"):
        Probe.random(guard.model, 4, token_weight=torch.tensor([1.0, 2.0, 3.0]))


def test_proxy_scorers_equal_teacher_forced_piece_by_piece_and_together(tiny_dirs):
    """Proxy mode's incremental scorers: each piece's first token takes its term from the logits the
    scorer kept; a rewind of a token or two keeps them, a deeper one starts again; always Guard.score's."""
    from hguard.incremental import IncrementalScorer, score_together

    guard = token_guard(tiny_dirs)
    answers = [r.token_ids + [11, 12, 13, 14, 15, 16] for r in guard.generate(PROMPTS, max_new_tokens=10, do_sample=False)]
    scorers = [IncrementalScorer(guard, p) for p in PROMPTS]
    for steps in ([1, 1, 3, 0], [2, 5, 3, 4], [3, 6, 4, 5], [9, 6, 3, 8], [8, 6, 2, 8], [30, 30, 30, 30], [2, 4, 2, 4]):
        responses = [a[:max(1, s)] for a, s in zip(answers, steps)]
        for prompt, response, got in zip(PROMPTS, responses, score_together(scorers, responses)):
            assert got.token_logits == pytest.approx(guard.score(prompt, response).token_logits, abs=TOL)
    scorer = IncrementalScorer(guard, PROMPTS[1])
    ids = answers[1]
    for response in (ids[:5], ids[:4] + [7], ids[:4] + [8, 9], ids[:2] + [3, 4, 5], ids):
        before = scorer.forwarded
        assert scorer.score_ids(response).token_logits == pytest.approx(guard.score(PROMPTS[1], response).token_logits,
                                                                        abs=TOL)
    assert scorer.forwarded - before == len(ids) - 2  # the last rewind: two tokens stood, their logits kept


def test_identify_fits_token_inputs_and_the_features_mean_is_the_guards_score(tiny_organism, tmp_path, both_classes):
    """`identify(token_inputs=True)` writes a probe with token_weight and neurons within the budget; the
    features it was fitted on give, through the probe, the mean of Guard.score's per-token logits."""
    import numpy as np

    from hguard.identify.features import Example, cett_means
    from hguard.identify.fit import whole_response
    from hguard.identify.pipeline import identify
    from hguard.organism.suites import read_suite

    directory, model, tokenizer = tiny_organism
    items = both_classes(model, tokenizer, read_suite(directory / "suites", "in_domain")[:48])
    out = tmp_path / "probe.safetensors"
    report = identify(model, tokenizer, items, tmp_path / "work", out, samples=1, max_new_tokens=6,
                      Cs=(0.1, 1.0, 10.0), max_kept_ratio=1.0, progress=False, token_inputs=True,
                      compare_targets=False)
    probe = Probe.load(out, model)
    assert probe.token_weight is not None and report["token_inputs"] and probe.count == report["neurons_kept"] > 0
    guard = Guard(model, tokenizer, probe)
    prompt = [{"role": "user", "content": items[0]["question"]}]
    response = guard.generate([prompt], max_new_tokens=6, do_sample=False, action="off")[0].token_ids
    assert len(response) >= 2
    example = Example("x", guard.encode(prompt), response, [0])
    answer, other = (t.numpy() for t in cett_means(model, [example], tokenizer.pad_token_id, tokens=True))
    whole = whole_response(answer, other, np.array([1]), np.array([len(response) - 1]))[0]
    width = model.config.intermediate_size
    flat = (probe.layer * width + probe.neuron).numpy()
    expected = probe.bias + whole[flat] @ probe.weight.numpy() + whole[-2:] @ probe.token_weight.numpy()
    assert np.mean(guard.score(prompt, response).token_logits) == pytest.approx(float(expected), abs=1e-4)


def test_eval_scores_a_probe_with_token_inputs_as_the_guard_does(tiny_organism, both_classes):
    """`hguard eval`'s h_neurons on a suite's rows is the mean of Guard.score's per-token logits, and
    h_neurons_alone is that less the token inputs' mean term."""
    import numpy as np

    from hguard.identify.collected import collect
    from hguard.identify.evaluate import probe_scorer
    from hguard.identify.pipeline import examples_for
    from hguard.organism.suites import read_suite

    directory, model, tokenizer = tiny_organism
    items = both_classes(model, tokenizer, read_suite(directory / "suites", "in_domain")[:12])
    data = collect(model, tokenizer, items, samples=1, max_new_tokens=6)
    probe = Probe.random(model, 12, seed=3, token_weight=WEIGHT)
    probe.training["target"] = "response"
    guard = Guard(model, tokenizer, probe)
    full, alone = probe_scorer(probe, model.config.intermediate_size)(data), \
        probe_scorer(probe, model.config.intermediate_size, alone=True)(data)
    examples, _ = examples_for(tokenizer, data.records)
    assert len(examples) == len(data.keys) >= 4
    for row, example in enumerate(examples):
        logits = guard.score(example.prompt_ids, example.response_ids).token_logits
        assert full[row] == pytest.approx(np.mean(logits), abs=1e-4)
        term = WEIGHT[0].item() * data.log_likelihoods[row].mean() + WEIGHT[1].item() * data.entropies[row].mean()
        assert alone[row] == pytest.approx(full[row] - term, abs=1e-4)


@pytest.mark.parametrize("kwargs", [{"cache_implementation": "static"}, {"use_cache": False}])
def test_static_cache_and_no_cache_score_as_teacher_forced(tiny_dirs, kwargs):
    """A static cache (no compiled hooks for token inputs: the eager monitor) and generation without a cache
    (each step runs the whole sequence; the final token's forward too) give Guard.score's numbers."""
    import math
    import statistics

    from hguard.policy import Calibration

    guard = token_guard(tiny_dirs)
    logits = [v for p, r in zip(PROMPTS, guard.generate(PROMPTS, max_new_tokens=8, do_sample=False))
              for v in guard.score(p, r.token_ids).token_logits if r.token_ids]
    spread = statistics.pstdev(logits) or 1.0  # probabilities spread over (0, 1): they give back the logits
    a, b = 1 / spread, -statistics.mean(logits) / spread
    guard.probe.calibration = Calibration("platt", a=a, b=b)
    unsaturated = 0
    for prompt, result in zip(PROMPTS, guard.generate(PROMPTS, max_new_tokens=8, do_sample=False, **kwargs)):
        if result.token_ids:
            streamed = [(math.log(p / (1 - p)) - b) / a for p in result.token_probs]
            assert streamed == pytest.approx(guard.score(prompt, result.token_ids).token_logits, abs=TOL)
            unsaturated += sum(0.01 < p < 0.99 for p in result.token_probs)
    assert unsaturated > 0


def test_identify_by_default_keeps_what_wins_on_validation(tiny_organism, tmp_path, both_classes):
    """token_inputs="auto" (the default) fits with and without the token inputs and keeps the better fit
    on validation; the report gives both AUROCs; a bad mode is refused by name."""
    from hguard.identify.pipeline import identify
    from hguard.organism.suites import read_suite

    directory, model, tokenizer = tiny_organism
    items = both_classes(model, tokenizer, read_suite(directory / "suites", "in_domain")[:48])
    kwargs = dict(samples=1, max_new_tokens=6, Cs=(0.1, 1.0, 10.0), max_kept_ratio=1.0, progress=False,
                  compare_targets=False)
    report = identify(model, tokenizer, items, tmp_path / "work", tmp_path / "auto.safetensors", **kwargs)
    compared = report["token_inputs_compared"]
    assert set(compared) == {"on", "off"}
    winner = "on" if compared["on"] > compared["off"] else "off"
    assert report["token_inputs"] == (winner == "on")
    assert (Probe.load(tmp_path / "auto.safetensors").token_weight is not None) == (winner == "on")
    off = identify(model, tokenizer, items, tmp_path / "work", tmp_path / "off.safetensors", resume=True,
                   token_inputs=False, **kwargs)
    assert off["token_inputs_compared"] == {"off": compared["off"]}
    assert Probe.load(tmp_path / "off.safetensors").token_weight is None
    with pytest.raises(ValueError, match="token_inputs"):
        identify(model, tokenizer, items, tmp_path / "work", tmp_path / "x.safetensors", token_inputs="sometimes")
