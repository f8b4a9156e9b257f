"""The probe inside vLLM's forward: each hooked layer's down projection, wrapped, writes its share of
the fused score into one persistent fp32 buffer.

`TappedDown` replaces `mlp.down_proj` of every layer the probe reads, after the weights are loaded
and before vLLM compiles or captures anything, so the added work is part of the compiled graph (and
of CUDA graphs): no hook, no Python per step. For the n tokens of a forward it computes, as the HF
guard does (probe.cett), the layer's part (sum_j w_j |z_j|) / (||h|| + EPS) of each token into
`parts[slot, :n]`, and multiplies the H-Neurons of z by `factor[:n]` (all ones unless a request
dampens), scoring the values from before that scaling. `ProbeTap.logits(n)` is then one sum over the
slots plus the bias: the token's probe logit.

Only what the guard checks runs: the architectures whose MLP vLLM writes as gate_up_proj -> SiluAndMul
-> down_proj (Llama, Mistral, Qwen2, Qwen3), unquantised, one tensor-parallel rank. Anything else is
refused by name before the engine starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..probe import EPS, NORM_RTOL, Probe

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class UnsupportedEngineModel(ValueError):
    """The vLLM engine cannot carry the probe on this model (the message names the reason)."""


class TappedDown(nn.Module):
    """A down projection that writes its layer's share of each token's probe logit into `parts[slot]`."""

    def __init__(self, inner: nn.Module, slot: int, index: torch.Tensor, weight: torch.Tensor,
                 h_index: torch.Tensor, h_columns: torch.Tensor, parts: torch.Tensor, factor: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.slot = inner, slot
        self.register_buffer("index", index, persistent=False)  # [k] the probe's neurons of this layer
        self.register_buffer("weight", weight, persistent=False)  # [k] probe weight * column norm, fp32
        self.register_buffer("h_index", h_index, persistent=False)  # [m] the H-Neurons among them
        self.register_buffer("h_columns", h_columns, persistent=False)  # [m, hidden] their columns, fp32
        self.register_buffer("parts", parts, persistent=False)  # [slots, max tokens], shared by all layers
        self.register_buffer("factor", factor, persistent=False)  # [max tokens], shared by all layers

    def forward(self, z: torch.Tensor):
        n = z.shape[0]
        read = z.index_select(-1, self.index).float().abs()  # what the probe reads: z before any scaling
        scale = self.factor[:n].unsqueeze(1)  # [n, 1]
        damped = z.index_select(-1, self.h_index)
        z.index_copy_(-1, self.h_index, damped * scale.to(z.dtype))
        out, bias = self.inner(z)
        # h as the unscaled z would have made it: add back what the scaling took away
        h = out.float() + ((1.0 - scale) * damped.float()) @ self.h_columns
        part = (read @ self.weight) / (torch.linalg.vector_norm(h, dim=-1) + EPS)
        self.parts[self.slot, :n].copy_(part)
        return out, bias


class ProbeTap:
    """A probe installed in one vLLM model: its buffers, and the per-token logits of the last forward."""

    def __init__(self, probe: Probe, model: nn.Module, max_tokens: int, columns: Columns, device: torch.device) -> None:
        """`columns(layer, neurons)` reads down-projection columns [hidden, k] from the checkpoint (vLLM
        may repack or drop a loaded weight, as its CPU kernels do)."""
        self.probe = probe
        self.bias = float(probe.bias)
        check_model(model, probe, columns)
        downs = _down_projections(model)
        layers = probe.layer.unique().tolist()
        self.parts = torch.zeros(len(layers), max_tokens, dtype=torch.float32, device=device)
        self.factor = torch.ones(max_tokens, dtype=torch.float32, device=device)
        self.max_tokens = max_tokens
        for slot, layer in enumerate(layers):
            rows = (probe.layer == layer).nonzero().squeeze(1)
            neurons = probe.neuron[rows]
            down = downs[layer]
            h_index = neurons[probe.weight[rows] > 0]
            h_columns = columns(layer, h_index).t().float().to(device)
            parent, name = _parent(model, down)
            setattr(parent, name, TappedDown(
                down, slot, neurons.to(device), (probe.weight[rows] * probe.column_norm[rows]).to(device),
                h_index.to(device), h_columns, self.parts, self.factor))

    def logits(self, n: int) -> list[float]:
        """The probe logits of the last forward's first n tokens (one device-to-host copy)."""
        return (self.parts[:, :n].sum(0) + self.bias).tolist()

    def set_factors(self, factors: torch.Tensor | None) -> None:
        """The H-Neuron factor of each token of the next forward (None: all ones)."""
        if factors is None:
            self.factor.fill_(1.0)
        else:
            self.factor[: factors.numel()].copy_(factors)
            self.factor[factors.numel():].fill_(1.0)


