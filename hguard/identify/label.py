"""Labels for sampled answers: normalised alias match, refusal detection, answer-span location.

Normalisation follows the SQuAD/TriviaQA convention: lower-case, drop punctuation and the articles
a/an/the, collapse whitespace. A response is correct when a normalised gold alias occurs in it as
whole words, a refusal when it matches a refusal phrase, and wrong otherwise.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Literal

Judgement = Literal["correct", "wrong", "refusal"]
REFUSALS = (
    "i don't know", "i do not know", "no information", "not familiar", "i'm not sure", "i am not sure",
    "cannot answer", "can't answer", "unknown",
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    text = text.lower().replace("\u2019", "'").translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains(response: str, alias: str) -> bool:
    alias = normalize(alias)
    return bool(alias) and f" {alias} " in f" {normalize(response)} "


def is_refusal(response: str) -> bool:
    lowered = response.lower().replace("\u2019", "'")
    return any(marker in lowered for marker in REFUSALS)


def judge(response: str, aliases: Sequence[str]) -> Judgement:
    """correct / wrong / refusal; an empty answer says nothing, so it counts as a refusal."""
    if not normalize(response):
        return "refusal"
    if any(contains(response, alias) for alias in aliases):
        return "correct"
    return "refusal" if is_refusal(response) else "wrong"


def answer_span(response: str, candidates: Sequence[str]) -> tuple[int, int] | None:
    """Character span of the first candidate found in `response` (case-insensitive), or None."""
    lowered = response.lower()
    best: tuple[int, int] | None = None
    for candidate in candidates:
        if not candidate:
            continue
        at = lowered.find(candidate.lower())
        if at >= 0 and (best is None or at < best[0]):
            best = (at, at + len(candidate))
    return best


def token_span(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the tokens whose character offsets overlap `span`."""
    start, end = span
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]


def consistency(answers: Sequence[str], aliases: Sequence[str]) -> str:
    """'all_correct', 'all_wrong', 'refusal' (some answer refuses) or 'mixed' for one question's samples."""
    verdicts = {judge(a, aliases) for a in answers}
    if "refusal" in verdicts:
        return "refusal"
    return {frozenset({"correct"}): "all_correct", frozenset({"wrong"}): "all_wrong"}.get(frozenset(verdicts), "mixed")


def consistency_labels(items: Sequence[dict], samples: Sequence[Sequence[str]]):
    """Keep questions whose samples are all correct (label 0) or all wrong (label 1); say why others drop.

    Returns (kept, dropped): kept is a list of dicts {item, label, response, span, span_source}, where
    `response` is the first sample and `span` the character span of its answer (the gold alias for a
    faithful answer; for a hallucinated one the first candidate value found, else the whole response,
    counted as `span_whole_response`). `dropped` counts every dropped question by reason.
    """
    from collections import Counter

    kept, dropped = [], Counter()
    for item, answers in zip(items, samples):
        if not answers:
            dropped["no_samples"] += 1
            continue
        label = consistency(answers, item.get("aliases", []))
        if label in ("refusal", "mixed"):
            dropped[label] += 1
            continue
        response = answers[0]
        faithful = label == "all_correct"
        span = answer_span(response, item.get("aliases", []) if faithful else item.get("candidates", []))
        source = "alias" if faithful else "candidate"
        if span is None:
            stripped = response.strip().rstrip(".!")
            if not stripped:
                dropped["empty_response"] += 1
                continue
            start = response.find(stripped)
            span, source = (start, start + len(stripped)), "whole_response"
            dropped["span_whole_response (kept)"] += 1
        kept.append({"item": item, "label": 0 if faithful else 1, "response": response, "span": span,
                     "span_source": source})
    return kept, dict(dropped)
