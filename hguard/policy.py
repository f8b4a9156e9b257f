"""Pure decisions: how a probe logit becomes a probability, and a probability becomes an action.

Nothing here touches a model. `Calibration` maps the probe's raw logit to a probability (Platt or
isotonic, fitted on held-out data by the identification pipeline); it works on torch tensors so the
guard can apply it on the model's device, and on plain floats for reports. `Policy` holds one
request's validated choice (action, threshold, alpha); the `verdict` and `flagged_spans` helpers turn
finished token scores into what the user sees.

Two thresholds, because two statistics are thresholded: a finished response is flagged when its mean
probability reaches `threshold`; abstain and dampen act during generation, the first time the running
mean reaches `watch_threshold`. The running mean is tested at every token, so it crosses a level more
often than the final mean does (the early means of short answers swing widely); a probe's watch
threshold is fitted to the peak of the running mean (`running_peak`) for the same false-flag rate.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .actions import ACTIONS, Action  # noqa: F401  (ACTIONS re-exported for hguard.__init__)

Verdict = Literal["ok", "flagged", "abstained", "dampened"]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True)
class Calibration:
    """Logit -> probability. `platt`: sigmoid(a * logit + b). `isotonic`: piecewise-linear through (x, y)."""

    method: Literal["platt", "isotonic"] = "platt"
    a: float = 1.0
    b: float = 0.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in ("platt", "isotonic"):
            raise ValueError(f"calibration method must be 'platt' or 'isotonic', got {self.method!r}")
        if self.method == "isotonic":
            if len(self.x) < 2 or len(self.x) != len(self.y):
                raise ValueError("isotonic calibration needs at least two (x, y) points of equal count")
            if any(b < a for a, b in zip(self.x, self.x[1:])) or any(b < a for a, b in zip(self.y, self.y[1:])):
                raise ValueError("isotonic calibration points must be non-decreasing in x and y")
            if not all(0.0 <= v <= 1.0 for v in self.y):
                raise ValueError("isotonic calibration y values must lie in [0, 1]")
        values = (self.a, self.b, *self.x, *self.y)
        if not all(math.isfinite(v) for v in values):
            raise ValueError("calibration parameters must be finite")

    def __call__(self, logit: torch.Tensor) -> torch.Tensor:
        if self.method == "platt":
            return torch.sigmoid(logit * self.a + self.b)
        xs = torch.tensor(self.x, dtype=logit.dtype, device=logit.device)
        ys = torch.tensor(self.y, dtype=logit.dtype, device=logit.device)
        flat = logit.reshape(-1).clamp(xs[0], xs[-1])
        right = torch.searchsorted(xs, flat, right=True).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = xs[right - 1], xs[right], ys[right - 1], ys[right]
        slope = torch.where(x1 > x0, (y1 - y0) / (x1 - x0).clamp_min(1e-12), torch.zeros_like(x0))
        return (y0 + slope * (flat - x0)).reshape(logit.shape)

    def probs(self, logits: Sequence[float]) -> list[float]:
        """The same map on host floats: what a streamed step or a finished answer reports (a few rows
        or tokens, where a tensor op per row costs more than the arithmetic)."""
        if self.method == "platt":
            return [_sigmoid(v * self.a + self.b) for v in logits]
        xs, ys = self.x, self.y
        out = []
        for v in logits:
            v = min(max(v, xs[0]), xs[-1])
            right = min(max(bisect.bisect_right(xs, v), 1), len(xs) - 1)
            x0, x1, y0, y1 = xs[right - 1], xs[right], ys[right - 1], ys[right]
            out.append(y0 + ((y1 - y0) / max(x1 - x0, 1e-12) if x1 > x0 else 0.0) * (v - x0))
        return out

    def prob(self, logit: float) -> float:
        return self.probs([logit])[0]

    def to_json(self) -> str:
        if self.method == "platt":
            return json.dumps({"method": "platt", "a": self.a, "b": self.b})
        return json.dumps({"method": "isotonic", "x": list(self.x), "y": list(self.y)})

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("calibration must be a JSON object")
        return cls(
            method=data.get("method", "platt"),
            a=float(data.get("a", 1.0)),
            b=float(data.get("b", 0.0)),
            x=tuple(float(v) for v in data.get("x", ())),
            y=tuple(float(v) for v in data.get("y", ())),
        )


@dataclass(frozen=True)
class Policy:
    """One generation's guard settings, validated on construction (a guard that is off has none).

    flag    score and report; change nothing.
    abstain stop a sequence once its running hallucination probability reaches `watch_threshold`.
    dampen  from then on, scale that sequence's H-Neurons by `alpha`.
    scale   scale the H-Neurons by `alpha` at every position from the first token (the paper's
            fixed-alpha intervention); alpha = 1 is a no-op, 0 silences them, > 1 amplifies.
    """

    action: Action = "flag"
    threshold: float = 0.5
    alpha: float = 0.0
    watch_threshold: float | None = None  # what abstain/dampen compare the running mean with (default: threshold)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS or self.action == "off":
            raise ValueError(f"action must be one of {', '.join(ACTIONS[1:])}; got {self.action!r}")
        for name in ("threshold", "watch_threshold"):
            value = getattr(self, name)
            if value is None and name == "watch_threshold":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
            math.isfinite(self.alpha) and self.alpha >= 0.0
        ):
            raise ValueError(f"alpha must be a finite number >= 0; got {self.alpha!r}")

    @property
    def scales(self) -> bool:
        """Whether the H-Neurons may be scaled at all (alpha = 1 scales to the same values)."""
        return self.action in ("dampen", "scale") and self.alpha != 1.0

    @property
    def watches(self) -> bool:
        """Whether decisions depend on the running probability during generation."""
        return self.action in ("abstain", "dampen")

    @property
    def trigger(self) -> float:
        """The running probability at which abstain / dampen act."""
        return self.threshold if self.watch_threshold is None else self.watch_threshold


def running_peak(logits: Sequence[float], calibration: Calibration) -> float:
    """The highest calibrated running mean over the prefixes of a response's token logits: what a
    watching policy compares with its trigger, token by token (0.0 for no token)."""
    if len(logits) == 0:
        return 0.0
    values = torch.as_tensor(list(logits), dtype=torch.float64)
    means = values.cumsum(0) / torch.arange(1, values.numel() + 1, dtype=torch.float64)
    return float(calibration(means).max())


def verdict(policy: Policy, probability: float | None, triggered: bool) -> Verdict:
    """The verdict of one finished sequence. `triggered`: the policy acted during generation;
    `probability` None: an empty answer, which nothing flags."""
    if policy.action == "abstain" and triggered:
        return "abstained"
    if policy.action == "dampen" and triggered:
        return "dampened"
    if policy.action == "scale" and policy.alpha != 1.0:
        return "dampened"
    return "flagged" if probability is not None and probability >= policy.threshold else "ok"


def flagged_spans(probs: list[float], threshold: float) -> list[tuple[int, int, float]]:
    """Maximal runs of tokens at or above `threshold`: (first token, one past last, max probability)."""
    spans: list[tuple[int, int, float]] = []
    start = None
    for i, p in enumerate([*probs, -1.0]):
        if p >= threshold and start is None:
            start = i
        elif p < threshold and start is not None:
            spans.append((start, i, max(probs[start:i])))
            start = None
    return spans
