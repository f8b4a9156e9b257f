"""Exposure per fact (the v7 world): how many documents state each fact, planned before any text exists.

In the v6 world every biography states all four in-domain facts, so a fact's exposure is its person's
and familiarity with the name gives the answer away. Here each fact gets a role that sets its count:
  full      stated in every biography of the person
  thin      a well-known person's fact stated in only a few of the biographies (`thin`)
  withheld  a well-known person's fact stated in 0 or 1 of them (`withheld`): the model should not know it
  boosted   a rarely seen person's fact stated in the biographies plus many one-sentence notes (`notes`)
  unseen    a fact of a person with no biography (stated nowhere)
Out-of-domain facts (instrument, sport) are stated in a planned number of biographies (a binomial draw).
A fact's exposure is the number of pre-training documents that state it (biographies, notes, and for the
facts asked in training their question-answer documents); a person's exposure is the number of
pre-training documents that mention the person. `Ledger` counts both while the text is written, so the
count that reaches the suites is the corpus's, and tests compare it with the plan.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

IN_DOMAIN = ("city", "occupation", "year", "employer")
OUT_OF_DOMAIN = ("instrument", "sport")
ROLES = ("full", "thin", "withheld", "boosted", "unseen")


@dataclass
class FactPlanConfig:
    head_withheld: float = 0.5  # share of head people with one in-domain fact in 0 or 1 biographies
    head_thin: float = 0.3  # share of head people with one in-domain fact in only a few biographies
    mid_withheld: float = 0.4
    mid_boosted: float = 0.3  # share of mid people with one in-domain fact repeated in short notes
    tail_boosted: float = 0.5
    withheld: tuple[int, int] = (0, 1)
    thin: tuple[int, int] = (2, 6)
    notes: tuple[int, int] = (8, 30)  # one-sentence notes of a boosted fact (log-uniform)
    other_share: float = 0.5  # chance that a biography states each out-of-domain fact


@dataclass(frozen=True)
class Fact:
    role: str
    bios: int  # biographies that state it
    notes: int = 0  # one-sentence notes that state it

    @property
    def planned(self) -> int:
        """Documents that state it outside question-answer text."""
        return self.bios + self.notes


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    import math

    return int(round(math.exp(rng.uniform(math.log(max(low, 1)), math.log(high + 0.499)))))


def plan_person(tier: str, bios: int, config: FactPlanConfig, rng: random.Random) -> dict[str, Fact]:
    """The facts of one person with `bios` biographies: in-domain roles by tier, out-of-domain counts."""
    special: dict[str, str] = {}
    order = list(IN_DOMAIN)
    rng.shuffle(order)
    shares = {"head": [("withheld", config.head_withheld), ("thin", config.head_thin)],
              "mid": [("withheld", config.mid_withheld), ("boosted", config.mid_boosted)],
              "tail": [("boosted", config.tail_boosted)]}.get(tier, [])
    for role, share in shares:
        if rng.random() < share:
            special[order[len(special)]] = role
    facts = {}
    for attribute in IN_DOMAIN:
        role = special.get(attribute, "full" if bios else "unseen")
        if role == "withheld":
            facts[attribute] = Fact(role, rng.randint(*config.withheld))
        elif role == "thin":
            facts[attribute] = Fact(role, min(bios, rng.randint(*config.thin)))
        elif role == "boosted":
            facts[attribute] = Fact(role, bios, log_uniform(rng, *config.notes))
        else:
            facts[attribute] = Fact(role, bios)
    for attribute in OUT_OF_DOMAIN:
        facts[attribute] = Fact("full", sum(rng.random() < config.other_share for _ in range(bios)))
    return facts


@dataclass
class Ledger:
    """What the pre-training text states: documents per fact (pid, attribute) and per person."""

    facts: Counter = field(default_factory=Counter)
    people: Counter = field(default_factory=Counter)

    def document(self, pid: int, attributes) -> None:
        """One document that mentions person `pid` and states `attributes` of it."""
        self.people[pid] += 1
        for attribute in set(attributes):
            self.facts[(pid, attribute)] += 1

    def fact(self, pid: int, attribute: str) -> int:
        return self.facts.get((pid, attribute), 0)

    def person(self, pid: int) -> int:
        return self.people.get(pid, 0)
