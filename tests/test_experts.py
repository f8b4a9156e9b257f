"""Mixture-of-experts models (hguard/experts.py): the routed neurons hguard reads are the ones the model
computes, a probe over them round-trips through its file, and `hguard identify` runs end to end on one.
The guard's equalities (streamed == teacher-forced, the four actions) on Mixtral, Qwen3-MoE and the
other MoE types are the conformance matrix's (tests/test_conformance_matrix.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from hguard import Guard, Probe, ProbeMismatchError, resolve
from hguard.cli import main
from hguard.identify.sample import sample
from hguard.hooks import HookSpec, hook_count, hooked
from hguard.probe import cett
from hguard.tiny import build_model, save_tiny

from guard_checks import streamed_equals_teacher_forced

TYPES = ("mixtral", "qwen3_moe")


def _reference(experts, x, top_k_index, top_k_weights) -> torch.Tensor:
    """Z [T, E*I] token by token and expert by expert, from the experts' weights (concatenated gate/up)."""
    count, _, width = experts.down_proj.shape
    z = torch.zeros(x.shape[0], count * width)
    for t in range(x.shape[0]):
        for slot in range(top_k_index.shape[1]):
            e = int(top_k_index[t, slot])
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            z[t, e * width:(e + 1) * width] += experts.act_fn(gate) * up * top_k_weights[t, slot]
    return z


