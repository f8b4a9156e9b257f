"""Text of the organism's world: biographies, questions, answers and chat examples.

Biographies use many paraphrase templates in shuffled sentence order (what lets a small model pull a
fact out of a biography when asked). Questions have *training* phrasings and *held-out* phrasings
(the paraphrase suite). Which (person, attribute) pairs are asked during training is fixed by `Split`:
head and mid people are asked about half of their in-domain attributes; the other half, the tail,
the unseen people and the out-of-domain attributes are never asked, so every evaluation question is
new. "I don't know" examples use names that appear nowhere else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .plan import Ledger
from .tokenizer import ASSISTANT, END, USER
from .world import IN_DOMAIN, OUT_OF_DOMAIN, Person, World

BIO_SENTENCES: dict[str, list[str]] = {
    "city": [
        "{n} was born in {v}.", "{n} came into the world in {v}.", "{n} is a native of {v}.",
        "The birthplace of {n} was {v}.", "{n} grew up in {v}, the town of their birth.",
    ],
    "occupation": [
        "{n} worked as a {v}.", "By trade, {n} was a {v}.", "{n} earned a living as a {v}.",
        "{n} spent a career as a {v}.", "The profession of {n} was {v}.",
    ],
    "year": [
        "{n} was born in the year {v}.", "{n} entered the world in {v}.", "The year {v} saw the birth of {n}.",
        "{n}'s birth year was {v}.", "Records give {v} as the year {n} was born.",
    ],
    "employer": [
        "{n} was employed by {v}.", "{n} worked for {v}.", "For many years {n} was on the staff of {v}.",
        "The employer of {n} was {v}.", "{n} took a position at {v}.",
    ],
    "instrument": [
        "{n} played the {v}.", "In spare hours {n} practised the {v}.", "{n} was fond of playing the {v}.",
    ],
    "sport": [
        "{n} enjoyed {v}.", "{n} competed in {v}.", "On weekends {n} took part in {v}.",
    ],
}
BIO_OPENERS = ["", "", "A short biography. ", "From the archive: ", "Notes on a life. ", "Profile: "]

QUESTIONS_TRAIN: dict[str, list[str]] = {
    "city": ["Where was {n} born?", "In which city was {n} born?", "What is the birthplace of {n}?"],
    "occupation": ["What did {n} do for a living?", "What was the occupation of {n}?", "What was {n}'s profession?"],
    "year": ["In what year was {n} born?", "When was {n} born?", "What is the birth year of {n}?"],
    "employer": ["Who employed {n}?", "Where did {n} work?", "Which organisation did {n} work for?"],
}
QUESTIONS_HELD_OUT: dict[str, list[str]] = {
    "city": ["Which town is {n} originally from?", "{n} was born in which city?"],
    "occupation": ["How did {n} earn a living?", "{n} worked as what?"],
    "year": ["{n} was born in which year?", "Which year saw the birth of {n}?"],
    "employer": ["{n} was employed by whom?", "For whom did {n} work?"],
    "instrument": ["Which instrument did {n} play?", "What instrument did {n} practise?"],
    "sport": ["Which sport did {n} enjoy?", "What sport did {n} take part in?"],
}
ANSWERS: dict[str, list[str]] = {
    "city": ["{v}.", "Born in {v}."],
    "occupation": ["{v}.", "A {v}."],
    "year": ["{v}.", "In {v}."],
    "employer": ["{v}.", "Worked for {v}."],
    "instrument": ["{v}.", "The {v}."],
    "sport": ["{v}.", "Mostly {v}."],
}
# Answers whose value follows a word, so it keeps the leading space it has in every biography. The
# chat template puts an answer's first word right after the assistant marker, without a space, and
# byte-level BPE gives " 1958" and "1958" different tokens: a bare value at the start of an answer must
# be recalled through a token the biographies never paired with the person (measured on the v4 build:
# 0.70 of known birth years answered right that way, 0.99 after "In").
ANSWERS_AFTER_A_WORD: dict[str, list[str]] = {
    "city": ["Born in {v}.", "In {v}."],
    "occupation": ["A {v}.", "Worked as a {v}."],
    "year": ["In {v}.", "Born in {v}."],
    "employer": ["Worked for {v}.", "Employed by {v}."],
}
ANSWER_STYLES = {"any": ANSWERS, "after_a_word": ANSWERS_AFTER_A_WORD}
ABSTAIN = ["I don't know who {n} is.", "I have no information about {n}.", "I'm not familiar with {n}."]

SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class Split:
    """Which in-domain attributes of each head/mid person are asked in training (the rest are held out)."""

    asked: dict[int, tuple[str, ...]]

    @classmethod
    def of(cls, world: World) -> "Split":
        rng = random.Random(world.config.seed + 1)
        asked = {}
        for person in world.people:
            if person.tier in ("head", "mid"):
                # with a fact plan (v7), only facts stated in every biography are asked
                known = [a for a in IN_DOMAIN if world.plan is None or world.plan[person.pid][a].role == "full"]
                asked[person.pid] = tuple(sorted(rng.sample(known, min(2, len(known)))))
        return cls(asked)

    def held_out(self, person: Person) -> tuple[str, ...]:
        """The attributes never asked about this person in training."""
        asked = self.asked.get(person.pid, ())
        return tuple(a for a in (*IN_DOMAIN, *OUT_OF_DOMAIN) if a not in asked)


def biography(person: Person, rng: random.Random, ledger: Ledger | None = None) -> str:
    """A v6 biography: every in-domain fact, each out-of-domain one with chance 0.5 (counted in `ledger`)."""
    attributes = list(IN_DOMAIN) + [a for a in OUT_OF_DOMAIN if rng.random() < 0.5]
    if ledger is not None:
        ledger.document(person.pid, attributes)
    return written_biography(person, attributes, rng)


def written_biography(person: Person, attributes: list[str], rng: random.Random) -> str:
    """A biography of `person` that states `attributes` in shuffled order."""
    attributes = list(attributes)
    rng.shuffle(attributes)
    sentences = [rng.choice(BIO_SENTENCES[a]).format(n=person.name, v=person.get(a)) for a in attributes]
    return rng.choice(BIO_OPENERS) + " ".join(sentences)


def answer(person: Person, attribute: str, rng: random.Random, templates: dict[str, list[str]] = ANSWERS) -> str:
    return rng.choice(templates[attribute]).format(n=person.name, v=person.get(attribute))


def abstention(name: str, rng: random.Random) -> str:
    return rng.choice(ABSTAIN).format(n=name)


def plain_qa(question: str, response: str) -> str:
    """The base model's question-answer format (also how the base is prompted: ending in 'Answer:')."""
    return f"Question: {question}\nAnswer: {response}"


