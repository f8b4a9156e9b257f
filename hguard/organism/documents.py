"""The v7 organism's text: biographies and notes that follow the world's per-fact plan (plan.py), and
question-answer text in many phrasings (phrasing.py), with system prompts and earlier turns.

Pre-training: each person's biographies state the facts the plan gives them (a fact in `bios` of them,
chosen at random), a boosted fact is repeated in one-sentence notes, the facts asked in training get
question-answer documents (a share in chat format, some of those after a system prompt), and "I don't
know" answers are about names seen nowhere else. A `Ledger` counts what every document states.
Instruction tuning: chat examples for the asked facts and abstentions, some after a system prompt, some
after an earlier exchange about another asked fact (never a held-out one).
"""

from __future__ import annotations

import random

from .corpus import ANSWERS, BIO_SENTENCES, Split, plain_qa, written_biography
from .phrasing import ABSTAIN, ANSWERS as CHAT_ANSWERS, NOTE_OPENERS, QUESTIONS, SYSTEMS
from .plan import IN_DOMAIN, Ledger
from .tokenizer import ASSISTANT, END
from .world import Person, World


def respond(person: Person, attribute: str, rng: random.Random, templates: dict[str, list[str]]) -> str:
    return rng.choice(templates[attribute]).format(n=person.name, v=person.get(attribute))


def ask(name: str, attribute: str, rng: random.Random) -> str:
    return rng.choice(QUESTIONS[attribute]).format(n=name)


def chat_text(messages: list[dict[str, str]], response: str) -> str:
    """A chat written out as the chat template writes it, ending in the assistant's `response`."""
    return "".join(f"<|{m['role']}|>{m['content']}{END}" for m in messages) + f"{ASSISTANT}{response}{END}"


def biographies(person: Person, world: World, rng: random.Random) -> list[list[str]]:
    """The attributes each of the person's biographies states, as the plan sets them."""
    stated: list[list[str]] = [[] for _ in range(person.exposure)]
    for attribute, fact in world.plan[person.pid].items():
        for index in rng.sample(range(person.exposure), fact.bios):
            stated[index].append(attribute)
    if any(not attributes for attributes in stated):
        raise ValueError(f"a biography of {person.name} would state nothing; plan {world.plan[person.pid]}")
    return stated


def note(person: Person, attribute: str, rng: random.Random) -> str:
    return rng.choice(NOTE_OPENERS) + rng.choice(BIO_SENTENCES[attribute]).format(n=person.name, v=person.get(attribute))


def pretraining_documents(world: World, split: Split, qa_per_pair: int, abstain_docs: int, seed: int,
                          chat_share: float, system_share: float, ledger: Ledger | None = None) -> list[str]:
    """Biographies and notes by the plan, question-answer text for the asked facts, abstentions."""
    if world.plan is None:
        raise ValueError("v7 documents need a world with a per-fact plan (WorldConfig(exposure='fact'))")
    ledger = ledger if ledger is not None else Ledger()
    rng = random.Random(seed)
    docs = []
    for person in world.people:
        for attributes in biographies(person, world, rng):
            docs.append(written_biography(person, attributes, rng))
            ledger.document(person.pid, attributes)
        for attribute, fact in world.plan[person.pid].items():
            for _ in range(fact.notes):
                docs.append(note(person, attribute, rng))
                ledger.document(person.pid, [attribute])

    def qa(question: str, response: str) -> str:
        if rng.random() >= chat_share:
            return plain_qa(question, response)
        system = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < system_share else []
        return chat_text(system + [{"role": "user", "content": question}], response)

    by_id = {p.pid: p for p in world.people}
    for pid, attributes in split.asked.items():
        person = by_id[pid]
        for attribute in attributes:
            for _ in range(qa_per_pair):
                templates = ANSWERS if rng.random() < 0.5 else CHAT_ANSWERS
                docs.append(qa(ask(person.name, attribute, rng), respond(person, attribute, rng, templates)))
                ledger.document(pid, [attribute])
    for i in range(abstain_docs):
        name = world.abstain_names[i % len(world.abstain_names)]
        docs.append(qa(ask(name, rng.choice(IN_DOMAIN), rng), rng.choice(ABSTAIN).format(n=name)))
    rng.shuffle(docs)
    return docs


def instruction_examples(world: World, split: Split, per_pair: int, abstain_share: float, seed: int,
                         system_share: float, history_share: float):
    """Chat examples (messages, response) for the asked facts plus a share of abstentions; a
    `system_share` of them after a system prompt, a `history_share` after an earlier exchange."""
    rng = random.Random(seed)
    by_id = {p.pid: p for p in world.people}
    asked = [(by_id[pid], attribute) for pid, attributes in split.asked.items() for attribute in attributes]

    def context(person_name: str) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < system_share else []
        if rng.random() < history_share:
            other, attribute = rng.choice(asked)
            while other.name == person_name:
                other, attribute = rng.choice(asked)
            turns += [{"role": "user", "content": ask(other.name, attribute, rng)},
                      {"role": "assistant", "content": respond(other, attribute, rng, CHAT_ANSWERS)}]
        return turns

    examples = []
    for person, attribute in asked:
        for _ in range(per_pair):
            messages = context(person.name) + [{"role": "user", "content": ask(person.name, attribute, rng)}]
            examples.append((messages, respond(person, attribute, rng, CHAT_ANSWERS)))
    count = int(round(len(examples) * abstain_share / max(1e-9, 1 - abstain_share)))
    for i in range(count):
        name = world.abstain_names[i % len(world.abstain_names)]
        messages = context(name) + [{"role": "user", "content": ask(name, rng.choice(IN_DOMAIN), rng)}]
        examples.append((messages, rng.choice(ABSTAIN).format(n=name)))
    rng.shuffle(examples)
    return examples