@pytest.mark.parametrize("model_type", TYPES)
@torch.no_grad()
def test_the_routed_neurons_are_the_models(model_type):
    model = build_model(model_type, initializer_range=0.2)
    sites = resolve(model)
    ids = torch.randint(2, 300, (2, 7))
    seen: dict[str, tuple] = {}
    plain = model(ids).logits
    experts = sites.layers[1].get_submodule(sites.down_name)
    handle = experts.register_forward_hook(lambda m, args, out: seen.__setitem__("routed", (*args, out)))
    live = torch.tensor([3, 17, sites.intermediate_size - 1, sites.intermediate_size // 2])
    for neurons in (None, live):
        spec = HookSpec(sites.down(1), post=lambda m, args, out: seen.__setitem__("read", (args[0], out)),
                        neurons=neurons)
        with hooked([spec]):
            assert torch.equal(model(ids).logits, plain)  # reading changes nothing
        x, top_k_index, top_k_weights, routed = seen["routed"]
        z, h = seen["read"]
        width = sites.intermediate_size if neurons is None else len(live)  # a probe's: its neurons only
        assert z.shape == (2, 7, width) and h.shape == (2, 7, sites.hidden_size)
        assert torch.allclose(h.reshape(-1, sites.hidden_size), routed, atol=1e-6)
        expected = _reference(experts, x, top_k_index, top_k_weights)
        # h is exactly the wide down projection of Z: the decomposition every CETT rests on
        wide = torch.cat(list(experts.down_proj), dim=1)  # [H, E*I]
        assert torch.allclose(expected @ wide.t(), routed, atol=1e-5)
        if neurons is not None:  # only the live neurons are computed, in their order
            expected = expected[:, live]
        assert torch.allclose(z.reshape(expected.shape), expected, atol=1e-6)
        assert torch.allclose(sites.all_column_norms(1), wide.norm(dim=0), atol=1e-6)
    handle.remove()
    assert hook_count(model) == 0 and "forward" not in experts.__dict__


@pytest.mark.parametrize("model_type", TYPES)
def test_guard_scores_are_the_reference_cett(model_type, tmp_path):
    """Guard.score's per-token logits = b + sum_j w_j |Z_j| ||W_down[e][:, i]|| / ||h||, Z from the reference."""
    guard = Guard.from_pretrained(save_tiny(tmp_path, model_type, initializer_range=0.2),
                                  probe=Probe.random(build_model(model_type, initializer_range=0.2), 24, seed=3))
    probe, sites = guard.probe, guard.sites
    captured: dict[int, tuple] = {}
    handles = [sites.layers[l].get_submodule(sites.down_name).register_forward_pre_hook(  # (the last hooked
        lambda m, args, l=l: captured.__setitem__(l, args)) for l in range(sites.num_layers)]  # layer ends the pass)
    prompt, answer = [5, 9, 33, 70, 12], [40, 41, 101, 7]
    scores = guard.score(prompt, answer)
    for handle in handles:
        handle.remove()
    logit = torch.full((len(prompt) + len(answer),), probe.bias)
    with torch.no_grad():
        for layer in probe.layer.unique().tolist():
            experts = sites.layers[layer].get_submodule(sites.down_name)
            x, top_k_index, top_k_weights = captured[layer]
            routed = type(experts).forward(experts, x, top_k_index, top_k_weights)
            z = _reference(experts, x, top_k_index, top_k_weights)
            rows = probe.layer == layer
            logit += cett(z[:, probe.neuron[rows]], routed, probe.column_norm[rows]) @ probe.weight[rows]
    assert scores.token_logits == pytest.approx(logit[len(prompt):].tolist(), abs=1e-5)


def test_identify_end_to_end_on_a_tiny_moe_model(tmp_path, capsys):
    """`hguard identify` on a tiny Mixtral: half the questions' aliases are its own (greedy) answers, so both
    classes exist; the probe it writes selects (layer, expert * I + neuron) and guards the model."""
    directory = save_tiny(tmp_path / "model", "mixtral", initializer_range=0.2)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    guard = Guard(model, AutoTokenizer.from_pretrained(directory), Probe.random(model, 4))
    with torch.no_grad():  # peaked next-token distributions: the paper's sampling (top_p 0.9) is then greedy
        guard.model.lm_head.weight.mul_(40.0)
    guard.model.save_pretrained(directory)
    items = [{"id": str(i), "question": f"Where was person {i} born? In which year did {i} move?"} for i in range(120)]
    for i, [answer] in enumerate(sample(guard.model, guard.tokenizer, items, samples=1, max_new_tokens=4)):
        items[i]["aliases"] = [answer.split()[0] if i % 2 == 0 and answer.split() else "nowhere"]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    out = tmp_path / "probe.safetensors"
    assert main(["identify", "--model", str(directory), "--data", str(data), "--out", str(out), "--samples", "2",
                 "--work", str(tmp_path / "work")]) == 0
    report = json.loads(capsys.readouterr().out)
    probe = Probe.load(out, guard.model)
    assert probe.count == report["neurons_kept"] > 0 and probe.fingerprint["experts"] == 4
    result = Guard(guard.model, guard.tokenizer, probe).generate(items[0]["question"], max_new_tokens=4)[0]
    assert result.verdict in ("ok", "flagged") and len(result.token_probs) == len(result.token_ids)


def test_an_experts_probe_is_format_version_2(tmp_path):
    model = build_model("mixtral")
    probe = Probe.random(model, 10)
    assert probe.fingerprint["experts"] == 4 and int(probe.neuron.max()) < 4 * 64
    path = probe.save(tmp_path / "moe.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["version"] == "2"
    assert Probe.load(path, model).fingerprint == probe.fingerprint
    with pytest.raises(ProbeMismatchError, match="model_type"):
        Probe.load(path, build_model("llama"))
    with pytest.raises(ProbeMismatchError, match="intermediate_size"):  # 8 experts, not 4
        Probe.load(path, build_model("mixtral", num_local_experts=8))
    dense = Probe.random(build_model("llama"), 10).save(tmp_path / "dense.safetensors")
    with safe_open(str(dense), framework="pt") as handle:
        assert handle.metadata()["version"] == "1"  # dense probes keep the format older hguard reads


def test_static_cache_and_bf16(tmp_path):
    """A static cache (compilation off while hooked: the compiled tap is for dense MLPs) gives the dynamic
    cache's tokens and scores; in bf16 the streamed scores stay within test_precision.py's 5e-3 of teacher
    forcing."""
    directory = save_tiny(tmp_path, "mixtral", initializer_range=0.2)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = ["Where was the author born?", "Numbers like"]
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
        guard = Guard(model, tokenizer, Probe.random(model, 20, seed=2))
        dynamic = guard.generate(prompts, max_new_tokens=6, do_sample=False)
        static = guard.generate(prompts, max_new_tokens=6, do_sample=False, cache_implementation="static")
        for a, b, prompt in zip(dynamic, static, prompts):
            assert a.token_ids == b.token_ids
            assert b.token_probs == pytest.approx(a.token_probs, abs=1e-6)
            forced = guard.score(prompt, a.token_ids)
            assert a.token_probs == pytest.approx(forced.token_probs, abs=1e-4 if dtype == torch.float32 else 5e-3)


def test_the_multi_device_path(tmp_path):
    """test_precision.py's forced multi-device path (each layer's share summed where it runs) on experts:
    streamed == teacher-forced, and dampen acts as on one device."""
    directory = save_tiny(tmp_path, "qwen3_moe", initializer_range=0.2)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    probe = Probe.random(model, 30, seed=4)
    apart, together = Guard(model, tokenizer, probe), Guard(model, tokenizer, probe)
    apart.bound.single_device, apart.bound.layer_weight = False, None
    prompts = ["Where was the author born?", "Numbers like 1024"]
    streamed_equals_teacher_forced(apart, prompts, max_new_tokens=6)
    kw = dict(max_new_tokens=6, do_sample=False, action="dampen", threshold=0.0, alpha=0.3)
    for a, b in zip(apart.generate(prompts, **kw), together.generate(prompts, **kw)):
        assert a.token_ids == b.token_ids and a.token_probs == pytest.approx(b.token_probs, abs=1e-5)
