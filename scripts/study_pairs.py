"""Study task B: 3-way entailment over generated comparisons (sentence pairs: text = premise, text_pair =
hypothesis; labels entailment / contradiction / neutral). Written by `python scripts/generate_study_data.py`
to tam_hf/assets/study/entailment_{train,eval}.jsonl.

Provenance and licence: every row is produced by the code below from a fixed seed (random.Random(SEED)); no
external text is used. Released with tam_hf under Apache-2.0.

Why it needs composition: a premise states one or two strict comparisons among three people ("Anna is taller
than Ben. Carl is shorter than Ben."), shuffled, each phrased with the relation or its converse, and
sometimes with a sentence about another relation (older, heavier, ...) that says nothing about the hypothesis'
relation. The label of "Carl is shorter than Anna" needs the chain Anna > Ben > Carl (transitivity), the converse
(shorter = reversed taller) and, for "Carl is not taller than Anna", negation. Neutral pairs are the ones the
premise leaves unordered (two people below a third; a comparison stated for another relation only). The same
words appear under every label, so no single word, name or relation decides a row: a pretrained encoder cannot
solve it from lexical cues in a few steps. Labels are exact; the classes are balanced exactly (the labels cycle,
a hypothesis is drawn for each, and the rows are shuffled).
"""

from __future__ import annotations

import random

SEED = 20250107
N_TRAIN, N_EVAL = 2000, 400
LABELS = ("entailment", "contradiction", "neutral")

NAMES = ["Anna", "Ben", "Carl", "Dana", "Emma", "Frank", "Grace", "Hugo", "Jack", "Kate", "Leo", "Mia", "Nora",
         "Omar", "Paul", "Rosa", "Sam", "Tom", "Vera", "Zoe"]
# relation: (word for "higher", word for "lower")
RELATIONS = {"height": ("taller", "shorter"), "age": ("older", "younger"), "weight": ("heavier", "lighter"),
             "speed": ("faster", "slower")}


def _say(high: str, low: str, relation: str, rng) -> str:
    """A true statement 'high > low' on relation, with the relation's word or its converse."""
    up, down = RELATIONS[relation]
    return f"{high} is {up} than {low}." if rng.random() < 0.5 else f"{low} is {down} than {high}."


def _closure(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    known = set(edges)
    while True:
        more = {(a, d) for a, b in known for c, d in known if b == c} - known
        if not more:
            return known
        known |= more


def _premise(rng):
    """(sentences, relation asked about, order known on it, people): a random partial order of three people."""
    people = rng.sample(NAMES, 3)  # position in the list = rank, first is highest
    relation = rng.choice(list(RELATIONS))
    pairs = [(a, b) for i, a in enumerate(people) for b in people[i + 1:]]
    # One comparison leaves the third person unordered (an easy neutral: a name the premise may not mention);
    # two make a chain (transitivity) or a fork (its two lower or upper ends unordered). A list: a set's order
    # would vary between processes.
    edges = rng.sample(pairs, 1 if rng.random() < 0.3 else 2)
    sentences = [_say(a, b, relation, rng) for a, b in edges]
    if rng.random() < 0.2:  # a distractor about another relation: it orders nobody on `relation`
        other = rng.choice([r for r in RELATIONS if r != relation])
        a, b = rng.sample(people, 2)
        sentences.append(_say(a, b, other, rng))
    rng.shuffle(sentences)
    return sentences, relation, _closure(set(edges)), people


def _hypothesis(x: str, y: str, relation: str, holds: bool, rng) -> str:
    """A sentence that is true iff (x > y) == holds, for an ordered pair (entailment/contradiction), or any
    claim about x and y for an unordered pair."""
    up, down = RELATIONS[relation]
    form = rng.random()
    if holds:
        if form < 0.4:
            return f"{x} is {up} than {y}."
        if form < 0.8:
            return f"{y} is {down} than {x}."
        return f"{y} is not {up} than {x}."
    if form < 0.4:
        return f"{y} is {up} than {x}."
    if form < 0.8:
        return f"{x} is {down} than {y}."
    return f"{x} is not {up} than {y}."


def row(rng, label: str) -> dict:
    while True:
        sentences, relation, order, people = _premise(rng)
        unordered = [(a, b) for i, a in enumerate(people) for b in people[i + 1:]
                     if (a, b) not in order and (b, a) not in order]
        if label != "neutral":
            x, y = rng.choice(sorted(order))
            text = _hypothesis(x, y, relation, label == "entailment", rng)
            break
        if unordered:
            x, y = rng.sample(rng.choice(unordered), 2)
            text = _hypothesis(x, y, relation, rng.random() < 0.5, rng)
            break
    return {"text": " ".join(sentences), "text_pair": text, "label": label}


def rows(n: int, rng: random.Random, exclude: frozenset = frozenset()) -> list[dict]:
    out, seen = [], set(exclude)
    while len(out) < n:
        r = row(rng, LABELS[len(out) % len(LABELS)])  # exact balance; the order is shuffled below
        key = (r["text"], r["text_pair"])
        if key in seen:  # no duplicates, and no eval pair that also appears in training
            continue
        seen.add(key)
        out.append(r)
    rng.shuffle(out)
    return out


def generate() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    train = rows(N_TRAIN, rng)
    evaluation = rows(N_EVAL, rng, exclude=frozenset((r["text"], r["text_pair"]) for r in train))
    return {"entailment_train.jsonl": train, "entailment_eval.jsonl": evaluation}
