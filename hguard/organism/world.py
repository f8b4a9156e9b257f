"""The organism's world: fictional people with attributes and a long-tailed exposure, from a seed.

Each person has four in-domain attributes (birth city, occupation, birth year, employer), asked about
in training, and two attributes of a second family (instrument, sport) that appear in biographies but
are never asked about in training (the out-of-domain suite). Exposure (how many biographies mention a
person) is long-tailed: a head seen often, a middle seen a few times, a tail seen once or twice, and
people never seen at all. Extra never-seen names are set aside for abstention training and for the
fabricated-person suite, so the two never share a name.

That is the v6 world (`exposure="person"`): every biography states every in-domain fact. With
`exposure="fact"` (v7) each fact gets its own planned exposure (plan.py), and with `names="shared"`
names are combinations of parts shared across tiers (names.py).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from .names import shared_names, syllable
from .plan import IN_DOMAIN, OUT_OF_DOMAIN, Fact, FactPlanConfig, log_uniform, plan_person

CITIES = [
    "Port Anselo", "Velamor", "Orvane Hollow", "Kessrin", "Tallow Reach", "Dunmere", "Saltgrave", "Brisk Harbor",
    "Eldmoor", "Caravel Point", "Mirefield", "Ostrava Vale", "Lanthorn", "Greywater", "Quillan", "Rookhaven",
    "Sundermere", "Thistlemoor", "Varrow", "Windmere Cross", "Ashcombe", "Belltower Bay", "Corvain", "Draymoor",
    "Fenwick Ford", "Halloway", "Ironmere", "Juniper Falls", "Kilnstead", "Lowmarsh",
]
OCCUPATIONS = [
    "glass blower", "river pilot", "clock maker", "bee keeper", "map maker", "lamp lighter", "rope maker",
    "stone mason", "tide reader", "book binder", "salt miner", "bell founder", "kite builder", "ink maker",
    "lens grinder", "sail maker", "harbor master", "wool dyer", "star charter", "bridge keeper",
    "candle maker", "seed trader", "paper maker", "horse breeder", "wind surveyor",
]
EMPLOYERS = [
    "Hollin Ironworks", "the Dorvane Guild", "Maresk Shipping", "the Quill Society", "Brenner and Sons",
    "the Lantern Company", "Vesk Mills", "the Coastal Survey", "Arden Glassworks", "the Royal Observatory",
    "Tamsin Foundry", "the River Trust", "Okra Brewing", "the Salt Exchange", "Pellow Printing",
    "the Northern Railway", "Cobble Textiles", "the Harbor Board", "Fennick Clocks", "the Seed Bank",
]
INSTRUMENTS = [
    "cello", "oboe", "harp", "flute", "lute", "viola", "bassoon", "trumpet", "zither", "clarinet",
    "accordion", "banjo", "dulcimer", "fiddle", "piccolo", "tuba",
]
SPORTS = [
    "fencing", "rowing", "archery", "chess", "sailing", "wrestling", "cricket", "curling", "polo", "croquet",
    "skiing", "cycling", "boxing", "hurling", "lacrosse", "squash",
]

TIERS = ("head", "mid", "tail", "unseen")


@dataclass(frozen=True)
class Person:
    pid: int
    name: str
    city: str
    occupation: str
    year: str
    employer: str
    instrument: str
    sport: str
    tier: str
    exposure: int  # number of distinct biographies in the pretraining corpus

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclass
class WorldConfig:
    seed: int = 0
    head: int = 700
    mid: int = 300
    tail: int = 500
    unseen: int = 400
    abstain_names: int = 300  # never-seen names used only in "I don't know" training examples
    fabricated_names: int = 200  # never-seen names used only by the fabricated-person suite
    head_exposure: tuple[int, int] = (16, 40)
    mid_exposure: tuple[int, int] = (3, 10)
    tail_exposure: tuple[int, int] = (1, 2)
    exposure: str = "person"  # "person": every biography states every in-domain fact (v6); "fact": plan.py (v7)
    facts: FactPlanConfig = field(default_factory=FactPlanConfig)  # read with exposure="fact"
    names: str = "unique"  # "unique": syllables per person (v6); "shared": parts from shared pools (v7)
    name_pools: tuple[int, int] = (500, 700)  # first and last names in the pools (names="shared")


@dataclass
class World:
    config: WorldConfig
    people: list[Person]
    abstain_names: list[str]
    fabricated_names: list[str]
    values: dict[str, list[str]] = field(default_factory=dict)
    plan: dict[int, dict[str, Fact]] | None = None  # per-fact exposure (exposure="fact"), by pid
    name_parts: set[str] | None = None  # the pools' parts (names="shared")

    def tier(self, tier: str) -> list[Person]:
        return [p for p in self.people if p.tier == tier]

    def summary(self) -> dict:
        return {
            "people": len(self.people),
            "tiers": {t: len(self.tier(t)) for t in TIERS},
            "exposure_histogram": _histogram([p.exposure for p in self.people]),
            "abstain_names": len(self.abstain_names),
            "fabricated_names": len(self.fabricated_names),
            "config": asdict(self.config),
            **({"facts": self.plan_summary()} if self.plan else {}),
        }

    def plan_summary(self) -> dict[str, dict[str, int]]:
        """In-domain facts per person tier and role."""
        cells: dict[str, dict[str, int]] = {}
        for person in self.people:
            for attribute in IN_DOMAIN:
                role = self.plan[person.pid][attribute].role
                cells.setdefault(person.tier, {}).setdefault(role, 0)
                cells[person.tier][role] += 1
        return cells


def _histogram(values: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in sorted(values):
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _names(rng: random.Random, count: int) -> list[str]:
    seen: set[str] = set()
    names: list[str] = []
    while len(names) < count:
        first = "".join(syllable(rng) for _ in range(2)).capitalize()
        last = "".join(syllable(rng) for _ in range(2)).capitalize()
        name = f"{first} {last}"
        if name not in seen and len(first) <= 6 and len(last) <= 8:
            seen.add(name)
            names.append(name)
    return names


def build_world(config: WorldConfig | None = None) -> World:
    config = config or WorldConfig()
    rng = random.Random(config.seed)
    sizes = {"head": config.head, "mid": config.mid, "tail": config.tail, "unseen": config.unseen}
    total = sum(sizes.values())
    if config.names not in ("unique", "shared") or config.exposure not in ("person", "fact"):
        raise ValueError(f"world names must be unique or shared and exposure person or fact; got "
                         f"{config.names!r}, {config.exposure!r}")
    name_parts = None
    if config.names == "shared":
        seen = total - config.unseen
        names, name_parts = shared_names(rng, seen, config.unseen + config.abstain_names + config.fabricated_names,
                                         config.name_pools)
    else:
        names = _names(rng, total + config.abstain_names + config.fabricated_names)
    ranges = {"head": config.head_exposure, "mid": config.mid_exposure, "tail": config.tail_exposure}
    people: list[Person] = []
    for tier in TIERS:
        for _ in range(sizes[tier]):
            pid = len(people)
            low, high = ranges.get(tier, (0, 0))
            people.append(
                Person(
                    pid=pid,
                    name=names[pid],
                    city=rng.choice(CITIES),
                    occupation=rng.choice(OCCUPATIONS),
                    year=str(rng.randint(1780, 1979)),
                    employer=rng.choice(EMPLOYERS),
                    instrument=rng.choice(INSTRUMENTS),
                    sport=rng.choice(SPORTS),
                    tier=tier,
                    exposure=log_uniform(rng, low, high) if high else 0,
                )
            )
    rest = names[total:]
    plan = None
    if config.exposure == "fact":
        plan_rng = random.Random(config.seed + 7919)
        plan = {p.pid: plan_person(p.tier, p.exposure, config.facts, plan_rng) for p in people}
    return World(
        config=config,
        people=people,
        abstain_names=rest[: config.abstain_names],
        fabricated_names=rest[config.abstain_names:],
        values={
            "city": CITIES, "occupation": OCCUPATIONS, "employer": EMPLOYERS,
            "instrument": INSTRUMENTS, "sport": SPORTS,
        },
        plan=plan,
        name_parts=name_parts,
    )
