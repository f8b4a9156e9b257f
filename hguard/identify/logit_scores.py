"""The standard logit-based uncertainty scores, computed by lm-polygraph's own estimators.

lm-polygraph's package `__init__` imports its whole model and dataset stack (pandas, datasets, spacy,
sentence-transformers, ...), none of which its simple estimators need. So the estimator modules are
loaded from the installed package without running that `__init__`: the parent packages are registered
as bare namespace modules pointing at the installed folders, and the estimator files are imported as
they are. The numbers are therefore the library's, not a re-implementation. Install it without its
dependencies: `pip install --no-deps lm-polygraph==0.7.0 pillow` (pillow is imported by its utils).

Each estimator maps a stats dict to one uncertainty per response (higher = less certain):
  MaximumSequenceProbability  -sum of the response tokens' log-probabilities   ("greedy_log_likelihoods")
  Perplexity                  -mean of the same                                ("greedy_log_likelihoods")
  MeanTokenEntropy            mean entropy of the next-token distributions     ("entropy")
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ESTIMATORS = {
    "max_sequence_probability": ("max_probability", "MaximumSequenceProbability"),
    "mean_token_entropy": ("token_entropy", "MeanTokenEntropy"),
    "perplexity": ("perplexity", "Perplexity"),
}
INSTALL = "pip install --no-deps lm-polygraph==0.7.0 pillow"


def _estimators(names: Sequence[str]) -> dict[str, object]:
    if "lm_polygraph" not in sys.modules:
        spec = importlib.util.find_spec("lm_polygraph")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"the logit-score baselines need lm-polygraph's estimators: {INSTALL}")
        root = Path(next(iter(spec.submodule_search_locations)))
        for name, folder in (("lm_polygraph", root), ("lm_polygraph.utils", root / "utils"),
                             ("lm_polygraph.estimators", root / "estimators")):
            module = types.ModuleType(name)
            module.__path__ = [str(folder)]
            sys.modules[name] = module
    try:
        return {key: getattr(importlib.import_module(f"lm_polygraph.estimators.{ESTIMATORS[key][0]}"),
                             ESTIMATORS[key][1])()
                for key in names}
    except ImportError as error:
        raise ImportError(f"lm-polygraph's estimators failed to import ({error}); {INSTALL}") from error


def logit_scores(log_likelihoods: Sequence[np.ndarray], entropies: Sequence[np.ndarray],
                 names: Sequence[str] = tuple(ESTIMATORS)) -> dict[str, np.ndarray]:
    """Per estimator in `names`, one uncertainty per response from its tokens' log-likelihoods and entropies."""
    stats = {"greedy_log_likelihoods": [np.asarray(x, dtype=float) for x in log_likelihoods],
             "entropy": [np.asarray(x, dtype=float) for x in entropies]}
    return {key: np.asarray(estimator(stats), dtype=float) for key, estimator in _estimators(names).items()}
