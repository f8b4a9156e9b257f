"""Pure decisions: calibration, validation, verdicts and spans."""

from __future__ import annotations

import pytest
import torch

from hguard import Calibration, Policy
from hguard.policy import flagged_spans, running_peak, verdict


def test_platt_and_isotonic():
    platt = Calibration("platt", a=2.0, b=-1.0)
    assert platt.prob(0.5) == pytest.approx(0.5)
    iso = Calibration("isotonic", x=(0.0, 1.0, 3.0), y=(0.0, 0.5, 1.0))
    values = iso(torch.tensor([-5.0, 0.0, 0.5, 1.0, 2.0, 3.0, 9.0], dtype=torch.float64)).tolist()
    assert values == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert Calibration.from_json(iso.to_json()) == iso


@pytest.mark.parametrize(
    "calibration",
    [Calibration("platt", a=2.0, b=-1.0), Calibration("platt", a=-3.5, b=0.25),
     Calibration("isotonic", x=(0.0, 1.0, 1.0, 3.0), y=(0.0, 0.2, 0.6, 1.0)),  # a vertical step at 1
     Calibration("isotonic", x=(-2.0, 0.5, 4.0), y=(0.1, 0.1, 0.9))],  # a flat stretch
)
def test_host_calibration_equals_the_tensor_one(calibration):
    """What streamed steps and finished answers report (host floats) is the device map's value."""
    logits = [-1000.0, -40.0, -3.0, -0.5, 0.0, 0.5, 1.0, 1.0 + 1e-9, 2.0, 3.0, 7.5, 40.0, 1000.0]
    expected = calibration(torch.tensor(logits, dtype=torch.float64)).tolist()
    assert calibration.probs(logits) == pytest.approx(expected, abs=1e-15)
    assert calibration.prob(2.0) == pytest.approx(expected[logits.index(2.0)], abs=1e-15)


@pytest.mark.parametrize(
    "kwargs",
    [dict(method="spline"), dict(method="isotonic", x=(0.0,), y=(0.5,)), dict(method="isotonic", x=(1.0, 0.0), y=(0.1, 0.2)),
     dict(method="isotonic", x=(0.0, 1.0), y=(0.2, 1.5)), dict(a=float("inf"))],
)
def test_bad_calibration(kwargs):
    with pytest.raises(ValueError):
        Calibration(**kwargs)


def test_policy_validation_names_the_argument():
    with pytest.raises(ValueError, match="action"):
        Policy(action="nope")
    with pytest.raises(ValueError, match="threshold"):
        Policy(threshold=True)
    with pytest.raises(ValueError, match="alpha"):
        Policy(alpha=-0.1)
    assert not Policy("scale", alpha=1.0).scales and Policy("dampen", alpha=0.0).scales
    with pytest.raises(ValueError, match="watch_threshold"):
        Policy(watch_threshold=1.5)


def test_watching_actions_trigger_on_the_watch_threshold():
    assert Policy("abstain", 0.4).trigger == 0.4  # without a watch threshold, the flag threshold
    assert Policy("abstain", 0.4, watch_threshold=0.8).trigger == 0.8


def test_running_peak_is_the_highest_prefix_mean():
    identity = Calibration("platt", a=1.0, b=0.0)
    logits = [2.0, -4.0, 1.0, 3.0]  # prefix means 2, -1, -1/3, 0.5
    assert running_peak(logits, identity) == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert running_peak(logits[1:], identity) == pytest.approx(torch.sigmoid(torch.tensor(0.0)).item())
    assert running_peak([], identity) == 0.0


def test_verdicts():
    assert verdict(Policy("flag", 0.5), 0.7, False) == "flagged"
    assert verdict(Policy("flag", 0.5), 0.2, False) == "ok"
    assert verdict(Policy("abstain", 0.5), 0.9, True) == "abstained"
    assert verdict(Policy("dampen", 0.5), 0.9, True) == "dampened"
    assert verdict(Policy("scale", 0.5, alpha=1.0), 0.9, False) == "flagged"


def test_flagged_spans_are_maximal_runs():
    probs = [0.1, 0.6, 0.7, 0.2, 0.9, 0.5]
    assert flagged_spans(probs, 0.5) == [(1, 3, 0.7), (4, 6, 0.9)]
    assert flagged_spans([], 0.5) == [] and flagged_spans([0.1], 0.5) == []
