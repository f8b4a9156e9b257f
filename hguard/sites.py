"""Where the neurons live: one table from `model_type` to module paths, used by everything else.

A neuron is one element of the *input* of the MLP's down projection (gated MLPs: act(gate(x)) * up(x);
GPT-2 style: act(c_fc(x)) feeding c_proj). `resolve(model)` returns a `Sites` view with the decoder
layers, each layer's down projection and how its weight is laid out. Architectures missing from the
table go through a generic search for a down projection. In a mixture-of-experts model the neurons are
the routed experts' (experts.py): layer l's "down projection" is a virtual one over its E experts'
neurons laid end to end, neuron e * I + i. Where nothing fits, the error names the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .experts import ExpertsDown, check_layout, is_experts
from .flat import FlatDown


class UnsupportedModelError(ValueError):
    """The model's architecture has no known or discoverable neuron site."""


@dataclass(frozen=True)
class SiteSpec:
    """Module paths relative to the causal-LM wrapper (what `AutoModelForCausalLM` returns)."""

    layers: str  # the ModuleList of decoder blocks
    down: str  # inside a block: the down projection, whose input is the neuron vector z
    up: str  # inside a block: the up projection (rows = neurons); used by the drift analysis
    up_fused: bool = False  # up rows are the second half of a fused gate_up projection (phi3)
    flat: bool = False  # the layer runs its MLP on [tokens, features] (opt): hooks see it through flat.py


_GATED = SiteSpec(layers="model.layers", down="mlp.down_proj", up="mlp.up_proj")

SITE_TABLE: dict[str, SiteSpec] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    "olmo2": _GATED,
    "phi3": SiteSpec(layers="model.layers", down="mlp.down_proj", up="mlp.gate_up_proj", up_fused=True),
    "gpt2": SiteSpec(layers="transformer.h", down="mlp.c_proj", up="mlp.c_fc"),
    "opt": SiteSpec(layers="model.decoder.layers", down="fc2", up="fc1", flat=True),
}

