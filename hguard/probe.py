"""Probe: the H-Neuron classifier as one safetensors file, and its fused per-token score.

The classifier is the paper's: logit = b + sum_j w_j * CETT_j, with CETT_j = |z_j| * ||W_down[:, j]|| /
||h||. A probe may also read the token's own log-probability and the entropy of the distribution it was
drawn from (`token_weight`, issue 20: logit = ... + u_0 * log p(token) + u_1 * entropy; token_inputs.py).
It is linear in its inputs, so the per-token logit averaged over answer tokens is the response logit.
`Probe.bind(model)` groups the neurons by layer and folds the column norms into the weights once, so a
token costs one gather, an abs, a dot and one norm per layer that has selected neurons. The H-Neurons
(what `dampen`/`scale` act on) are the neurons with positive weight.

File layout: tensors `layer`, `neuron` (int64), `weight`, `column_norm` (fp32), `bias` (fp32, [1]);
optionally `token_weight` (fp32, [2]: the weights of the token's log-probability and entropy);
string metadata `format`, `version` ("1"; "2" for a mixture-of-experts model, whose fingerprint names
its `experts` per layer, and `expert_layers` where some layers are dense, and whose neuron index is
expert * expert_width + neuron; "3" for a probe with `token_weight`, which older readers must refuse),
`fingerprint` (JSON), `calibration` (JSON), `threshold`, optionally
`watch_threshold` (for the running mean; see policy.py), `training` (JSON) and `checksum` (sha256 of
the tensors). Loading onto the wrong model is a `ProbeMismatchError` naming the field that differs; a
damaged file is a `ProbeFormatError`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .policy import Calibration
from .sites import Sites, resolve

FORMAT = "hguard.probe"
VERSION = "1"  # dense models' probes
EXPERTS_VERSION = "2"  # mixture-of-experts models' probes (also read: "1")
TOKEN_INPUTS_VERSION = "3"  # a probe that also reads the token's log-probability and entropy (any model)
_VERSIONS = (VERSION, EXPERTS_VERSION, TOKEN_INPUTS_VERSION)
TOKEN_INPUTS = ("log_probability", "entropy")  # what `token_weight` weighs, in its order
EPS = 1e-6  # added to ||h|| in every CETT denominator (guard, scorer and feature extraction alike)


def cett(z: torch.Tensor, h: torch.Tensor, column_norm: torch.Tensor | float = 1.0) -> torch.Tensor:
    """The CETT feature, the one definition everything uses: |z_j| * ||W_down[:, j]|| / (||h|| + EPS) per
    position, for neuron values z [..., k] (all of a layer's, or a selection) and the down projection's
    output h [..., H] -> [..., k] fp32. With `column_norm` left at 1 the norms are folded elsewhere (the
    probe's weights). The decoding fast path (monitor.py) computes the same sum, sum_j w_j CETT_j, in a
    reordered form: (|z| @ w) / (||h|| + EPS) per layer, for all of a step's layers in one product."""
    return z.abs().float() * column_norm / (torch.linalg.vector_norm(h.float(), dim=-1, keepdim=True) + EPS)
NORM_RTOL = 2e-2  # column norms must agree this closely (covers bf16/fp16 copies of the same weights)
_ARCH_FIELDS = ("model_type", "num_layers", "hidden_size", "intermediate_size", "experts", "expert_layers")
_TENSORS = ("layer", "neuron", "weight", "column_norm", "bias")
_OPTIONAL = ("token_weight",)  # a version 3 probe's, and only its


class ProbeFormatError(ValueError):
    """The probe file is truncated, tampered with, or not a probe."""


class ProbeMismatchError(ValueError):
    """The probe was fitted on a different model; the message names the field."""


def fingerprint(sites: Sites) -> dict[str, object]:
    """The architecture a probe fits; `intermediate_size` counts every neuron of a layer (all experts')."""
    found: dict[str, object] = {
        "model_type": sites.model_type,
        "num_layers": sites.num_layers,
        "hidden_size": sites.hidden_size,
        "intermediate_size": sites.intermediate_size,
    }
    if sites.experts:
        found["experts"] = sites.experts
    if sites.layer_ids:  # a probe's layer l is the model's layer expert_layers[l]
        found["expert_layers"] = list(sites.layer_ids)
    return found


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in (*_TENSORS, *_OPTIONAL):
        if name not in tensors:
            continue
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Probe:
    """Selected neurons (layer, neuron), their weights, bias, column norms and calibration."""

    layer: torch.Tensor  # [k] int64
    neuron: torch.Tensor  # [k] int64
    weight: torch.Tensor  # [k] fp32
    bias: float
    column_norm: torch.Tensor  # [k] fp32, ||W_down[:, neuron]|| of the model it was fitted on
    fingerprint: dict[str, object]
    calibration: Calibration = field(default_factory=Calibration)
    threshold: float = 0.5
    training: dict[str, object] = field(default_factory=dict)
    watch_threshold: float | None = None  # for abstain/dampen's running mean; None: `threshold`
    source: str | None = field(default=None, compare=False)  # the file it was loaded from, if any
    token_weight: torch.Tensor | None = None  # [2] weights of the token's log-probability and entropy

    def __post_init__(self) -> None:
        k = self.layer.numel()
        if not (self.neuron.numel() == self.weight.numel() == self.column_norm.numel() == k):
            raise ProbeFormatError("probe tensors layer, neuron, weight and column_norm must have equal length")
        if k == 0:
            raise ProbeFormatError("probe selects no neuron")
        if not (torch.isfinite(self.weight).all() and torch.isfinite(self.column_norm).all()):
            raise ProbeFormatError("probe weights and column norms must be finite")
        if not math.isfinite(self.bias):
            raise ProbeFormatError("probe bias must be finite")
        if self.token_weight is not None:
            self.token_weight = self.token_weight.float().reshape(-1)
            if self.token_weight.numel() != len(TOKEN_INPUTS) or not torch.isfinite(self.token_weight).all():
                raise ProbeFormatError(f"probe token_weight must hold {len(TOKEN_INPUTS)} finite values "
                                       f"({', '.join(TOKEN_INPUTS)})")
        for name in ("threshold", "watch_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ProbeFormatError(f"probe {name} must lie in [0, 1], got {value}")
        layers, width = self.fingerprint.get("num_layers"), self.fingerprint.get("intermediate_size")
        if isinstance(layers, int) and not (0 <= int(self.layer.min()) and int(self.layer.max()) < layers):
            raise ProbeFormatError(f"probe layer index out of range for {layers} layers")
        if isinstance(width, int) and not (0 <= int(self.neuron.min()) and int(self.neuron.max()) < width):
            raise ProbeFormatError(f"probe neuron index out of range for intermediate size {width}")
        pairs = self.layer * (int(self.neuron.max()) + 1) + self.neuron
        if pairs.unique().numel() != k:
            raise ProbeFormatError("probe lists a neuron twice")

    @property
    def count(self) -> int:
        return self.layer.numel()

    @property
    def per_mille(self) -> float:
        total = int(self.fingerprint["num_layers"]) * int(self.fingerprint["intermediate_size"])
        return 1000.0 * self.count / total

    @property
    def h_neurons(self) -> torch.Tensor:
        """Boolean mask of the H-Neurons: the selected neurons with positive weight."""
        return self.weight > 0

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_weights(
        cls,
        model: nn.Module,
        layer: torch.Tensor,
        neuron: torch.Tensor,
        weight: torch.Tensor,
        bias: float,
        **kwargs,
    ) -> "Probe":
        """A probe for `model` from its fitted weights; column norms and fingerprint come from the model."""
        sites = resolve(model)
        layer, neuron = layer.long().cpu(), neuron.long().cpu()
        norms = torch.empty(layer.numel(), dtype=torch.float32)
        with torch.no_grad():
            for l in layer.unique().tolist():
                rows = (layer == l).nonzero().squeeze(1)
                norms[rows] = sites.column_norms(l, neuron[rows]).cpu()
        return cls(layer, neuron, weight.float().cpu(), float(bias), norms, fingerprint(sites), **kwargs)

    @classmethod
    def random(cls, model: nn.Module, count: int, seed: int = 0, **kwargs) -> "Probe":
        """`count` neurons drawn uniformly over all layers, with positive random weights.

        This is the random-neuron baseline's selection, and a stand-in probe for tests.
        """
        sites = resolve(model)
        total = sites.num_layers * sites.intermediate_size
        if not isinstance(count, int) or not 0 < count <= total:
            raise ValueError(f"count must be an integer in [1, {total}]; got {count!r}")
        generator = torch.Generator().manual_seed(seed)
        flat = torch.randperm(total, generator=generator)[:count].sort().values
        weight = torch.randn(count, generator=generator).abs() + 0.1
        return cls.from_weights(
            model, flat // sites.intermediate_size, flat % sites.intermediate_size, weight, 0.0, **kwargs
        )

    # ---- file I/O -----------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "layer": self.layer.long().contiguous(),
            "neuron": self.neuron.long().contiguous(),
            "weight": self.weight.float().contiguous(),
            "column_norm": self.column_norm.float().contiguous(),
            "bias": torch.tensor([self.bias], dtype=torch.float32),
        }
        if self.token_weight is not None:
            tensors["token_weight"] = self.token_weight.float().contiguous()
        return tensors

    @property
    def version(self) -> str:
        """The format version this probe is written as (the module docstring)."""
        if self.token_weight is not None:
            return TOKEN_INPUTS_VERSION
        return EXPERTS_VERSION if "experts" in self.fingerprint else VERSION

    @property
    def checksum(self) -> str:
        """sha256 of the probe's tensors, as its file records it."""
        return _checksum(self._tensors())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = self._tensors()
        metadata = {
            "format": FORMAT,
            "version": self.version,
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "calibration": self.calibration.to_json(),
            "threshold": repr(float(self.threshold)),
            "training": json.dumps(self.training, sort_keys=True),
            "checksum": _checksum(tensors),
        }
        if self.watch_threshold is not None:
            metadata["watch_threshold"] = repr(float(self.watch_threshold))
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, *, strict: bool = True) -> "Probe":
        """Read a probe file; with `model`, check that it was fitted on that model.

        `strict=False` checks only the architecture and takes the column norms from `model` (for the
        paper's transfer of an instruct model's probe to its base model).
        """
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                names = set(handle.keys())
                tensors = {name: handle.get_tensor(name) for name in names & {*_TENSORS, *_OPTIONAL}}
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ProbeFormatError(f"{path}: not a readable safetensors probe file ({error})") from error
        if metadata.get("format") != FORMAT:
            raise ProbeFormatError(f"{path}: metadata 'format' is {metadata.get('format')!r}, expected {FORMAT!r}")
        if metadata.get("version") not in _VERSIONS:
            raise ProbeFormatError(f"{path}: probe format version {metadata.get('version')!r} is not one of {_VERSIONS}")
        missing = set(_TENSORS) - names
        if missing:
            raise ProbeFormatError(f"{path}: missing tensors {sorted(missing)}")
        if ("token_weight" in tensors) != (metadata["version"] == TOKEN_INPUTS_VERSION):
            raise ProbeFormatError(f"{path}: a version {metadata['version']} probe "
                                   f"{'with' if 'token_weight' in tensors else 'without'} a token_weight tensor "
                                   f"(version {TOKEN_INPUTS_VERSION} probes, and only they, carry one)")
        if metadata.get("checksum") != _checksum(tensors):
            raise ProbeFormatError(f"{path}: checksum mismatch, the file was modified or damaged")
        try:
            probe = cls(
                layer=tensors["layer"].long(),
                neuron=tensors["neuron"].long(),
                weight=tensors["weight"].float(),
                bias=float(tensors["bias"].reshape(-1)[0]),
                column_norm=tensors["column_norm"].float(),
                fingerprint=json.loads(metadata["fingerprint"]),
                calibration=Calibration.from_json(metadata["calibration"]),
                threshold=float(metadata["threshold"]),
                training=json.loads(metadata.get("training", "{}")),
                watch_threshold=float(metadata["watch_threshold"]) if "watch_threshold" in metadata else None,
                source=str(path),
                token_weight=tensors.get("token_weight"),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, ProbeFormatError):
                raise
            raise ProbeFormatError(f"{path}: invalid probe metadata ({error})") from error
        if model is not None:
            probe.check(model, strict=strict)
            if not strict:
                probe.column_norm = Probe.from_weights(model, probe.layer, probe.neuron, probe.weight, 0.0).column_norm
        return probe

    # ---- matching -----------------------------------------------------------------------------
    def mismatch(self, model: nn.Module, *, strict: bool = True) -> str | None:
        """None if the probe fits `model`, else a sentence naming the first field that differs."""
        actual = fingerprint(resolve(model))
        for name in _ARCH_FIELDS:
            if self.fingerprint.get(name) != actual.get(name):
                return f"{name}: the probe was fitted on {self.fingerprint.get(name)!r}, the model has {actual.get(name)!r}"
        if strict:
            fresh = Probe.from_weights(model, self.layer, self.neuron, self.weight, 0.0).column_norm
            if not torch.allclose(fresh, self.column_norm, rtol=NORM_RTOL, atol=1e-6):
                worst = int(((fresh - self.column_norm).abs() / self.column_norm.abs().clamp_min(1e-6)).argmax())
                neuron = int(self.neuron[worst])
                experts = self.fingerprint.get("experts")
                if experts:  # name the expert and its own neuron index
                    expert, index = divmod(neuron, int(self.fingerprint["intermediate_size"]) // int(experts))
                    neuron = f"{index} of expert {expert}"
                return (
                    "column_norm (weights): the down-projection column of layer "
                    f"{int(self.layer[worst])} neuron {neuron} has norm "
                    f"{float(fresh[worst]):.6g}, the probe expects {float(self.column_norm[worst]):.6g}"
                )
        return None

    def check(self, model: nn.Module, *, strict: bool = True) -> None:
        problem = self.mismatch(model, strict=strict)
        if problem is not None:
            raise ProbeMismatchError(f"probe does not match this model: {problem}")

    def bind(self, model: nn.Module) -> "BoundProbe":
        return BoundProbe(self, resolve(model), model)


@dataclass
class LayerTerm:
    """One hooked layer's share of the fused score, on the layer's device."""

    layer: int
    index: torch.Tensor  # [k_l] where the selected neurons sit in the z the hooks see
    weight: torch.Tensor  # [k_l] probe weight * column norm (fp32)
    h_index: torch.Tensor  # [m_l] where the H-Neurons among them sit (the ones dampen/scale touch)
    neurons: torch.Tensor  # [k_l] the selected neurons' own indices (= index, but for experts.py's compact z)
    h_neurons: torch.Tensor  # [m_l] the H-Neurons' own indices

    def logit(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """sum_j w_j |z_j| ||W_j|| / ||h||, per position: z [B, T, I], h [B, T, H] -> [B, T] fp32."""
        return cett(z.index_select(-1, self.index), h) @ self.weight

    def scale(self, z: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
        """z with its H-Neurons multiplied by `factor` (a scalar, one value per row, or one per row and
        position), in place."""
        if self.h_index.numel() == 0:
            return z
        if isinstance(factor, torch.Tensor):
            factor = factor.to(device=z.device, dtype=z.dtype)
            factor = factor.view(*factor.shape, *([1] * (z.dim() - factor.dim())))
        return z.index_copy_(-1, self.h_index, z.index_select(-1, self.h_index) * factor)


class BoundProbe:
    """A probe's tensors placed on the devices of one model's layers, grouped by layer."""

    def __init__(self, probe: Probe, sites: Sites, model: nn.Module | None = None) -> None:
        self.probe = probe
        self.sites = sites
        self.model = model  # the causal LM (its logits feed a probe's token inputs)
        self.bias = probe.bias
        self.token_weight = probe.token_weight  # None: the probe reads neurons only
        self.terms: list[LayerTerm] = []
        for l in probe.layer.unique().tolist():
            rows = (probe.layer == l).nonzero().squeeze(1)
            device = sites.down(l).weight.device
            neurons = probe.neuron[rows]
            h = probe.weight[rows] > 0
            # an experts layer hands the hooks only the neurons they read, in this order (experts.py)
            index = torch.arange(neurons.numel()) if sites.experts else neurons
            self.terms.append(
                LayerTerm(
                    layer=l,
                    index=index.to(device),
                    weight=(probe.weight[rows] * probe.column_norm[rows]).to(device),
                    h_index=index[h].to(device),
                    neurons=neurons.to(device),
                    h_neurons=neurons[h].to(device),
                )
            )
        # The decoding fast path gathers every layer's selected z and ||h|| and combines them once per
        # step; it needs all hooked layers on one device (not so under a multi-device device_map).
        devices = {term.index.device for term in self.terms}
        self.single_device = len(devices) == 1
        # [k, hooked layers]: column t holds the weights of term t's neurons, zero elsewhere, so that
        # |z| @ layer_weight is each hooked layer's weighted sum in one matrix product
        self.layer_weight = (
            torch.block_diag(*(term.weight.unsqueeze(1) for term in self.terms)) if self.single_device else None
        )
        self._flat: dict[tuple[int, ...], torch.Tensor] = {}
        self._h_columns: dict[int, torch.Tensor] = {}

    def h_columns(self, term: LayerTerm) -> torch.Tensor:
        """[m_l, hidden] the down projection's columns of `term`'s H-Neurons (cached): what one unit of each
        adds to the layer's output h."""
        if term.layer not in self._h_columns:
            self._h_columns[term.layer] = self.sites.columns(term.layer, term.h_neurons).detach().t()
        return self._h_columns[term.layer]

    def flat_index(self, widths: tuple[int, ...]) -> torch.Tensor:
        """[k] positions of the selected neurons in the hooked layers' z vectors laid end to end, for
        layers of the given widths (cached: the widths are the same at every step)."""
        if widths not in self._flat:
            offsets = [0, *itertools.accumulate(widths)][:-1]
            self._flat[widths] = torch.cat([term.index + offset for term, offset in zip(self.terms, offsets)])
        return self._flat[widths]
