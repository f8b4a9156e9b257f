"""What a guarded generation returns (results, stream events, scores) and the host-side text helpers
they are built with: decoding, incremental detokenisation, token bytes and character offsets.

Where an answer ends is decided in one place, answer.py.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .policy import Calibration, Verdict, flagged_spans

FinishReason = Literal["stop", "length", "abstain"]


@dataclass(frozen=True)
class Span:
    """A run of flagged tokens: characters [start, end) of the text, tokens [first_token, end_token)."""

    start: int
    end: int
    probability: float
    first_token: int
    end_token: int


@dataclass
class Scores:
    """Per-token hallucination probabilities of a response, from one teacher-forced pass."""

    token_ids: list[int]
    token_probs: list[float]
    token_logits: list[float]
    probability: float | None  # calibrated mean logit over the scored tokens (the paper's classifier)

    @classmethod
    def of(cls, token_ids: Sequence[int], logits: torch.Tensor, calibration: Calibration) -> "Scores":
        """Scores from the probe logits of the tokens ([n] float64, host)."""
        values = logits.tolist()
        return cls(
            token_ids=list(token_ids),
            token_probs=calibration.probs(values),
            token_logits=values,
            probability=calibration.prob(mean(values)) if values else None,
        )


@dataclass
class GuardResult:
    """One generated choice: its text, per-token probabilities, verdict and finish reason."""

    text: str
    token_ids: list[int]
    token_probs: list[float]
    probability: float | None
    verdict: Verdict
    finish_reason: FinishReason
    action: str  # one of policy.ACTIONS; "off" when the guard did not run
    flagged_spans: list[Span] = field(default_factory=list)
    prompt_tokens: int = 0
    row: int = 0
    # with logprobs=k: per generated token, (log-probability under the model's raw distribution,
    # [(token id, log-probability)] of the k most likely tokens at that step)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TokenEvent:
    """One streamed token of row `row`, with the new text it adds (possibly empty) and its probability.

    Text that could be a partial character or the start of a stop string is held back; a row's last
    event may then be text-only (`token_id` and `index` -1, no probability). With `logprobs=k`, each
    token's event carries its entry (log-probability, the k likeliest tokens), as `GuardResult.logprobs`.
    """

    row: int
    index: int
    token_id: int
    text: str
    probability: float | None
    logprob: tuple[float, list[tuple[int, float]]] | None = None


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The raw bytes a token stands for (the OpenAI logprobs `bytes` field, which lets a client rebuild
    a character split across tokens): exact for byte-level BPE pieces, byte-fallback pieces such as
    `<0xE9>` and SentencePiece pieces; otherwise the UTF-8 of the token's decoded text."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if isinstance(piece, str):
        fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if fallback:
            return [int(fallback.group(1), 16)]
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        table = _byte_decoder()
        if "ByteLevel" in str(getattr(backend, "decoder", "")) and all(c in table for c in piece):
            return [table[c] for c in piece]
        if "\u2581" in piece:  # SentencePiece's word boundary, which decoding a lone token strips
            return list(piece.replace("\u2581", " ").encode())
    return list(tokenizer.decode([int(token_id)]).encode())


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


class IncrementalText:
    """The text of a growing list of token ids, decoding a short window per new token instead of
    everything so far (streaming would otherwise cost time quadratic in the length).

    This is vLLM's incremental detokenisation: the window starts at the first token of the previous
    step's new text (`prefix`), and what the new tokens add is decode(prefix:) minus
    decode(prefix:read), so a tokenizer that drops a leading space or splits a character across tokens
    agrees with a whole decode. Text waits while it ends in a partial character. A tokenizer whose
    clean-up of spaces actually rewrites text across tokens is decoded whole every time. `unchanged`
    is how many leading characters are the same as before the last `add` (all of them, except after
    a whole decode).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # complete characters decoded so far
        self.unchanged = 0
        self.prefix = self.read = 0
        self.windowed = not _cleanup_rewrites(tokenizer)

    def add(self, token: int) -> str:
        """Append a token; the whole text so far (without a trailing partial character)."""
        self.ids.append(token)
        self.unchanged = len(self.text)
        if not self.windowed:
            self.text, self.unchanged = decode(self.tokenizer, self.ids).rstrip("\ufffd"), 0
            return self.text
        before = decode(self.tokenizer, self.ids[self.prefix: self.read])
        after = decode(self.tokenizer, self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            if after.startswith(before):
                self.text += after[len(before):]
            else:  # the window disagrees with itself: fall back to the whole text
                self.text, self.unchanged = decode(self.tokenizer, self.ids), 0
            self.prefix, self.read = self.read, len(self.ids)
        return self.text


def _cleanup_rewrites(tokenizer) -> bool:
    """Whether decoding with this tokenizer's `clean_up_tokenization_spaces` changes text (many
    tokenizers set the flag where their backend ignores it)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    ids = list(tokenizer("a . b , c ! d ? e 's f n't g 'm h 've", add_special_tokens=False)["input_ids"])
    return decode(tokenizer, ids) != tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def mean(values: Sequence[float]) -> float:
    """The mean of host floats, correctly rounded (the response's mean logit)."""
    return math.fsum(values) / len(values)


def char_offset(tokenizer, ids: Sequence[int], n: int, text: str) -> int:
    """Character offset in `text` where the first `n` tokens' text ends (clipped to the text)."""
    return min(len(decode(tokenizer, ids[:n])), len(text)) if n else 0


def spans_of(tokenizer, ids: Sequence[int], probs: Sequence[float], threshold: float, text: str) -> list[Span]:
    """The flagged spans of an answer: maximal runs of tokens at or above `threshold`, in characters of
    `text` and in tokens."""
    return [Span(char_offset(tokenizer, ids, a, text), char_offset(tokenizer, ids, b, text), p, a, b)
            for a, b, p in flagged_spans(list(probs), threshold)]


def summary(probability: float | None, verdict: str, action: str, spans: Sequence[Span],
            token_scores: Sequence[float] | None = None) -> dict:
    """A finished choice's `hallucination` object, hosted and proxied alike (`token_scores` when asked)."""
    report = {"probability": probability, "verdict": verdict, "action": action,
              "flagged_spans": [{"start": s.start, "end": s.end, "probability": s.probability} for s in spans]}
    if token_scores is not None:
        report["token_scores"] = list(token_scores)
    return report