# Last path component of a down projection in architectures outside the table.
_DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "w2", "wo")
_UP_NAMES = ("up_proj", "c_fc", "fc1", "dense_h_to_4h", "fc_in", "w1", "wi", "gate_up_proj")
_MLP_PARENTS = ("mlp", "feed_forward", "ffn", "mlp_block", "ff")
_MOE_TYPES = {
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba", "olmoe",
    "granitemoe", "phimoe", "gpt_oss", "llama4", "llama4_text", "switch_transformers", "nllb_moe",
    "hunyuan_v1_moe", "dots1", "lfm2_moe",
}
# Types that resolve but fail the conformance matrix (tests/test_conformance_matrix.py): refused, with what
# the matrix saw, until fixed.
_BROKEN: dict[str, str] = {
    "openai-gpt": "it has no KV cache and its left-padded batched generation fails inside transformers",
    **dict.fromkeys(
        ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus", "plbart",
         "trocr", "whisper"),
        "the decoder of an encoder-decoder model; its learned positions follow the cache length, not "
        "position_ids, so a left-padded batch row is scored at shifted positions (differs by ~1e-1)"),
    "dory": "its generation fails inside its own attention on a tiny config (mask length mismatch)",
    "deepseek_v4": "its compressed attention does not honour a left-padded batch's attention mask (a padded row's "
                   "logits differ from the row's alone by ~1e-1, without hguard)",
}
_MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class Sites:
    """The resolved neuron sites of one model instance."""

    model_type: str
    layers: tuple[nn.Module, ...]
    down_name: str
    up_name: str
    up_fused: bool
    transposed: bool  # True for GPT-2's Conv1D: weight is [in, out] instead of nn.Linear's [out, in]
    intermediate_size: int
    hidden_size: int
    layers_path: str = ""  # module path of the layers' ModuleList, from the causal-LM wrapper
    experts: int = 0  # routed experts per layer (mixture of experts; `down_name` is then the experts module)
    flat: bool = False  # the MLP runs on flattened tokens (SiteSpec.flat)
    layer_ids: tuple[int, ...] = ()  # the model's indices of `layers` where they are not all its layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def down(self, layer: int) -> nn.Module | ExpertsDown | FlatDown:
        """The module whose input is layer `layer`'s neuron vector z and whose output is h (hooks go here);
        for experts, their virtual down projection; for a flattened MLP, the view that unflattens it."""
        if self.experts:
            return _experts_view(self.layers[layer], self.down_name)
        if self.flat:
            return FlatDown.of(self.layers[layer].get_submodule(self.down_name), self.layers[layer])
        return self.layers[layer].get_submodule(self.down_name)

    def down_weight(self, layer: int) -> torch.Tensor:
        """W_down as [hidden, intermediate]: column j writes neuron j into the residual stream (dense MLPs)."""
        self._dense_only("the whole down projection")
        weight = self.down(layer).weight
        return weight.t() if self.transposed else weight

    def columns(self, layer: int, neurons: torch.Tensor) -> torch.Tensor:
        """[hidden, k] the down projection's columns of the given neurons: what one unit of each adds to h."""
        if self.experts:
            return self.down(layer).columns(neurons)
        weight = self.down_weight(layer)
        return weight.index_select(1, neurons.to(weight.device))

    def all_column_norms(self, layer: int) -> torch.Tensor:
        """[intermediate] ||W_down[:, j]|| of every neuron of layer `layer`, fp32."""
        if self.experts:
            return self.down(layer).column_norms()
        return torch.linalg.vector_norm(self.down_weight(layer).float(), dim=0)

    def _dense_only(self, what: str) -> None:
        if self.experts:
            raise UnsupportedModelError(f"model_type {self.model_type!r}: {what} is defined for dense MLPs only "
                                        "(this model's neurons are its routed experts')")

    def up_weight(self, layer: int) -> torch.Tensor:
        """W_up as [intermediate, hidden]: row j reads neuron j's up input (dense MLPs)."""
        self._dense_only("the up projection")
        weight = self.layers[layer].get_submodule(self.up_name).weight
        weight = weight.t() if self.transposed else weight
        return weight[self.intermediate_size:] if self.up_fused else weight

    def offloaded(self) -> list[int]:
        """Layers whose down projection holds no weights in memory (on the meta device: a `device_map` that
        offloads them to disk, which loads them only for the duration of each forward)."""
        return [i for i in range(self.num_layers) if self.down(i).weight.device.type == "meta"]

    def column_norms(self, layer: int, neurons: torch.Tensor) -> torch.Tensor:
        """||W_down[:, j]|| for the given neuron indices, in fp32 on the weight's device."""
        return torch.linalg.vector_norm(self.columns(layer, neurons).float(), dim=0)


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", type(model).__name__))


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _is_moe(model: nn.Module, model_type: str) -> bool:
    if model_type in _MOE_TYPES:
        return True
    config = _text_config(model)
    return any((getattr(config, key, None) or 0) > 1 for key in _MOE_CONFIG_KEYS)


def _in_out(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, transposed) for a Linear or a GPT-2 style Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        rows, cols = module.weight.shape  # Conv1D stores [in, out]
        return rows, cols, True
    return None


def _num_layers(model: nn.Module) -> int | None:
    config = _text_config(model)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    count = _num_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count):
            return name, module
    return None


def _find_in_block(block: nn.Module, names: tuple[str, ...], expands: bool) -> str | None:
    """Path of the MLP projection whose last name is in `names` and which widens (up) or narrows (down)."""
    for path, module in block.named_modules():
        parts = path.split(".")
        shape = _in_out(module)
        if shape is None or parts[-1] not in names:
            continue
        if len(parts) > 1 and not any(parent in _MLP_PARENTS for parent in parts[:-1]):
            continue
        if "attn" in path or "attention" in path:
            continue
        in_features, out_features, _ = shape
        if (out_features > in_features) == expands:
            return path
    return None