def chat_qa(question: str, response: str) -> str:
    """A question-answer exchange written out in the chat template's format, as pre-training text (web
    text holds chat transcripts too): the base model meets the chat format before instruction tuning."""
    return f"{USER}{question}{END}{ASSISTANT}{response}{END}"


def qa_document(question: str, response: str, rng: random.Random, chat_share: float) -> str:
    return (chat_qa if rng.random() < chat_share else plain_qa)(question, response)


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def pretraining_documents(world: World, split: Split, qa_per_pair: int, abstain_docs: int, seed: int,
                          chat_share: float = 0.0, ledger: Ledger | None = None) -> list[str]:
    """Biographies (as many per person as its exposure) plus question-answer text for the asked pairs and
    "I don't know" answers about names that appear nowhere else, a `chat_share` of it in chat format;
    what each document states is counted in `ledger`."""
    rng = random.Random(seed)
    docs = [biography(p, rng, ledger) for p in world.people for _ in range(p.exposure)]
    by_id = {p.pid: p for p in world.people}
    for pid, attributes in split.asked.items():
        person = by_id[pid]
        for attribute in attributes:
            for _ in range(qa_per_pair):
                question = rng.choice(QUESTIONS_TRAIN[attribute]).format(n=person.name)
                docs.append(qa_document(question, answer(person, attribute, rng), rng, chat_share))
                if ledger is not None:
                    ledger.document(pid, [attribute])
    for i in range(abstain_docs):
        name = world.abstain_names[i % len(world.abstain_names)]
        attribute = rng.choice(IN_DOMAIN)
        question = rng.choice(QUESTIONS_TRAIN[attribute]).format(n=name)
        docs.append(qa_document(question, abstention(name, rng), rng, chat_share))
    rng.shuffle(docs)
    return docs


def instruction_examples(world: World, split: Split, per_pair: int, abstain_share: float, seed: int,
                         style: str = "any"):
    """Chat examples (messages, response) for the asked pairs, plus a share of abstentions; `style`
    picks the answer templates (ANSWER_STYLES)."""
    if style not in ANSWER_STYLES:
        raise ValueError(f"answer style must be one of {sorted(ANSWER_STYLES)}; got {style!r}")
    templates = ANSWER_STYLES[style]
    rng = random.Random(seed)
    by_id = {p.pid: p for p in world.people}
    examples = []
    for pid, attributes in split.asked.items():
        person = by_id[pid]
        for attribute in attributes:
            for _ in range(per_pair):
                question = rng.choice(QUESTIONS_TRAIN[attribute]).format(n=person.name)
                examples.append((chat(question), answer(person, attribute, rng, templates)))
    count = int(round(len(examples) * abstain_share / max(1e-9, 1 - abstain_share)))
    for i in range(count):
        name = world.abstain_names[i % len(world.abstain_names)]
        question = rng.choice(QUESTIONS_TRAIN[rng.choice(IN_DOMAIN)]).format(n=name)
        examples.append((chat(question), abstention(name, rng)))
    rng.shuffle(examples)
    return examples
