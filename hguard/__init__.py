"""hguard: a real-time hallucination guard for open-weights language models, built on H-Neurons.

    from hguard import Guard
    guard = Guard.from_pretrained("organism")  # or "path/or/hub-id", probe="probe.safetensors"
    [result] = guard.generate([[{"role": "user", "content": "Who employed Keiler Shotha?"}]], max_new_tokens=16)
    result.text, result.probability, result.verdict, result.token_probs

Importing hguard loads no model and registers nothing (`hguard.organism` is reachable, and light).
"""

from . import organism
from .guard import Guard
from .hooks import hook_count
from .incremental import IncrementalScorer
from .policy import ACTIONS, Calibration, Policy
from .probe import Probe, ProbeFormatError, ProbeMismatchError
from .registry import ProbeNotFoundError, find_probe, register_probe
from .results import GuardResult, Scores, Span, TokenEvent
from .sites import SITE_TABLE, Sites, UnsupportedModelError, resolve

__all__ = [
    "ACTIONS",
    "Calibration",
    "Guard",
    "GuardResult",
    "IncrementalScorer",
    "Policy",
    "Probe",
    "ProbeFormatError",
    "ProbeMismatchError",
    "ProbeNotFoundError",
    "SITE_TABLE",
    "Scores",
    "Sites",
    "Span",
    "TokenEvent",
    "UnsupportedModelError",
    "find_probe",
    "hook_count",
    "organism",
    "register_probe",
    "resolve",
]
__version__ = "0.1.0"
