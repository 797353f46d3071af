"""Regenerates the mini-study data in tam_hf/assets/study: `python scripts/generate_study_data.py`.

Provenance and licence: every sentence of sentiment_train.jsonl / sentiment_eval.jsonl is produced by the
templates below from a fixed seed (random.Random(20241225)); no external text is used. Released with tam_hf
under Apache-2.0.

Why templates with structure rather than "the film was good": a pretrained sentence encoder separates single
sentiment words almost at once, so every optimizer would reach 100% and the comparison would say nothing.
Most rows need composition: a negation flips the word's polarity; in "X, but Y" / "although X, Y" the second
clause decides; in three-clause reviews (each clause possibly negated) the majority of the clauses decides.
Labels are exact (no noise): errors come from the model, not the data. (A first version without the
three-clause reviews was solved to 100% eval accuracy in 40 steps by MiniLM and could not separate optimizers.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "tam_hf" / "assets" / "study"
SEED = 20241225
N_TRAIN, N_EVAL = 2000, 400

POSITIVE = ["good", "great", "excellent", "wonderful", "superb", "charming", "delightful", "brilliant",
            "engaging", "moving", "clever", "gripping", "beautiful", "solid", "fresh", "memorable"]
NEGATIVE = ["bad", "poor", "dull", "boring", "awful", "clumsy", "tedious", "weak", "bland", "messy",
            "lifeless", "shallow", "forgettable", "painful", "flat", "predictable"]
ASPECTS = ["plot", "acting", "script", "soundtrack", "pacing", "dialogue", "camera work", "ending", "cast",
           "direction", "editing", "humour", "set design", "story"]
INTENSIFIERS = ["", "", "really ", "quite ", "rather ", "truly ", "very "]


def _word(rng, positive: bool) -> str:
    return rng.choice(INTENSIFIERS) + rng.choice(POSITIVE if positive else NEGATIVE)


def _two_aspects(rng) -> tuple[str, str]:
    a, b = rng.sample(ASPECTS, 2)
    return a, b


# Each template: rng, label polarity (True = positive) -> sentence. The label is drawn first so the classes
# stay balanced whatever the template.
def _plain(rng, pos):
    return f"The {rng.choice(ASPECTS)} was {_word(rng, pos)}."


def _negated(rng, pos):
    return f"The {rng.choice(ASPECTS)} was not {_word(rng, not pos)}."


def _would_not_say(rng, pos):
    return f"I would not say the {rng.choice(ASPECTS)} was {_word(rng, not pos)}."


def _but(rng, pos):  # the clause after "but" decides
    a, b = _two_aspects(rng)
    return f"The {a} was {_word(rng, not pos)}, but the {b} was {_word(rng, pos)}."


def _although(rng, pos):  # the main clause decides
    a, b = _two_aspects(rng)
    return f"Although the {a} was {_word(rng, not pos)}, the {b} was {_word(rng, pos)}."


def _and(rng, pos):
    a, b = _two_aspects(rng)
    return f"The {a} was {_word(rng, pos)} and the {b} was {_word(rng, pos)}."


def _clause(rng, aspect: str, pos: bool) -> str:
    if rng.random() < 0.4:
        return f"the {aspect} was not {_word(rng, not pos)}"
    return f"the {aspect} was {_word(rng, pos)}"


def _majority(rng, pos):  # three clauses, two or three of them with the label's polarity, in random order
    aspects = rng.sample(ASPECTS, 3)
    votes = [pos, pos, pos if rng.random() < 0.25 else not pos]
    rng.shuffle(votes)
    a, b, c = (_clause(rng, x, v) for x, v in zip(aspects, votes))
    return f"{a[0].upper()}{a[1:]}, {b} and {c}."


def _negated_but(rng, pos):  # "not <pos word>, but <pos word>" is still positive overall
    a, b = _two_aspects(rng)
    return f"The {a} was not {_word(rng, pos)}, but the {b} was {_word(rng, pos)}."


# The majority template appears four times: it carries most of the difficulty.
TEMPLATES = [_plain, _negated, _would_not_say, _but, _although, _and, _negated_but] + [_majority] * 4


def rows(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[dict]:
    out, seen = [], set(exclude)
    while len(out) < n:
        positive = rng.random() < 0.5
        text = rng.choice(TEMPLATES)(rng, positive)
        if text in seen:  # no duplicates, and no eval sentence that also appears in training
            continue
        seen.add(text)
        out.append({"text": text, "label": "positive" if positive else "negative"})
    return out


def main() -> None:
    rng = random.Random(SEED)
    train = rows(N_TRAIN, rng)
    evaluation = rows(N_EVAL, rng, exclude={r["text"] for r in train})
    for name, data in (("sentiment_train.jsonl", train), ("sentiment_eval.jsonl", evaluation)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"wrote {len(data)} rows to {HERE / name}")


if __name__ == "__main__":
    main()
