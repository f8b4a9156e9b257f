"""Guard: a causal LM, its tokenizer and an H-Neuron probe; score(), generate() and stream().

Generation is transformers' own `generate` with hooks on the probe's layers (see monitor.py):
abstention is a stopping criterion, streaming a streamer, and nothing else of the decoding loop is
rewritten, so every generation option keeps working. Prompts are left-padded into one batch. With
`action="off"` (or None) the guard is off: plain `generate`, no hook installed (unless `logprobs` asks
for the output's log-probabilities). One generation runs at a time per model (the hooks belong to the model,
so every Guard on one model shares its lock).
"""

from __future__ import annotations

import queue
import threading
from contextlib import nullcontext
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from .hooks import model_lock, stoppable
from .logprobs import Entry, LogprobRecorder, check_top
from .monitor import Monitor, score_last_tokens
from .policy import Policy, action_name
from .probe import Probe
from .registry import find_probe
from .results import GuardResult, IncrementalText, Scores, TokenEvent, assemble, cut, decode
from .sites import resolve

Prompt = str | list[dict] | list[int]


class _RowsStopped(StoppingCriteria):
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


class Guard:
    """Hallucination guard around a transformers causal LM."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        probe: Probe | str | Path | None = None,
        *,
        threshold: float | None = None,
    ) -> None:
        self.model = model
        self.sites = resolve(model)  # fails early, naming the model type, on an unsupported model
        if tokenizer is None:
            tokenizer = _tokenizer_for(model)
        self.tokenizer = tokenizer
        if probe is None:
            probe = find_probe(model)
        elif isinstance(probe, (str, Path)):
            probe = Probe.load(probe, model)
        else:
            probe.check(model)
        self.probe = probe
        # an explicit threshold is used for flags and for the running mean alike
        self.threshold = probe.threshold if threshold is None else threshold
        self.watch_threshold = probe.watch_threshold if threshold is None else None
        Policy(threshold=self.threshold, watch_threshold=self.watch_threshold)  # validate
        self.bound = probe.bind(model)
        self._lock = model_lock(model)  # shared by every Guard on this model
        self.step_timer: Callable[[float], None] | None = None  # e.g. a metrics histogram's observe

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        probe: Probe | str | Path | None = None,
        *,
        tokenizer=None,
        threshold: float | None = None,
        **load_kwargs,
    ) -> "Guard":
        """Load a model (local directory, hub id, or "organism" for the built-in one) and its tokenizer;
        `device_map`, `dtype` and other keyword arguments go to `AutoModelForCausalLM.from_pretrained`
        unchanged (the organism loads in float32 unless `dtype` says otherwise)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if str(path_or_id) == "organism" and not Path("organism").exists():
            from .organism import path as organism_path

            path_or_id = organism_path("instruct")
            load_kwargs.setdefault("dtype", torch.float32)
        model = AutoModelForCausalLM.from_pretrained(str(path_or_id), **load_kwargs)
        model.eval()
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(path_or_id))
        return cls(model, tokenizer, probe, threshold=threshold)

    # ---- inputs -------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt, as transformers' text-generation pipeline reads one: a string is raw
        text, tokenized as it is (no chat template: the model continues the text); a list of chat
        messages (`[{"role": "user", "content": ...}]`) goes through the tokenizer's chat template with
        the generation prompt, which is what an instruction-tuned model expects for a question; a list of
        token ids is used unchanged."""
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.model.get_input_embeddings().weight.shape[0]
            if not all(0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt token ids must lie in [0, {vocab})")
            return list(prompt)
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must be a non-empty string")
            return list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("chat messages need a tokenizer with a chat template; pass a string prompt")
            text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        raise ValueError(
            f"each prompt must be a string, a list of chat messages or a list of token ids; got {prompt!r:.60}"
        )

    def _prompts(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], (dict, int))):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings or chat message lists")
        return [self.encode(p) for p in prompts]

    def _batch(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input ids and attention mask on the model's input device."""
        return left_pad(rows, self._pad_id(), self.model.get_input_embeddings().weight.device)

    def _pad_id(self) -> int:
        return pad_id(self.tokenizer)

    def _eos_ids(self, generate_kwargs: dict | None = None) -> set[int]:
        """The end-of-sequence ids generation stops on: `eos_token_id` or a `generation_config` passed to
        this call where they set one, else the model's generation config's, plus the tokenizer's."""
        kwargs = generate_kwargs or {}
        given = kwargs.get("eos_token_id")
        if given is None:
            given = getattr(kwargs.get("generation_config"), "eos_token_id", None)
        eos = given if given is not None else getattr(self.model.generation_config, "eos_token_id", None)
        ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])}
        if given is None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def policy(self, action: str | None = "flag", threshold: float | None = None, alpha: float | None = None):
        """A validated Policy (None when `action` is "off" or None: guard off). Without `threshold`, the
        probe's two thresholds (flag, and the running mean's for abstain / dampen); with it, that one for
        both."""
        if action_name(action) == "off":
            return None
        return Policy(
            action=action,
            threshold=self.threshold if threshold is None else threshold,
            alpha=0.0 if alpha is None else alpha,
            watch_threshold=self.watch_threshold if threshold is None else None,
        )

    # ---- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, prompt: Prompt, response: str | Sequence[int]) -> Scores:
        """Per-token probabilities of `response` after `prompt`, from one teacher-forced pass."""
        prompt_ids = self.encode(prompt)
        if isinstance(response, str):
            response_ids = list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        else:
            response_ids = [int(t) for t in response]
        if not response_ids:
            raise ValueError("response must contain at least one token")
        ids, mask = self._batch([prompt_ids + response_ids])
        monitor = Monitor(self.bound, stop_early=True)
        with self._lock, monitor.attached(), stoppable():
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return Scores.of(response_ids, monitor.full_logits[0, len(prompt_ids):].double().cpu(), self.probe.calibration)

    # ---- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        action: str | None = "flag",
        threshold: float | None = None,
        alpha: float | None = None,
        stop: str | Sequence[str] | None = None,
        logprobs: int | None = None,
        **generate_kwargs,
    ) -> list[GuardResult]:
        """Generate for a batch of prompts; one GuardResult per choice (prompt-major with n > 1).

        action: "flag" (score only), "abstain", "dampen", "scale" (fixed alpha from the first token), or
        "off" (guard off, no hook; None means the same). threshold: probability in [0, 1] (default: the probe's calibrated ones, one for
        flags and one for the running mean that abstain and dampen watch).
        alpha: the H-Neuron scale for dampen/scale. logprobs: None, or k in [0, 20] to return each
        token's log-probability under the model's raw distribution and the k most likely tokens at
        that step (`GuardResult.logprobs`). Other keyword arguments go to `model.generate`.
        """
        policy = self.policy(action, threshold, alpha)
        rows = self._prompts(prompts)
        with self._lock:
            return self._run(rows, policy, stop_strings(stop), {**generate_kwargs, "logprobs": logprobs},
                             on_step=None, cancel=None)

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        action: str | None = "flag",
        threshold: float | None = None,
        alpha: float | None = None,
        stop: str | Sequence[str] | None = None,
        cancelled_rows: Callable[[], Collection[int]] | None = None,
        logprobs: int | None = None,
        **generate_kwargs,
    ) -> Iterator[TokenEvent | GuardResult]:
        """Like `generate`, but yields each token as a TokenEvent as soon as its score exists (one step
        after it was sampled), then one GuardResult per choice (with `logprobs`, events and results
        carry the tokens' entries).
        Closing the iterator stops generation; `cancelled_rows` (polled every step) stops single rows,
        for a server whose client left."""
        generate_kwargs = {**generate_kwargs, "logprobs": logprobs}
        policy = self.policy(action, threshold, alpha)
        rows = self._prompts(prompts)
        stops = stop_strings(stop)  # bad arguments raise here, not from the generating thread
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()
        done = object()

        def work() -> None:
            try:
                with self._lock:
                    results = self._run(rows, policy, stops, generate_kwargs, events.put, cancel,
                                        cancelled_rows)
                for item in results:
                    events.put(item)
            except BaseException as error:  # re-raised in the consumer
                events.put(error)
            finally:
                events.put(done)

        thread = threading.Thread(target=work, name="hguard-generate", daemon=True)
        thread.start()
        try:
            while (item := events.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            thread.join()

    def _run(self, rows, policy, stop, generate_kwargs, on_step, cancel, cancelled_rows=None) -> list[GuardResult]:
        for key in ("streamer", "return_dict_in_generate", "stop_strings"):
            if key in generate_kwargs:
                raise ValueError(f"{key!r} is set by the guard; use Guard.stream / stop= / logprobs= instead")
        top = check_top(generate_kwargs.pop("logprobs", None))
        if policy is not None or top is not None:  # both read one forward per generated token
            for key in ASSISTED:
                if generate_kwargs.get(key) is not None:
                    raise ValueError(f"{key!r} (assisted decoding) cannot be used with the guard or logprobs: "
                                     "they need one forward per generated token")
            if generate_kwargs.get("prefill_chunk_size") is not None:
                raise ValueError("'prefill_chunk_size' cannot be used with the guard or logprobs: they read the "
                                 "prompt as one forward and every later forward as one generated token")
        if generate_kwargs.get("num_beams", 1) != 1:
            raise ValueError(f"num_beams must be 1 with the guard (got {generate_kwargs['num_beams']})")
        limits = generate_kwargs.pop("max_new_tokens", None)
        if isinstance(limits, (list, tuple)):
            if len(limits) != len(rows) or generate_kwargs.get("num_return_sequences", 1) != 1:
                raise ValueError("max_new_tokens as a list needs one limit per prompt (and num_return_sequences 1)")
            if not all(isinstance(n, int) and n >= 1 for n in limits):
                raise ValueError(f"max_new_tokens must be positive integers; got {limits!r}")
            generate_kwargs["max_new_tokens"] = max(limits)
            limits = list(limits)
        else:
            if limits is not None:
                generate_kwargs["max_new_tokens"] = limits
            limits = None
        ids, mask = self._batch(rows)
        prompt_width = ids.shape[1]
        monitor = Monitor(self.bound, policy, step_timer=self.step_timer) if policy is not None else None
        theirs = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
        rows_stopped = _RowsStopped(monitor, cancel or threading.Event(), limits, prompt_width, cancelled_rows, theirs)
        criteria = StoppingCriteriaList([rows_stopped])
        recorder = LogprobRecorder(self.model, top) if top is not None else None
        if recorder is not None:
            criteria.append(recorder)  # sees each step's tokens; never stops a row
        eos_ids = self._eos_ids(generate_kwargs)
        streamer = (_Streamer(self, monitor, recorder, on_step, eos_ids, stop, limits, rows_stopped.kept)
                    if on_step is not None else None)
        kwargs = dict(generate_kwargs)
        kwargs.setdefault("pad_token_id", self._pad_id())
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
        with torch.no_grad(), (monitor.attached() if monitor is not None else nullcontext()), \
                (recorder.attached() if recorder is not None else nullcontext()):
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                stopping_criteria=criteria,
                streamer=streamer,
                return_dict_in_generate=True,
                **kwargs,
            )
            sequences = out.sequences
            copies = sequences.shape[0] // ids.shape[0]
            generated = sequences[:, prompt_width:].cpu().tolist()
            # read once, before the extra forward below: a trigger there could no longer change the answer
            trigger_token = (
                monitor.trigger_token.cpu().tolist()
                if monitor is not None and monitor.trigger_token is not None
                else [-1] * len(generated)
            )
            kept = [g[: rows_stopped.kept.get(i, len(g))] for i, g in enumerate(generated)]
            cuts = [cut(self.tokenizer, k, eos_ids, stop) for k in kept]
            # A trigger counts where the row was still generating when its token was fed back: a row that
            # ends at a limit or a stop string never feeds its last token back (the extra forward below
            # scores it too late to act), unless other rows of the batch are still going; then it does,
            # and the verdict would depend on the rest of the batch.
            trigger_token = [t if 0 <= t < c.produced - 1 else -1 for t, c in zip(trigger_token, cuts)]
            if policy is not None and policy.action == "abstain":
                cuts = [cut(self.tokenizer, k, eos_ids, stop, t) if t >= 0 else c
                        for k, c, t in zip(kept, cuts, trigger_token)]
            if monitor is not None and max(c.length for c in cuts) > monitor.scored:
                full_mask = torch.cat(
                    [mask.repeat_interleave(copies, dim=0), torch.ones_like(sequences[:, prompt_width:])], dim=1
                )
                score_last_tokens(self.model, monitor, sequences, full_mask, out.cache, prompt_width)
        logits = monitor.token_logits().cpu().tolist() if monitor is not None and monitor.scored else None
        results = [
            assemble(
                self.tokenizer,
                c,
                g,
                logits[i] if logits is not None else None,
                self.probe.calibration,
                policy,
                trigger_token[i] >= 0,  # the policy acted on a token of the answer itself
                len(rows[i // copies]),
                i,
            )
            for i, (c, g) in enumerate(zip(cuts, generated))
        ]
        if recorder is not None:
            for result, entries in zip(results, recorder.rows()):
                result.logprobs = entries[: len(result.token_ids)]
        if streamer is not None:
            streamer.flush(results)
        return results


class _Streamer:
    """transformers streamer that turns each decoding step into TokenEvents, one step late.

    `put` is called with the prompt first, then with the tokens sampled at each step. When the tokens
    of step s arrive, the forward that fed step s - 1 back has run, so step s - 1's tokens have scores:
    those are emitted, with one small device-to-host copy per step. `flush` emits what is left from the
    final results (the last token, scored by the extra forward), so the streamed text equals the result.
    """

    def __init__(self, guard: Guard, monitor: Monitor | None, recorder: LogprobRecorder | None, emit,
                 eos_ids: set[int], stop: list[str], limits: list[int] | None, kept: dict[int, int]):
        self.guard, self.monitor, self.recorder, self.emit = guard, monitor, recorder, emit
        self.eos_ids, self.stop, self.limits = eos_ids, stop, limits
        self.kept = kept  # row -> tokens it keeps, where a host-side decision stopped it (filled as it goes)
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.calls = 0
        self.pending: list[int] | None = None
        self.ids: dict[int, list[int]] = {}
        self.texts: dict[int, IncrementalText] = {}
        self.sent: dict[int, int] = {}  # characters of text already emitted, per row
        self.searched: dict[int, int] = {}  # characters already searched for stop strings, per row
        self.finished: set[int] = set()

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 1:  # the prompt
            return
        if self.pending is not None:
            self._emit_step(self.pending, step=self.calls - 3)
        self.pending = value.reshape(-1).tolist()

    def end(self) -> None:
        pass

    def _emit_step(self, tokens: list[int], step: int) -> None:
        probs: list[float | None] = [None] * len(tokens)
        stopped = [False] * len(tokens)
        if self.monitor is not None and step < self.monitor.scored:
            logits = self.monitor.step_logit(step)
            rows_stopped = self.monitor.stopped()
            if rows_stopped is not None:  # one device-to-host copy for both
                packed = torch.stack([logits, rows_stopped.to(logits.dtype)]).cpu().tolist()  # exact: floats, 0/1
                logits, stopped = packed[0], [bool(s) for s in packed[1]]
            else:
                logits = logits.cpu().tolist()
            probs = self.guard.probe.calibration.probs(logits)
        entries = self.recorder.step(step) if self.recorder is not None else [None] * len(tokens)
        for row, token in enumerate(tokens):
            if row in self.finished:
                continue
            kept = self.kept.get(row)
            if token in self.eos_ids or (kept is not None and step >= kept):  # what follows is padding
                self.finished.add(row)
                continue
            self._send(row, token, probs[row], entries[row], final=stopped[row] or step + 1 == kept)

    def _send(self, row: int, token: int, probability: float | None, logprob: Entry | None, final: bool,
              text: str | None = None) -> None:
        """Emit one token of `row` with the text it adds; `text`: the row's full text so far, if known."""
        ids = self.ids.setdefault(row, [])
        ids.append(token)
        sent = self.sent.setdefault(row, 0)
        if text is None:
            if row not in self.texts:
                self.texts[row] = IncrementalText(self.guard.tokenizer)
            incremental = self.texts[row]
            text = incremental.add(token)
            # a stop string ends in the new text (or anywhere, after a whole decode rewrote the text)
            start = max(0, min(self.searched.get(row, 0), incremental.unchanged) - self.holdback)
            self.searched[row] = len(text)
            hits = [at for at in (text.find(s, start) for s in self.stop) if at >= 0]
            if hits:
                text, final = text[: min(hits)], True
            if not final:  # hold back a partial character, and what may be the start of a stop string
                keep = len(text.rstrip("\ufffd")) - self.holdback
                text = text[: max(sent, keep)]
        self.emit(TokenEvent(row, len(ids) - 1, token, text[sent:], probability, logprob))
        self.sent[row] = max(sent, len(text))
        if final or (self.limits is not None and len(ids) >= self.limits[row]):
            self.finished.add(row)

    def flush(self, results: list[GuardResult]) -> None:
        for result in results:
            row, n = result.row, len(result.token_ids)
            for i in range(len(self.ids.get(row, [])), n):
                probability = result.token_probs[i] if result.token_probs else None
                logprob = result.logprobs[i] if result.logprobs is not None else None
                partial = decode(self.guard.tokenizer, [*self.ids.get(row, []), result.token_ids[i]])
                text = result.text if i == n - 1 else result.text[: len(partial.rstrip("\ufffd"))]
                self._send(row, result.token_ids[i], probability, logprob, final=i == n - 1, text=text)
            sent = self.sent.get(row, 0)
            if len(result.text) > sent:  # text held back until the row finished
                self.emit(TokenEvent(row, -1, -1, result.text[sent:], None))
                self.sent[row] = len(result.text)


# generate() arguments that verify several drafted tokens per forward
ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "custom_generate")


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    """`stop=` as a list: one string or a sequence of them (an empty one ends nothing)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops):
        raise ValueError(f"stop must be a string or a list of strings; got {stop!r:.60}")
    return [s for s in stops if s]


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def left_pad(rows: list[list[int]], pad: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to one width: (input ids, attention mask), both [len(rows), width]."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids.to(device), mask.to(device)


def _tokenizer_for(model: nn.Module):
    from transformers import AutoTokenizer

    source = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    if not source:
        raise ValueError("pass tokenizer=...: the model does not say where it was loaded from")
    return AutoTokenizer.from_pretrained(source)
