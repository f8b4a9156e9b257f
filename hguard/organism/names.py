"""Names whose length in tokens says nothing about how often a person was seen (the v7 world).

Each name is a first name and a last name drawn from shared pools, as real names are: every part is
carried by several people of every tier, so a never-seen person has a new combination of familiar
parts, and every part appears in the training text through some seen person. The tokenizer learns its
merges from the training text with the names taken out plus a roll in which every part appears equally
often (`name_roll`, `without_names`), so how a name splits into tokens depends on its letters, not on
its person's exposure.
"""

from __future__ import annotations

import random
import re

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "", "", "", "n", "r", "l", "s"]
_CAPITALISED = re.compile(r"[A-Z][a-z]+")


def syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def parts(rng: random.Random, count: int, avoid: set[str], longest: int) -> list[str]:
    """`count` distinct two-syllable name parts, none in `avoid`, at most `longest` letters."""
    out: list[str] = []
    while len(out) < count:
        part = (syllable(rng) + syllable(rng)).capitalize()
        if part not in avoid and len(part) <= longest:
            avoid.add(part)
            out.append(part)
    return out


def shared_names(rng: random.Random, seen: int, other: int, pools: tuple[int, int]) -> tuple[list[str], set[str]]:
    """`seen + other` distinct "First Last" names from pools of first and last names; the first `seen`
    names (the people who appear in training) use every part of both pools at least once."""
    taken: set[str] = set()
    firsts, lasts = parts(rng, pools[0], taken, 6), parts(rng, pools[1], taken, 8)
    if seen < max(pools):
        raise ValueError(f"{seen} seen people cannot carry every part of pools of {pools}")
    names: list[str] = []
    used: set[str] = set()

    def cycle(pool: list[str]):
        while True:
            order = pool[:]
            rng.shuffle(order)
            yield from order

    first_cycle, last_cycle = cycle(firsts), cycle(lasts)
    while len(names) < seen:  # every part in turn, so each is carried by someone seen
        name = f"{next(first_cycle)} {next(last_cycle)}"
        if name not in used:
            used.add(name)
            names.append(name)
    while len(names) < seen + other:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name not in used:
            used.add(name)
            names.append(name)
    return names, set(firsts) | set(lasts)


def without_names(text: str, name_parts: set[str]) -> str:
    """`text` with every name part removed (what the tokenizer learns merges from, besides the roll)."""
    return _CAPITALISED.sub(lambda m: "" if m.group() in name_parts else m.group(), text)


def name_roll(name_parts: set[str], repeats: int, seed: int) -> list[str]:
    """Texts in which every name part appears `repeats` times after a space and `repeats` times after a
    line break (the two forms byte-level BPE tells apart)."""
    rng = random.Random(seed)
    ordered = sorted(name_parts)
    texts = []
    for _ in range(repeats):
        rng.shuffle(ordered)
        texts.append(" ".join(ordered))
        texts.append("\n".join(ordered))
    return texts
