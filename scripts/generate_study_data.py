"""Regenerates the study data in tam_hf/assets/study: `python scripts/generate_study_data.py` (byte-identical
on every run). This module is task A (templated sentiment); tasks B, C and D are in study_pairs.py,
study_rules.py and study_shift.py beside it, and docs/study/TASKS.md describes all four.

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

import importlib.util
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


# The other study tasks, one standalone module each (stdlib only), beside this script.
TASK_MODULES = ("study_pairs", "study_rules", "study_shift")


def task_module(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate() -> dict[str, list[dict]]:
    """Task A, the templated sentiment set."""
    rng = random.Random(SEED)
    train = rows(N_TRAIN, rng)
    evaluation = rows(N_EVAL, rng, exclude={r["text"] for r in train})
    return {"sentiment_train.jsonl": train, "sentiment_eval.jsonl": evaluation}


def all_files() -> dict[str, str]:
    """Every study file's name under tam_hf/assets/study -> its exact text (one JSON object a line)."""
    files = dict(generate())
    for name in TASK_MODULES:
        files.update(task_module(name).generate())
    return {name: "".join(json.dumps(r) + "\n" for r in data) for name, data in files.items()}


def main() -> None:
    for name, text in all_files().items():
        (HERE / name).write_text(text)
        print(f"wrote {text.count(chr(10))} rows to {HERE / name}")


if __name__ == "__main__":
    main()
