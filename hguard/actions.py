"""The guard's actions: one vocabulary for the library, the CLI (`--action`) and HTTP (`guard.action`).

off      no hook at all: plain generation, no scores.
flag     score every token and report; change nothing.
abstain  stop a sequence once its running hallucination probability reaches the watch threshold.
dampen   from then on, scale that sequence's H-Neurons by alpha.
scale    scale the H-Neurons by alpha from the first token (the paper's fixed-alpha intervention).

Kept apart from policy.py (which needs torch) so the command line can list them without loading it.
"""

from __future__ import annotations

from typing import Literal

Action = Literal["off", "flag", "abstain", "dampen", "scale"]
ACTIONS: tuple[str, ...] = ("off", "flag", "abstain", "dampen", "scale")


def action_name(action: str | None) -> str:
    """`action` checked against ACTIONS; None, the library's older spelling of "off", becomes "off"."""
    if action is None:
        return "off"
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}; got {action!r}")
    return action
