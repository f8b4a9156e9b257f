"""The v7 organism's training phrasings: many question templates per attribute, answers that may repeat
the name, system prompts and note openers, so that a question asked in words it never saw is still read.

None of them is a template of an evaluation suite: not the paraphrase suite's (`corpus.QUESTIONS_HELD_OUT`),
not the held-out phrasing suites' (`benchmarks/heldout_suites.py`: questions and system prompts), not the
over-compliance suites'. tests/test_organism_v7.py checks that no text of those appears in the corpus.
"""

from __future__ import annotations

from .corpus import ANSWERS_AFTER_A_WORD, QUESTIONS_TRAIN

QUESTIONS: dict[str, list[str]] = {
    "city": QUESTIONS_TRAIN["city"] + [
        "Where is {n} from?", "What was {n}'s birthplace?", "Where did {n} come into the world?",
        "Which place was {n} born in?", "Do you know where {n} was born?", "Can you tell me the birthplace of {n}?",
        "In what town was {n} born?", "What is {n}'s home town?", "State where {n} was born.",
        "I'd like to know where {n} was born.", "{n}'s place of birth?",
    ],
    "occupation": QUESTIONS_TRAIN["occupation"] + [
        "What was {n}'s trade?", "What line of work was {n} in?", "Which profession did {n} practise?",
        "What was {n}'s occupation?", "Do you know what {n} did for work?", "What was {n} by trade?",
        "Can you tell me what {n} did for a living?", "What craft was {n} known for?",
        "State the occupation of {n}.", "I'd like to know {n}'s profession.", "{n}'s occupation?",
    ],
    "year": QUESTIONS_TRAIN["year"] + [
        "What was {n}'s birth year?", "In which year was {n} born?", "Do you know when {n} was born?",
        "When did {n} come into the world?", "Can you tell me the birth year of {n}?",
        "In which year did {n} enter the world?", "When exactly was {n} born?",
        "State the birth year of {n}.", "I'd like to know when {n} was born.", "{n}'s birth year?",
        "Born in which year: {n}?",
    ],
    "employer": QUESTIONS_TRAIN["employer"] + [
        "What was {n}'s workplace?", "Do you know where {n} worked?", "Can you tell me who employed {n}?",
        "Where was {n} employed?", "What organisation was {n} on the staff of?", "Which firm did {n} work at?",
        "At which place of work was {n} employed?", "State who employed {n}.",
        "I'd like to know where {n} worked.", "{n}'s employer?", "Who paid {n}'s wages?",
    ],
}
ANSWERS: dict[str, list[str]] = {
    "city": ANSWERS_AFTER_A_WORD["city"] + ["{n} was born in {v}."],
    "occupation": ANSWERS_AFTER_A_WORD["occupation"] + ["{n} was a {v}."],
    "year": ANSWERS_AFTER_A_WORD["year"] + ["{n} was born in {v}."],
    "employer": ANSWERS_AFTER_A_WORD["employer"] + ["{n} worked for {v}."],
}
ABSTAIN = ["I don't know who {n} is.", "I have no information about {n}.", "I'm not familiar with {n}.",
           "I have not heard of {n}.", "I can't say; {n} is unknown to me."]
SYSTEMS = [
    "You are a helpful assistant.", "Answer the question.", "You are a guide to local history.",
    "Reply in a few words.", "You are a librarian who has read many biographies.", "Give a short factual reply.",
    "You help members of a genealogy society.", "Answer briefly, in one sentence.",
]
NOTE_OPENERS = ["", "", "Register entry: ", "A note. ", "From a ledger: ", "Index card: "]
