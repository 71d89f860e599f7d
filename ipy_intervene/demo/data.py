"""Synthetic training and evaluation data for the embedded demo model.

Three tasks, each with a real mechanism to find:

- **IOI** (indirect object identification): ``"When Mary and John went to the store ,
  John gave a drink to"`` -> ``"Mary"``. Some name pairs are held out of training, so the
  evaluation measures a general mechanism, not memorised pairs.
- **Factual recall** of made-up facts with multi-token subjects:
  ``"The Zorvath Tower is in the city of"`` -> ``"Paris"``.
- **Induction**: a random word sequence repeated once; the second half is predictable.

Everything is word-level and deterministic given a seed:

>>> ioi_prompt("When {A} and {B} went to the {place} , {S} gave {obj} to",
...            "Mary", "John", s="John", place="store", obj="a drink")
'When Mary and John went to the store , John gave a drink to'
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

NAMES = (
    "Mary John Tom James Dan Sid Martin Amy Alice Bob Kate Paul Anna Mark Lisa Peter "
    "Sarah David Emma Jack Lucy Mike Rose Sam Nina Carl Eva Leo Ruth Ben Jane Adam "
    "Grace Hugo Ivy Kyle Lena Noah Olga Ray"
).split()

PLACES = "store park school office garden market station beach hospital restaurant".split()
OBJECTS = (
    "a drink", "the bag", "an apple", "a bottle of milk", "the ball", "a book",
    "a letter", "a flower", "the ring", "a snack",
)
IOI_TEMPLATES = (
    "When {A} and {B} went to the {place} , {S} gave {obj} to",
    "After {A} and {B} went to the {place} , {S} gave {obj} to",
    "While {A} and {B} were working at the {place} , {S} gave {obj} to",
    "Then , {A} and {B} had a long argument , and afterwards {S} said to",
    "When {A} and {B} got {obj} at the {place} , {S} decided to give it to",
    "Friends {A} and {B} found {obj} at the {place} . {S} gave it to",
)

CITIES = "Paris London Rome Tokyo Cairo Berlin Madrid Lima Oslo Delhi Sydney Toronto".split()
LANDMARKS = "Tower Bridge Museum Palace Temple Gate Library Fountain".split()
FACT_TEMPLATES = (
    "The {subject} is in the city of",
    "The {subject} can be found in the city of",
    "Tourists visit the {subject} in the city of",
)
_SYLLABLES = "zor vath kel mir dun bra sol tav quen rix lom pel gar thu nev osk".split()

N_FACTS = 60
N_HELD_OUT_PAIRS = 60
SHOWCASE_PAIR = ("John", "Mary")  # the pair of DESIGN.md's example; always trained


@dataclass(frozen=True)
class Fact:
    """A made-up fact: ``subject`` (two or three words) is in ``city``."""

    subject: str
    city: str


def ioi_prompt(template: str, a: str, b: str, *, s: str, place: str, obj: str) -> str:
    """Fill an IOI template; ``s`` is the repeated subject, one of ``a`` and ``b``."""
    return template.format(A=a, B=b, S=s, place=place, obj=obj)


def name_pairs(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """All unordered name pairs, split into (train, held_out) with a fixed seed."""
    pairs = [tuple(sorted(p)) for p in itertools.combinations(NAMES, 2)]
    showcase = tuple(sorted(SHOWCASE_PAIR))
    candidates = [p for p in pairs if p != showcase]
    held_out = set(random.Random(seed).sample(candidates, N_HELD_OUT_PAIRS))
    train = [p for p in pairs if p not in held_out]
    return train, sorted(held_out)


def make_facts(seed: int = 0) -> list[Fact]:
    """``N_FACTS`` facts with unique made-up multi-token subjects."""
    rng = random.Random(seed)
    subjects: set[str] = set()
    facts = []
    while len(facts) < N_FACTS:
        n_words = rng.choice((1, 2))
        words = [_made_up_word(rng) for _ in range(n_words)]
        subject = " ".join(words + [rng.choice(LANDMARKS)])
        if subject in subjects:
            continue
        subjects.add(subject)
        facts.append(Fact(subject, rng.choice(CITIES)))
    return facts


def _made_up_word(rng: random.Random) -> str:
    return "".join(rng.sample(_SYLLABLES, 2)).capitalize()


def ioi_example(rng: random.Random, pairs: list[tuple[str, str]]) -> tuple[str, str]:
    """A random IOI (prompt, answer) from the given name pairs."""
    a, b = rng.choice(pairs)
    if rng.random() < 0.5:
        a, b = b, a
    s, io = (a, b) if rng.random() < 0.5 else (b, a)
    prompt = ioi_prompt(rng.choice(IOI_TEMPLATES), a, b, s=s,
                        place=rng.choice(PLACES), obj=rng.choice(OBJECTS))
    return prompt, io


def fact_example(rng: random.Random, facts: list[Fact]) -> tuple[str, str]:
    """A random factual-recall (prompt, answer)."""
    fact = rng.choice(facts)
    return rng.choice(FACT_TEMPLATES).format(subject=fact.subject), fact.city


def induction_example(rng: random.Random, words: list[str], length: int | None = None) -> str:
    """A random word sequence repeated once: ``"x1 .. xk x1 .. xk"``."""
    k = length or rng.randint(4, 12)
    seq = rng.sample(words, k)
    return " ".join(seq + seq)


def vocabulary(seed: int = 0) -> list[str]:
    """Every word the three tasks use, in a stable order."""
    words: list[str] = []
    texts = list(IOI_TEMPLATES) + list(FACT_TEMPLATES) + list(OBJECTS)
    texts += NAMES + PLACES + CITIES + LANDMARKS + [f.subject for f in make_facts(seed)] + ["."]
    for text in texts:
        for word in text.replace("{", " {").split():
            if not word.startswith("{") and word not in words:
                words.append(word)
    return words


def training_text(rng: random.Random, pairs: list[tuple[str, str]], facts: list[Fact],
                  words: list[str]) -> str:
    """One training document: 45% IOI, 25% facts, 30% induction."""
    r = rng.random()
    if r < 0.45:
        prompt, answer = ioi_example(rng, pairs)
        return f"{prompt} {answer} ."
    if r < 0.70:
        prompt, answer = fact_example(rng, facts)
        return f"{prompt} {answer} ."
    return induction_example(rng, words)
