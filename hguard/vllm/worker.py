"""vLLM workers that carry the probe: `parallel_config.worker_cls` points here (engine.py sets it).

After loading the weights, and before vLLM warms up, compiles or captures graphs, the worker installs
the probe (tap.py) into the model and wraps its runner's `_model_forward` (the one method vLLM runs a
scheduled batch through; profiling and dummy runs do not pass there). Around each forward the wrapper
knows the batch as vLLM laid it out: request i's scheduled tokens are the flat positions
query_start_loc[i] .. query_start_loc[i + 1] - 1, at sequence positions num_computed_tokens[i] onwards.
Before the forward it fills the per-token H-Neuron factors (from each request's `Scaling`); after it,
it files each token's probe logit under (request id, sequence position). A position computed twice
(preemption and recomputation) keeps its first score.

A probe with token inputs (token_inputs.py) also needs each token's log-probability and the entropy of
the distribution it was drawn from. The runner's `compute_logits` (vLLM's raw logits of each request's
last scheduled position, before any sampling processor) is wrapped to keep, per request and by the
position they predict, those log-probabilities; when that position is fed, its token's term is added
to the logit filed for it, and the entry goes. In decoding that is each request's one token. After a
preemption, vLLM recomputes a request's prompt and answer in one or more steps, and its last sampled
token, never fed before, comes inside such a step: it finds its entry all the same (the recomputed
steps' own entries predict positions that are filed already, or a prompt's, and are not kept). A
scored position filed without its term would be counted in `untermed` (none is expected).

The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one rank), so the engine driver reads
`Scores` directly: `collective_rpc("hguard_scores")` returns the worker's own object. vLLM makes each
request id unique by appending "-" and a suffix; the driver's ids contain no "-", and everything here is
filed under the driver's id.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..probe import Probe
from ..token_inputs import distribution, weighted
from .tap import ProbeTap, checkpoint_columns


@dataclass
class Scaling:
    """A request's H-Neuron factor: `alpha` at sequence positions >= `start` (1 before)."""

    alpha: float
    start: int


@dataclass
class Scores:
    """What the driver and the worker share: logits filed by request, and the requests' scalings."""

    tap: ProbeTap
    logits: dict[str, dict[int, float]] = field(default_factory=dict)  # request id -> position -> logit
    scaling: dict[str, Scaling] = field(default_factory=dict)
    rescored: int = 0  # positions computed again (preemption and recomputation), whose first score is kept
    # token inputs: per request, by the position they predict, a step's log-probabilities [V] and entropy
    following: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    untermed: int = 0  # scored positions filed without their token-input term (none expected)

    def take(self, request_id: str) -> dict[int, float]:
        """The request's logits filed so far (the driver folds them into its rows)."""
        return self.logits.get(request_id, {})

    def forget(self, request_id: str) -> None:
        self.logits.pop(request_id, None)
        self.scaling.pop(request_id, None)
        self.following.pop(request_id, None)


def install(runner, probe_path: str) -> Scores:
    """Put the probe of `probe_path` into `runner`'s model and wrap its forward."""
    model = runner.model.unwrap() if hasattr(runner.model, "unwrap") else runner.model
    max_tokens = int(runner.vllm_config.scheduler_config.max_num_batched_tokens)
    max_tokens = max(max_tokens, int(getattr(runner, "max_num_tokens", 0) or 0))
    device = next(model.parameters()).device
    weights = runner.vllm_config.model_config.model
    if not Path(weights).is_dir():  # a hub id vLLM has downloaded
        from huggingface_hub import snapshot_download

        weights = snapshot_download(weights, allow_patterns=["*.safetensors", "*.json"], local_files_only=True)
    probe = Probe.load(probe_path)
    scores = Scores(ProbeTap(probe, model, max_tokens, checkpoint_columns(weights), device))
    original = runner._model_forward
    weight = None if probe.token_weight is None else probe.token_weight.to(device)

    def _model_forward(self, *args, **kwargs):
        batch = self.input_batch
        count = batch.num_reqs
        ids = [request.rsplit("-", 1)[0] for request in batch.req_ids[:count]]
        starts = self.query_start_loc.np[: count + 1].copy()
        computed = batch.num_computed_tokens_cpu[:count].copy()
        prompts = batch.num_prompt_tokens[:count].copy()
        scaled = _factors(scores, ids, starts, computed)
        if scaled is not None:  # else the buffer holds ones already: nothing to write on the hot path
            scores.tap.set_factors(scaled)
        terms = None
        if weight is not None:
            inputs = kwargs.get("input_ids", args[0] if args else None)
            terms = _terms(scores, weight, ids, starts, computed, inputs)
            # the positions compute_logits predicts, and the prompts' lengths
            self._hguard_step = (ids, computed + (starts[1:] - starts[:-1]), prompts)
        output = original(*args, **kwargs)
        _file(scores, ids, starts, computed, prompts, terms)
        if scaled is not None:
            scores.tap.set_factors(None)  # back to ones for the steps that scale nothing
        return output

    runner._model_forward = types.MethodType(_model_forward, runner)
    if weight is not None:
        compute_logits = runner.model.compute_logits

        def keeping_logits(hidden_states, *args, **kwargs):
            logits = compute_logits(hidden_states, *args, **kwargs)
            _keep_following(scores, runner, logits)
            return logits

        runner.model.compute_logits = keeping_logits
    return scores


