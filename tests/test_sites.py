"""The architecture table, the generic search, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hguard import SITE_TABLE, Probe, UnsupportedModelError, resolve
from hguard.tiny import ARCHITECTURES

from conftest import load


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_resolves_to_its_down_projection(tiny_dirs, arch):
    model = load(tiny_dirs(arch))[0]
    sites = resolve(model)
    assert sites.model_type == arch and sites.num_layers == 2
    assert sites.intermediate_size == 64 and sites.hidden_size == 32
    assert sites.down_weight(0).shape == (32, 64)  # [hidden, intermediate] whatever the storage layout
    assert sites.up_weight(0).shape == (64, 32)
    z = torch.randn(1, 3, 64)
    h = sites.down(1)(z)
    bias = getattr(sites.down(1), "bias", None)
    expected = z @ sites.down_weight(1).t() + (bias if bias is not None else 0)
    assert torch.allclose(h, expected, atol=1e-5)


def test_table_and_fallback():
    assert {"llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2"} <= set(SITE_TABLE)
    assert SITE_TABLE["phi3"].up_fused and "gpt_neox" not in SITE_TABLE


def test_generic_search_finds_gpt_neox(tiny_dirs):
    sites = resolve(load(tiny_dirs("gpt_neox"))[0])
    assert sites.down_name == "mlp.dense_4h_to_h" and sites.up_name == "mlp.dense_h_to_4h"


def test_mixture_of_experts_resolves_to_its_routed_experts():
    from hguard.tiny import build_model

    sites = resolve(build_model("mixtral"))
    assert sites.down_name == "mlp.experts" and sites.experts == 4 and sites.intermediate_size == 4 * 64
    with pytest.raises(UnsupportedModelError, match="'mixtral'.*dense MLPs only"):
        sites.up_weight(0)
    # a model whose first layers are dense MLPs (DeepSeek's first_k_dense_replace, qwen's mlp_only_layers): its
    # expert layers are read, and a probe's layer l is the model's layer expert_layers[l]
    mixed = build_model("qwen3_moe", mlp_only_layers=[0], num_hidden_layers=3)
    sites = resolve(mixed)
    assert sites.layer_ids == (1, 2) and sites.num_layers == 2 and sites.layers[0] is mixed.model.layers[1]
    assert Probe.random(mixed, 5).fingerprint["expert_layers"] == [1, 2]


class _Config:
    model_type = "weirdnet"
    num_hidden_layers = 2


class _Weird(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])


def test_unknown_architecture_names_the_type():
    with pytest.raises(UnsupportedModelError, match="'weirdnet'"):
        resolve(_Weird())


def test_a_flattened_mlp_is_read_in_the_batch_shape():
    """OPT runs its MLP on [tokens, features]; hooks see z and h as [batch, positions, ...] (flat.py), and
    nothing stays wrapped after."""
    from hguard.flat import FlatDown
    from hguard.hooks import HookSpec, hook_count, hooked
    from hguard.conformance import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("opt")).eval()
    sites = resolve(model)
    view = sites.down(0)
    assert isinstance(view, FlatDown) and view.weight is view.module.weight
    seen = {}
    ids = torch.randint(3, 300, (2, 5))
    with torch.no_grad():
        plain = model(ids).logits
        with hooked([HookSpec(view, post=lambda m, args, out: seen.update(z=args[0], h=out))]):
            assert torch.equal(model(ids).logits, plain)
    assert seen["z"].shape == (2, 5, sites.intermediate_size) and seen["h"].shape == (2, 5, sites.hidden_size)
    assert hook_count(model) == 0 and "forward" not in view.module.__dict__ and "forward" not in sites.layers[0].__dict__
