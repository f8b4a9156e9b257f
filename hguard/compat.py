"""What differs between the transformers releases hguard supports (pyproject.toml's range).

transformers 5.20 renamed the key-value cache argument and output field from `past_key_values` to
`cache`; vLLM's CPU build pins a release before that, so hguard speaks both. Everything else that
touches a cache goes through these two helpers. And a few model types' caches are extended wrongly by
older releases (`extends_cache_wrongly`), which an incremental scorer works around.
"""

from __future__ import annotations

import functools
import inspect
import re

import transformers

from torch import nn


@functools.cache
def _cache_argument(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """The keyword argument that passes `cache` to this model's forward, in its release's spelling."""
    return {_cache_argument(type(model)): cache}


def generated_cache(output):
    """The cache a forward (or `generate(..., return_dict_in_generate=True)`) returned, in either spelling."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


# Model types whose KV cache transformers extends wrongly by several tokens at once in releases before the
# one named: the logits differ from a forward without a cache, without hguard (the conformance matrix's
# proxy check found it; moshi, 5.16.1: by up to 1.4 with pieces of three tokens, right from 5.19.0).
_EXTENDS_WRONG_BEFORE = {"moshi": (5, 19)}


def extends_cache_wrongly(model_type: str) -> bool:
    """Whether this transformers release gets a cache of `model_type` wrong when it grows by several tokens
    at once (what an incremental scorer must then not do)."""
    fixed = _EXTENDS_WRONG_BEFORE.get(model_type)
    return fixed is not None and tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2]) < fixed