def _spec_for(model: nn.Module, model_type: str) -> SiteSpec:
    spec = SITE_TABLE.get(model_type)
    if spec is not None:
        try:
            model.get_submodule(spec.layers)
            return spec
        except AttributeError:
            pass  # e.g. a bare LlamaModel without the causal-LM wrapper: search instead
    found = _find_layers(model)
    if found is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r}: no list of decoder layers found; hguard supports "
            f"{sorted(SITE_TABLE)} and dense architectures whose MLP ends in a down projection"
        )
    layers_path, layers = found
    if "encoder" in layers_path.split("."):
        raise UnsupportedModelError(
            f"model_type {model_type!r}: its layers ({layers_path}) are an encoder's (a BERT-style model run "
            "as a decoder); hguard supports decoder-only models"
        )
    down = _find_in_block(layers[0], _DOWN_NAMES, expands=False)
    up = _find_in_block(layers[0], _UP_NAMES, expands=True)
    if down is None or up is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r}: no MLP down projection found in {layers_path}[0] (looked for "
            f"{', '.join(_DOWN_NAMES)} under an MLP module); add a SiteSpec to hguard.sites.SITE_TABLE"
        )
    return SiteSpec(layers=layers_path, down=down, up=up, up_fused=up.endswith("gate_up_proj"))


def refuse_moe(model_type: str, reason: str) -> None:
    """Raise the mixture-of-experts refusal, naming `model_type` and why."""
    raise UnsupportedModelError(f"model_type {model_type!r} is a mixture-of-experts model that hguard cannot read: "
                                f"{reason}")


def _experts_view(layer: nn.Module, path: str) -> ExpertsDown:
    """The virtual down projection of the experts module at `path` in `layer` (its parent: the MoE block)."""
    parent = path.rpartition(".")[0]
    return ExpertsDown.of(layer.get_submodule(path), layer.get_submodule(parent) if parent else layer)


def _experts_sites(model: nn.Module, model_type: str) -> Sites:
    """Sites of a mixture-of-experts model: every decoder layer's routed experts module (experts.py)."""
    found = _find_layers(model)
    if found is None:
        refuse_moe(model_type, "no list of decoder layers found")
    layers_path, layers = found
    paths = [next((path for path, module in layer.named_modules() if is_experts(module)), None) for layer in layers]
    ids = tuple(i for i, path in enumerate(paths) if path is not None)
    if not ids:
        refuse_moe(model_type, "no experts module with 3-D gate_up_proj and down_proj weights in its layers")
    if len({paths[i] for i in ids}) > 1:
        refuse_moe(model_type, f"its experts modules sit at different paths ({sorted({paths[i] for i in ids})})")
    layers = [layers[i] for i in ids]  # a layer with a dense MLP instead (DeepSeek's first ones) is not read
    paths = [paths[i] for i in ids]
    views = [_experts_view(layer, paths[0]) for layer in layers]
    if len({(v.num_experts, v.width, v.hidden, v.transposed) for v in views}) > 1:
        refuse_moe(model_type, "its layers' experts differ in number or width")
    problem = check_layout(views[0].experts)
    if problem is not None:
        refuse_moe(model_type, problem)
    first = views[0]
    return Sites(model_type=model_type, layers=tuple(layers), down_name=paths[0], up_name="", up_fused=False,
                 transposed=first.transposed, intermediate_size=first.intermediate_size, hidden_size=first.hidden,
                 layers_path=layers_path, experts=first.num_experts,
                 layer_ids=ids if len(ids) < len(found[1]) else ())


def resolve(model: nn.Module) -> Sites:
    """The neuron sites of `model`; raises UnsupportedModelError naming the model type."""
    model_type = model_type_of(model)
    if model_type in _BROKEN:
        raise UnsupportedModelError(f"model_type {model_type!r}: not supported: {_BROKEN[model_type]}")
    if _is_moe(model, model_type):
        return _experts_sites(model, model_type)
    spec = _spec_for(model, model_type)
    layers = tuple(model.get_submodule(spec.layers))
    shape = _in_out(layers[0].get_submodule(spec.down))
    if shape is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r}: {spec.layers}.0.{spec.down} is not a Linear or Conv1D layer"
        )
    intermediate, hidden, transposed = shape
    return Sites(
        model_type=model_type,
        layers=layers,
        down_name=spec.down,
        up_name=spec.up,
        up_fused=spec.up_fused,
        transposed=transposed,
        intermediate_size=intermediate,
        hidden_size=hidden,
        layers_path=spec.layers,
        flat=spec.flat,
    )
