"""Held-out phrasing suites for `hguard eval`: question templates, system prompts and a prior chat turn
that appear nowhere in the organism's training text, in the probe's fit or in any choice of setting.

Three suites over the same facts (held-out in-domain attributes of every tier, the facts of the
`paraphrase` suite), each adding one novelty to the one before, so their differences can be read:
  heldout_questions  a question template never used in training nor by the paraphrase suite
  heldout_system     the same question, after a system prompt (the organism never saw a system turn)
  heldout_multiturn  the same question, after one earlier exchange about another well-known person
                     (a training-form answer to a new-template question), then the question
A fact gets the same template in all three. Only facts on the test side of the shipped probe's split
are written (its seed is read from the probe), so not one of them is on a side any fit ever reads;
`hguard eval` keeps the test side of every non-training suite anyway. Of those, `--per-tier` facts of
each tier are kept (50 by default, chosen by a hash of the fact: sampling 10 answers to each of the
1,131 test-side facts in three suites took too long on the shared 2-core CPU; 0 keeps them all). Items carry `messages` (the chat
as asked) beside `question` (its last user turn) and the usual fields (suites.py).

    python benchmarks/heldout_suites.py                   # writes hguard/organism/weights/suites/heldout_*.jsonl
    python benchmarks/heldout_suites.py --out DIR --check # elsewhere, and check against the shipped files
    python benchmarks/heldout_suites.py --build runs/organism-v7 --per-tier 0   # a build's world (v7 too):
                                                          # writes runs/organism-v7/suites/heldout_*.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

from hguard.identify.fit import split_of
from hguard.identify.label import normalize
from hguard.organism import SHIPPED
from hguard.organism import corpus, phrasing
from hguard.organism.build import BuildConfig, load_world
from hguard.organism.plan import Ledger
from hguard.organism.suites import DOUBT, FALSE_PREMISE, _item, write_suites
from hguard.organism.corpus import Split
from hguard.organism.world import IN_DOMAIN, TIERS, WorldConfig, build_world

QUESTIONS: dict[str, list[str]] = {
    "city": ["Name the city where {n} was born.", "What city does {n} come from?",
             "Tell me which city {n} was born in."],
    "occupation": ["What job did {n} have?", "Name the trade that {n} followed.", "What kind of work did {n} do?"],
    "year": ["What year was {n} born in?", "Tell me {n}'s year of birth.", "Give the year of birth of {n}."],
    "employer": ["Who was {n}'s employer?", "Name the organisation that employed {n}.",
                 "Which company employed {n}?"],
}
SYSTEMS = [
    "You are a careful archivist. Answer questions about people briefly.",
    "You answer questions about people from the records you have read. Keep answers short.",
    "Be concise and accurate.",
]
NAMES = ("heldout_questions", "heldout_system", "heldout_multiturn")


def training_templates() -> list[str]:
    """Every template of text the organism was trained on or is already evaluated with."""
    groups = [corpus.QUESTIONS_TRAIN, corpus.QUESTIONS_HELD_OUT, corpus.BIO_SENTENCES, corpus.ANSWERS,
              corpus.ANSWERS_AFTER_A_WORD, FALSE_PREMISE, phrasing.QUESTIONS, phrasing.ANSWERS]
    return ([t for group in groups for ts in group.values() for t in ts] + corpus.ABSTAIN + phrasing.ABSTAIN
            + phrasing.SYSTEMS + [corpus.SYSTEM, DOUBT])


def clashing(templates: list[str], known: list[str]) -> list[str]:
    """The templates of `templates` that equal a known one once normalised (should be none)."""
    seen = {normalize(t.replace("{n}", "X").replace("{v}", "Y").replace("{w}", "Y")) for t in known}
    return [t for t in templates if normalize(t.replace("{n}", "X")) in seen]


def of_build(directory: str | Path):
    """The world, split and ledger (documents per fact and per person) of a finished organism build."""
    directory = Path(directory)
    config = BuildConfig().updated(json.loads((directory / "build.json").read_text())["config"])
    config.world.seed = config.seed
    world = build_world(config.world)
    ledger = Ledger()
    for line in (directory / "exposure.jsonl").read_text().splitlines():
        fact = json.loads(line)
        ledger.facts[(fact["pid"], fact["attribute"])] = fact["exposure"]
        ledger.people[fact["pid"]] = fact["person_exposure"]
    return world, Split.of(world), ledger


def build(world_seed: int = 0, split_seed: int = 0, seed: int = 0, per_tier: int = 0,
          directory: str | Path | None = None) -> dict[str, list[dict]]:
    """The three suites, deterministic in the seeds (the world's, the probe split's, the suites' own); with
    `per_tier`, at most that many facts of each tier (the first by a hash of the fact's id). With
    `directory`, over that build's world, with its exposures (`world_seed` unused)."""
    clashes = clashing([q for qs in QUESTIONS.values() for q in qs] + SYSTEMS, training_templates())
    if clashes:
        raise ValueError(f"held-out templates that training or another suite already uses: {clashes}")
    if directory is None:
        (world, split), ledger = load_world(world_seed, WorldConfig(seed=world_seed)), None
    else:
        world, split, ledger = of_build(directory)
    rng = random.Random(seed)
    head = world.tier("head")
    suites: dict[str, list[dict]] = {name: [] for name in NAMES}
    for person in world.people:
        for attribute in split.held_out(person):
            if attribute not in IN_DOMAIN:
                continue
            question = rng.choice(QUESTIONS[attribute]).format(n=person.name)
            system = rng.choice(SYSTEMS)
            other = rng.choice([p for p in head if p.pid != person.pid])
            earlier = rng.choice(IN_DOMAIN)
            history = [{"role": "user", "content": rng.choice(QUESTIONS[earlier]).format(n=other.name)},
                       {"role": "assistant", "content": corpus.answer(other, earlier, rng, corpus.ANSWERS_AFTER_A_WORD)}]
            if split_of(f"in_domain-{person.pid}-{attribute}", split_seed) != "test":
                continue  # drawn before this test, so every kept fact gets the same draws whatever the split
            turns = {"heldout_questions": [], "heldout_system": [{"role": "system", "content": system}],
                     "heldout_multiturn": history}
            for name in NAMES:
                messages = turns[name] + [{"role": "user", "content": question}]
                suites[name].append(_item(world, name, person, attribute, question, ledger, messages=messages))
    if per_tier:
        ranked = sorted(suites[NAMES[0]], key=lambda i: hashlib.sha256(f"{seed}:{i['pid']}-{i['attribute']}".encode()).hexdigest())
        keep = {f"{i['pid']}-{i['attribute']}" for tier in TIERS for i in [i for i in ranked if i["tier"] == tier][:per_tier]}
        suites = {name: [i for i in items if f"{i['pid']}-{i['attribute']}" in keep] for name, items in suites.items()}
    return suites


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(SHIPPED / "suites"), help="directory for heldout_*.jsonl")
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    parser.add_argument("--per-tier", type=int, default=50, help="facts per tier (0: every test-side fact)")
    parser.add_argument("--build", help="an organism build's directory (`hguard organism build --out`): its world "
                                        "and exposures; writes to its suites/ unless --out is given")
    parser.add_argument("--split-seed", type=int, help="seed of the probe's split (default: the shipped probe's; "
                                                       "0 with --build, identify's default)")
    args = parser.parse_args(argv)
    if args.build:
        out = args.out if args.out != parser.get_default("out") else str(Path(args.build) / "suites")
        if args.check:
            parser.error("--check compares with the shipped files; it does not take --build")
        suites = build(split_seed=args.split_seed or 0, per_tier=args.per_tier, directory=args.build)
        print(json.dumps(write_suites(suites, out)))
        return 0
    world = json.loads((SHIPPED / "world.json").read_text())["config"]["seed"]
    from hguard.organism import load
    from hguard.registry import find_probe

    split = args.split_seed if args.split_seed is not None else int(find_probe(load("instruct")[0]).training.get("seed", 0))
    suites = build(world, split, per_tier=args.per_tier)
    if args.check:
        same = all((SHIPPED / "suites" / f"{n}.jsonl").read_text().splitlines()
                   == [json.dumps(i, sort_keys=True) for i in items] for n, items in suites.items())
        print(json.dumps({"same_as_shipped": same, "counts": {n: len(i) for n, i in suites.items()}}))
        return 0 if same else 1
    print(json.dumps(write_suites(suites, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