Columns = Callable[[int, torch.Tensor], torch.Tensor]


def checkpoint_columns(directory: str | Path) -> Columns:
    """A reader of `model.layers.{layer}.mlp.down_proj.weight` columns from a safetensors checkpoint
    (one file or an index of shards), reading only the columns asked for."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = {name: directory / shard for name, shard in json.loads(index.read_text())["weight_map"].items()}
    else:
        files = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                files.update({name: file for name in handle.keys()})
    if not files:
        raise UnsupportedEngineModel(f"{directory}: no safetensors weights (the vLLM engine reads the probe's "
                                     "down-projection columns from them)")

    def columns(layer: int, neurons: torch.Tensor) -> torch.Tensor:
        name = next((n for n in (f"model.layers.{layer}.mlp.down_proj.weight",
                                 f"model.language_model.layers.{layer}.mlp.down_proj.weight") if n in files), None)
        if name is None:
            raise UnsupportedEngineModel(f"{directory}: no down_proj weight for layer {layer} in the checkpoint")
        with safe_open(str(files[name]), framework="pt") as handle:
            weight = handle.get_slice(name)
            return torch.stack([weight[:, int(j)] for j in neurons.tolist()], dim=1) if neurons.numel() else \
                torch.empty(weight.get_shape()[0], 0)

    return columns


def check_model(model: nn.Module, probe: Probe, columns: Columns) -> None:
    """Raise UnsupportedEngineModel unless `probe` can run inside this vLLM `model` as loaded."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise UnsupportedEngineModel(f"the vLLM engine supports {', '.join(SUPPORTED)}; this model is {name}")
    downs = _down_projections(model)
    config = getattr(model, "config", None)
    for down in downs.values():
        method = type(getattr(down, "quant_method", None)).__name__
        if method not in ("UnquantizedLinearMethod", "NoneType"):
            raise UnsupportedEngineModel(f"quantised weights ({method}) are not supported by the vLLM engine")
        if getattr(down, "tp_size", 1) != 1:
            raise UnsupportedEngineModel("tensor parallelism is not supported by the vLLM engine yet (tp=1 only)")
    expected = probe.fingerprint
    actual = {"model_type": getattr(config, "model_type", None), "num_layers": len(downs),
              "hidden_size": getattr(config, "hidden_size", None),
              "intermediate_size": getattr(config, "intermediate_size", None)}
    for field, value in actual.items():
        if expected.get(field) != value:
            raise UnsupportedEngineModel(
                f"probe does not match this model: {field}: the probe was fitted on {expected.get(field)!r}, "
                f"the model has {value!r}")
    for layer in probe.layer.unique().tolist():
        rows = (probe.layer == layer).nonzero().squeeze(1)
        norms = columns(layer, probe.neuron[rows]).float().norm(dim=0)
        for row, norm in zip(rows.tolist(), norms.tolist()):
            want = float(probe.column_norm[row])
            if abs(norm - want) > NORM_RTOL * abs(want) + 1e-6:
                raise UnsupportedEngineModel(
                    f"probe does not match this model: column_norm (weights): the down-projection column of layer "
                    f"{layer} neuron {int(probe.neuron[row])} has norm {norm:.6g}, the probe expects {want:.6g}")


def _down_projections(model: nn.Module) -> dict[int, nn.Module]:
    """layer index -> its MLP's down projection (gate_up_proj -> act_fn -> down_proj MLPs only)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UnsupportedEngineModel(f"{type(model).__name__}: no decoder layers at model.layers")
    downs = {}
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, a) for a in ("gate_up_proj", "act_fn", "down_proj")):
            raise UnsupportedEngineModel(
                f"layer {i} of {type(model).__name__} has no gate_up_proj/act_fn/down_proj MLP "
                "(pipeline parallelism and mixture-of-experts layers are not supported by the vLLM engine)")
        if type(mlp.act_fn).__name__ != "SiluAndMul":
            raise UnsupportedEngineModel(f"layer {i}: activation {type(mlp.act_fn).__name__} (SiluAndMul only)")
        down = mlp.down_proj
        downs[i] = down.inner if isinstance(down, TappedDown) else down
    return downs


def _parent(model: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for name, sub in module.named_children():
            if sub is child:
                return module, name
    raise LookupError("module not found in the model")
