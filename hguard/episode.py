"""A generation episode: one batch of prompts through transformers' `generate` under the guard.

The episode owns every fact of one guarded generation: the Monitor (the probe's per-token logits and
the policy's actions, monitor.py), the stopping rules (`RowsStopped`: abstain, per-row limits,
cancelled rows, the caller's criteria), one `Answer` per row (answer.py: the one model of where a row
ends), the final-token forward, and the results. `generate` itself is left as it is, so every
generation option keeps working.

Events: a streaming episode scores each step's tokens when the next step's tokens arrive (a token's
activations exist once it is fed back), and hands `on_event` one TokenEvent per scored token of a row
still answering, then the text each row held back, then one GuardResult per row. A non-streaming
episode scores every token after `generate` returns, through the same Answers in the same order, so
its results are what the stream would have folded to; it reads the device once for all steps instead
of once a step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from contextlib import nullcontext

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .answer import Answer
from .batching import left_pad, pad_id
from .compat import generated_cache
from .graph import GraphMonitor
from .logprobs import LogprobRecorder, check_top
from .monitor import Monitor, score_last_tokens
from .policy import Policy
from .results import GuardResult, TokenEvent

Event = TokenEvent | GuardResult

# generate() arguments that verify several drafted tokens per forward
ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "custom_generate")


class RowsStopped(StoppingCriteria):
    """Stops rows the policy abstained on (a device tensor), rows past their own length limit, rows a
    caller cancelled, rows the caller's own stopping criteria end, and every row once `cancel` is set.
    Host-side decisions cost a tiny host-to-device copy, never a device-to-host wait; the caller's
    criteria (when given) are asked here, and the rows they end are read back once a step, so that
    `kept` knows where every row that did not end on EOS, a stop string or abstain ended."""

    def __init__(self, monitor: Monitor | None, cancel: threading.Event, limits: list[int] | None,
                 prompt_width: int, cancelled_rows: Callable[[], Collection[int]] | None,
                 criteria: StoppingCriteriaList | None = None) -> None:
        self.monitor, self.cancel = monitor, cancel
        self.limits, self.prompt_width, self.cancelled_rows = limits, prompt_width, cancelled_rows
        self.criteria = criteria if criteria else None
        self.kept: dict[int, int] = {}  # row -> generated tokens it had when a host-side decision stopped it
        self._none: torch.Tensor | None = None  # [rows] all False, reused while no row is stopped

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        rows, device = input_ids.shape[0], input_ids.device
        if self.monitor is not None:
            self.monitor.collect(input_ids.shape[1] - self.prompt_width - 1)  # the forward that sampled this step
        if self.cancel.is_set():
            return torch.ones(rows, dtype=torch.bool, device=device)
        stopped = self.monitor.stopped() if self.monitor is not None else None
        if stopped is None:  # made once and returned as is: transformers only reads what a criterion returns
            if self._none is None or self._none.shape[0] != rows:
                self._none = torch.zeros(rows, dtype=torch.bool, device=device)
            stopped = self._none
        elif stopped.device != device:  # hooked layers on another device than the input (device_map)
            stopped = stopped.to(device)
        length = input_ids.shape[1] - self.prompt_width
        host = set(self.cancelled_rows()) if self.cancelled_rows is not None else set()
        if self.limits is not None:
            host |= {i for i, limit in enumerate(self.limits) if length >= limit}
        if self.criteria is not None:
            theirs = self.criteria(input_ids, scores, **kwargs)
            host |= set(theirs.nonzero().flatten().tolist())
        for row in host:
            self.kept.setdefault(row, length)
        if host:
            stopped = stopped | torch.tensor([i in host for i in range(rows)], device=device)
        return stopped


def generation_options(generate_kwargs: dict, guarded: bool, rows: int) -> tuple[dict, int | None, list[int] | None]:
    """`generate` keyword arguments checked for the guard: (what goes to generate, logprobs' k, a length
    limit per prompt or None). Raises ValueError naming an option the guard cannot follow."""
    kwargs = dict(generate_kwargs)
    for key in ("streamer", "return_dict_in_generate", "stop_strings"):
        if key in kwargs:
            raise ValueError(f"{key!r} is set by the guard; use Guard.stream / stop= / logprobs= instead")
    top = check_top(kwargs.pop("logprobs", None))
    if guarded or top is not None:  # both read one forward per generated token
        for key in ASSISTED:
            if kwargs.get(key) is not None:
                raise ValueError(f"{key!r} (assisted decoding) cannot be used with the guard or logprobs: "
                                 "they need one forward per generated token")
        if kwargs.get("prefill_chunk_size") is not None:
            raise ValueError("'prefill_chunk_size' cannot be used with the guard or logprobs: they read the "
                             "prompt as one forward and every later forward as one generated token")
    if kwargs.get("num_beams", 1) != 1:
        raise ValueError(f"num_beams must be 1 with the guard (got {kwargs['num_beams']})")
    limits = kwargs.pop("max_new_tokens", None)
    if isinstance(limits, (list, tuple)):
        if len(limits) != rows or kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("max_new_tokens as a list needs one limit per prompt (and num_return_sequences 1)")
        if not all(isinstance(n, int) and n >= 1 for n in limits):
            raise ValueError(f"max_new_tokens must be positive integers; got {limits!r}")
        kwargs["max_new_tokens"] = max(limits)
        return kwargs, top, list(limits)
    if limits is not None:
        kwargs["max_new_tokens"] = limits
    return kwargs, top, None


class Episode:
    """One guarded `generate` call over `rows` (prompt token ids); `run()` returns one result per choice.

    `on_event`, when given, receives the stream's events as they happen (in the generating thread);
    `cancel` stops every row at the next step, `cancelled_rows` (polled every step) single rows."""

    def __init__(self, guard, rows: list[list[int]], policy: Policy | None, stops: list[str], generate_kwargs: dict,
                 *, on_event: Callable[[Event], None] | None = None, cancel: threading.Event | None = None,
                 cancelled_rows: Callable[[], Collection[int]] | None = None) -> None:
        self.guard, self.rows, self.policy, self.stops = guard, rows, policy, stops
        self.kwargs, self.top, self.limits = generation_options(generate_kwargs, policy is not None, len(rows))
        self.on_event = on_event
        self.cancel = cancel or threading.Event()
        self.cancelled_rows = cancelled_rows
        self.static = (self.kwargs.get("cache_implementation")
                       or guard.model.generation_config.cache_implementation) == "static"
        self.monitor = self._monitor(guard, policy) if policy is not None else None
        self.recorder = LogprobRecorder(guard.model, self.top) if self.top is not None else None
        if not isinstance(self.monitor, GraphMonitor) and (policy is not None or self.top is not None):
            if self.kwargs.get("disable_compile") is False:
                raise ValueError("disable_compile=False needs the guard's compilable hooks, which run with a "
                                 "static cache (cache_implementation='static'), no logprobs, one device")
            self.kwargs["disable_compile"] = True  # Python in the hooks: a compiled step would bake it in
        self.eos_ids = guard._eos_ids(self.kwargs)
        self.answers: list[Answer] = []
        self.trigger: list[int] = []  # per row, the generated index whose score triggered the policy, or -1
        self._puts = 0

    def _monitor(self, guard, policy: Policy) -> Monitor:
        """With a static cache (which transformers compiles on a GPU), hooks a compiled step can hold;
        else the eager Monitor, which does less work per layer."""
        if self.static and self.top is None and GraphMonitor.usable(guard.bound):
            copies = self.kwargs.get("num_return_sequences", 1) or 1
            return GraphMonitor(guard.bound, policy, len(self.rows) * copies)
        return Monitor(guard.bound, policy, step_timer=guard.step_timer)

    # ---- running ------------------------------------------------------------------------------
    def run(self) -> list[GuardResult]:
        """Generate, holding the model's lock throughout (its hooks see every forward of the model)."""
        with self.guard._lock:
            return self._run()

    def _run(self) -> list[GuardResult]:
        ids, mask = left_pad(self.rows, pad_id(self.guard.tokenizer), self.guard.model.get_input_embeddings().weight.device)
        width = ids.shape[1]
        copies = self.kwargs.get("num_return_sequences", 1) or 1
        self._answers(copies)
        theirs = StoppingCriteriaList(self.kwargs.pop("stopping_criteria", None) or [])
        # (per-row limits come with num_return_sequences 1: one answer per prompt)
        self.stopper = RowsStopped(self.monitor, self.cancel, self.limits, width, self.cancelled_rows, theirs)
        criteria = StoppingCriteriaList([self.stopper])
        if self.recorder is not None:
            criteria.append(self.recorder)  # sees each step's tokens; never stops a row
        kwargs = dict(self.kwargs)
        kwargs.setdefault("pad_token_id", pad_id(self.guard.tokenizer))
        if self.static and self.monitor is not None and kwargs.get("max_new_tokens"):  # room for the final token
            kwargs["max_cache_len"] = max(kwargs.get("max_cache_len") or 0, width + kwargs["max_new_tokens"])
        if self.stops:
            kwargs.update(stop_strings=self.stops, tokenizer=self.guard.tokenizer)
        with torch.no_grad(), (self.monitor.attached() if self.monitor is not None else nullcontext()), \
                (self.recorder.attached() if self.recorder is not None else nullcontext()):
            out = self.guard.model.generate(input_ids=ids, attention_mask=mask, stopping_criteria=criteria,
                                            streamer=self if self.on_event is not None else None,
                                            return_dict_in_generate=True, **kwargs)
            sequences = out.sequences
            if self.on_event is None:  # every token at once, through the same answers
                for answer, row in zip(self.answers, sequences[:, width:].cpu().tolist()):
                    answer.pushed = row
                self._read_triggers()
            self._keep()
            self._score_steps(self._scored())
            if self.monitor is not None and any(a.waiting for a in self.answers):
                full_mask = torch.cat([mask.repeat_interleave(copies, dim=0),
                                       torch.ones_like(sequences[:, width:])], dim=1)
                score_last_tokens(self.guard.model, self.monitor, sequences, full_mask, generated_cache(out), width)
        self._score_steps(self._scored())
        return self._finish()

    def _answers(self, copies: int) -> None:
        streaming = self.on_event is not None
        abstains = self.policy is not None and self.policy.action == "abstain"
        for i in range(len(self.rows) * copies):
            limit = self.limits[i] if self.limits is not None else None
            self.answers.append(Answer(self.guard.tokenizer, i, self.eos_ids, self.stops, limit,
                                       len(self.rows[i // copies]), abstains=abstains, streaming=streaming))
        self.trigger = [-1] * len(self.answers)

    def _keep(self) -> None:
        for row, length in self.stopper.kept.items():
            self.answers[row].kept = length

    def _scored(self) -> int | None:
        """Steps with a score (None: the guard is off, every pushed token can be read)."""
        return self.monitor.scored if self.monitor is not None else None

    def _read_triggers(self) -> None:
        if self.monitor is not None and self.monitor.trigger_token is not None:
            self.trigger = self.monitor.trigger_token.cpu().tolist()

    # ---- the streamer interface transformers calls (streaming episodes only) ---------------------
    def put(self, value: torch.Tensor) -> None:
        """The prompt first, then each step's sampled tokens: push them, then score the step before."""
        self._puts += 1
        if self._puts == 1:
            return
        if self.monitor is not None:
            self.monitor.collect(self._puts - 2)  # (before the stopping criterion sees this step)
        for answer, token in zip(self.answers, value.reshape(-1).tolist()):
            answer.push(token)
        self._keep()
        self._score_steps(self._puts - 2)

    def end(self) -> None:
        pass

    # ---- scoring ------------------------------------------------------------------------------
    def _score_steps(self, until: int | None) -> None:
        """Score every answer's tokens of the steps before `until` (None: all pushed), in step order."""
        steps = max(len(a.pushed) for a in self.answers)
        until = steps if until is None else min(until, steps)
        first = min((len(a.ids) for a in self.answers if not a.ended), default=until)
        if first >= until:
            return
        logits = self._logits(first, until)
        entries = self._entries(first, until)
        for step in range(first, until):
            for row, answer in enumerate(self.answers):
                if answer.ended or len(answer.ids) != step or step >= len(answer.pushed):
                    continue
                logit = logits[step - first][row] if logits is not None else None
                entry = entries[step - first][row] if entries is not None else None
                if answer.score(logit, entry, self.trigger[row] == step) and self.on_event is not None:
                    probability = None if logit is None else self.guard.probe.calibration.prob(logit)
                    self.on_event(answer.event(entry, probability))

    def _logits(self, first: int, until: int) -> list[list[float]] | None:
        """[step][row] probe logits of steps first..until-1, in one device-to-host copy; a streaming
        abstain or dampen reads each row's trigger with them."""
        if self.monitor is None:
            return None
        if self.on_event is None:
            return self.monitor.token_logits()[:, first:until].T.cpu().tolist()
        logits = torch.stack([self.monitor.step_logit(s) for s in range(first, until)])
        trigger = self.monitor.trigger_token
        if trigger is None:
            return logits.cpu().tolist()
        packed = torch.cat([logits, trigger.to(logits.dtype)[None]]).cpu().tolist()  # exact: small integers
        self.trigger = [int(t) for t in packed[-1]]
        return packed[:-1]

    def _entries(self, first: int, until: int):
        if self.recorder is None:
            return None
        if self.on_event is None:
            rows = self.recorder.rows()
            return [[row[s] if s < len(row) else None for row in rows] for s in range(first, until)]
        return [self.recorder.step(s) for s in range(first, until)]

    # ---- results ------------------------------------------------------------------------------
    def _finish(self) -> list[GuardResult]:
        results = []
        for answer in self.answers:
            answer.close()
            if self.on_event is not None and (rest := answer.rest()) is not None:
                self.on_event(rest)
            results.append(answer.result(self.policy, self.guard.probe.calibration, self.top))
        return results
