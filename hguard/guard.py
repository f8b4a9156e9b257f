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
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .actions import action_name
from .batching import left_pad, pad_id
from .episode import Episode
from .hooks import model_lock, stoppable
from .monitor import Monitor
from .policy import Policy
from .probe import Probe
from .registry import find_probe
from .results import GuardResult, Scores, TokenEvent
from .sites import resolve

Prompt = str | list[dict] | list[int]


class Guard:
    """Hallucination guard around a transformers causal LM."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        probe: Probe | str | Path | None = None,
        *,
        threshold: float | None = None,
        check_weights: bool = True,
    ) -> None:
        """`check_weights=False` checks only the probe's architecture against `model` (for a model without
        weights, e.g. on the meta device, whose weights an engine elsewhere holds and checks)."""
        self.model = model
        self.sites = resolve(model)  # fails early, naming the model type, on an unsupported model
        if check_weights and (offloaded := self.sites.offloaded()):
            raise ValueError(f"layers {offloaded} are offloaded to disk (their weights are not in memory); the "
                             "guard reads every hooked layer's weights: place them on a device (device_map "
                             "with CPU layers works)")
        if tokenizer is None:
            tokenizer = _tokenizer_for(model)
        self.tokenizer = tokenizer
        if probe is None:
            probe = find_probe(model, strict=check_weights)
        elif isinstance(probe, (str, Path)):
            probe = Probe.load(probe, model) if check_weights else Probe.load(probe)
        elif check_weights:
            probe.check(model)
        if not check_weights:
            probe.check(model, strict=False)
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
    def episode(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        action: str | None = "flag",
        threshold: float | None = None,
        alpha: float | None = None,
        stop: str | Sequence[str] | None = None,
        logprobs: int | None = None,
        on_event: Callable[[TokenEvent | GuardResult], None] | None = None,
        cancel: threading.Event | None = None,
        cancelled_rows: Callable[[], Collection[int]] | None = None,
        **generate_kwargs,
    ) -> Episode:
        """One guarded generation, checked and ready to `run()` (what `generate` and `stream` run, and an
        engine drives itself): every argument as for `generate`; `on_event` receives the stream's events
        in the thread that runs it, `cancel` stops every row at the next step, `cancelled_rows` (polled
        every step) single rows. Bad arguments raise here, before anything runs."""
        return Episode(self, self._prompts(prompts), self.policy(action, threshold, alpha), stop_strings(stop),
                       {**generate_kwargs, "logprobs": logprobs}, on_event=on_event, cancel=cancel,
                       cancelled_rows=cancelled_rows)

    def generate(self, prompts: Prompt | Sequence[Prompt], **options) -> list[GuardResult]:
        """Generate for a batch of prompts; one GuardResult per choice (prompt-major with n > 1).

        action: "flag" (score only), "abstain", "dampen", "scale" (fixed alpha from the first token), or
        "off" (guard off, no hook; None means the same). threshold: probability in [0, 1] (default: the
        probe's calibrated ones, one for flags and one for the running mean that abstain and dampen
        watch). alpha: the H-Neuron scale for dampen/scale. stop: a string or a list of them.
        logprobs: None, or k in [0, 20] to return each token's log-probability under the model's raw
        distribution and the k most likely tokens at that step (`GuardResult.logprobs`). Other keyword
        arguments go to `model.generate`.
        """
        return self.episode(prompts, **options).run()

    def stream(self, prompts: Prompt | Sequence[Prompt], **options) -> Iterator[TokenEvent | GuardResult]:
        """Like `generate`, but yields each token as a TokenEvent as soon as its score exists (one step
        after it was sampled), then one GuardResult per choice (with `logprobs`, events and results
        carry the tokens' entries). It generates in a worker thread; closing the iterator stops the
        generation. `cancelled_rows` (polled every step) stops single rows."""
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()
        done = object()
        episode = self.episode(prompts, on_event=events.put, cancel=cancel, **options)

        def work() -> None:
            try:
                for item in episode.run():
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


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    """`stop=` as a list: one string or a sequence of them (an empty one ends nothing)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops):
        raise ValueError(f"stop must be a string or a list of strings; got {stop!r:.60}")
    return [s for s in stops if s]


def _tokenizer_for(model: nn.Module):
    from transformers import AutoTokenizer

    source = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    if not source:
        raise ValueError("pass tokenizer=...: the model does not say where it was loaded from")
    return AutoTokenizer.from_pretrained(source)