def _keep_following(scores: Scores, runner, logits: torch.Tensor | None) -> None:
    """After a step's logits: per request, the log-probabilities of the position they predict, unless it is
    a prompt's or filed already (a recomputed one)."""
    step = getattr(runner, "_hguard_step", None)
    runner._hguard_step = None
    if step is None or logits is None:
        return
    ids, following, prompts = step
    if logits.shape[0] != len(ids):  # speculative decoding: more than one row per request
        return
    logp, entropy = distribution(logits)
    for i, request in enumerate(ids):
        position = int(following[i])
        if position >= int(prompts[i]) and position not in scores.logits.get(request, {}):
            scores.following.setdefault(request, {})[position] = (logp[i], entropy[i])


def _terms(scores: Scores, weight: torch.Tensor, ids: list[str], starts: np.ndarray, computed: np.ndarray,
           inputs: torch.Tensor | None) -> dict[tuple[str, int], float]:
    """The terms of this step's tokens whose distribution a step before kept, by (request, position); their
    entries go."""
    found = []  # (request, position, flat index)
    for i, request in enumerate(ids):
        kept = scores.following.get(request)
        if inputs is None or not kept:
            continue
        first, count = int(computed[i]), int(starts[i + 1] - starts[i])
        found += [(request, position, int(starts[i]) + position - first) for position in kept
                  if first <= position < first + count]
    if not found:
        return {}
    entries = [scores.following[request].pop(position) for request, position, _ in found]
    logp, entropy = torch.stack([e[0] for e in entries]), torch.stack([e[1] for e in entries])
    tokens = inputs[torch.tensor([flat for _, _, flat in found], device=inputs.device)].to(logp.device)
    values = weighted(weight, logp.gather(1, tokens[:, None])[:, 0], entropy)
    return dict(zip(((request, position) for request, position, _ in found), values.tolist()))


def _factors(scores: Scores, ids: list[str], starts: np.ndarray, computed: np.ndarray) -> torch.Tensor | None:
    """Per flat token, its request's H-Neuron factor at that position (None: no request scales)."""
    if not any(request in scores.scaling for request in ids):
        return None
    factors = np.ones(int(starts[-1]), dtype=np.float32)
    for i, request in enumerate(ids):
        scaling = scores.scaling.get(request)
        if scaling is None:
            continue
        first, last = int(starts[i]), int(starts[i + 1])
        positions = computed[i] + np.arange(last - first)
        factors[first:last] = np.where(positions >= scaling.start, scaling.alpha, 1.0)
    return torch.from_numpy(factors)


def _file(scores: Scores, ids: list[str], starts: np.ndarray, computed: np.ndarray, prompts: np.ndarray,
          terms: dict[tuple[str, int], float] | None = None) -> None:
    """File the generated tokens' logits (a prompt's positions are never scored) by request and position;
    with `terms` (a probe with token inputs), each gets its token's term added."""
    logits = scores.tap.logits(int(starts[-1]))
    for i, request in enumerate(ids):
        first, last = int(starts[i]), int(starts[i + 1])
        position = int(computed[i])
        skip = max(0, int(prompts[i]) - position)  # prompt tokens of this chunk
        if skip >= last - first:
            continue
        filed = scores.logits.setdefault(request, {})
        for at, logit in enumerate(logits[first + skip: last], start=position + skip):
            if at in filed:
                scores.rescored += 1
                continue
            if terms is not None:
                if (request, at) in terms:
                    logit += terms[request, at]
                else:
                    scores.untermed += 1
            filed[at] = logit


class GuardedWorker:
    """Mixed into the platform's worker class: load the weights, then install the probe."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        self._hguard_scores = install(self.model_runner, self.vllm_config.additional_config["hguard"]["probe"])

    def hguard_scores(self) -> Scores:
        return self._hguard_scores


def worker_class() -> str:
    """The qualified name of the guarded worker for this platform (for `worker_cls`)."""
    from vllm.platforms import current_platform

    return f"{__name__}.Guarded{'CPU' if current_platform.is_cpu() else 'GPU'}Worker"


def __getattr__(name: str):
    """The worker classes, built on first use (vLLM's worker modules load CUDA or CPU code)."""
    return _worker(name)


@functools.cache
def _worker(name: str) -> type:
    if name == "GuardedCPUWorker":
        from vllm.v1.worker.cpu_worker import CPUWorker

        return type(name, (GuardedWorker, CPUWorker), {"__module__": __name__})
    if name == "GuardedGPUWorker":
        from vllm.v1.worker.gpu_worker import Worker

        return type(name, (GuardedWorker, Worker), {"__module__": __name__})
    raise AttributeError(name)
