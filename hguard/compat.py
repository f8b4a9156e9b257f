"""What differs between the transformers releases hguard supports (pyproject.toml's range).

transformers 5.20 renamed the key-value cache argument and output field from `past_key_values` to
`cache`; vLLM's CPU build pins a release before that, so hguard speaks both. Everything else that
touches a cache goes through these two helpers.
"""

from __future__ import annotations

import functools
import inspect

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
