"""Known probes: the ones shipped in `hguard/probes/`, paths in $HGUARD_PROBES, and registered paths.

`find_probe(model)` returns the first probe whose fingerprint (architecture and down-projection
column norms) matches the model, so `Guard(model)` needs no probe argument for a known model.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .probe import Probe, ProbeFormatError

SHIPPED = Path(__file__).parent / "probes"
_registered: list[Path] = []


class ProbeNotFoundError(LookupError):
    """No known probe fits the model."""


def register_probe(path: str | Path) -> Path:
    """Make a probe file known to `Guard(model)`; the file is read now, so a bad file fails here."""
    path = Path(path)
    Probe.load(path)
    if path not in _registered:
        _registered.insert(0, path)
    return path


def candidates() -> list[Path]:
    env = [Path(p) for p in os.environ.get("HGUARD_PROBES", "").split(os.pathsep) if p]
    found: list[Path] = []
    for entry in [*_registered, *env, SHIPPED]:
        found.extend(sorted(entry.glob("*.safetensors")) if entry.is_dir() else [entry])
    return found


def find_probe(model: nn.Module, *, strict: bool = True) -> Probe:
    """The first known probe that fits `model` (`strict=False`: its architecture only, for a model without
    weights)."""
    for path in candidates():
        try:
            probe = Probe.load(path)
        except (ProbeFormatError, OSError):
            continue
        if probe.mismatch(model, strict=strict) is None:
            return probe
    raise ProbeNotFoundError(
        f"no known probe fits this {getattr(model.config, 'model_type', type(model).__name__)!r} model. "
        "Fit one with `hguard identify --model <path-or-id> --data <qa.jsonl> --out probe.safetensors`, "
        "then pass probe='probe.safetensors', call hguard.register_probe(path), or list its directory "
        "in $HGUARD_PROBES. Probe.random(model, count) gives a random-neuron probe for experiments."
    )
