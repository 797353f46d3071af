"""Study task D: the same sentiment labels over three domains in sequence (movies -> restaurants -> gadgets), a
distribution-shift / continual fine-tuning task (format classification). Written by
`python scripts/generate_study_data.py` to tam_hf/assets/study/shift_<domain>_{train,eval}.jsonl.

Provenance and licence: every review is produced by the templates below from a fixed seed
(random.Random(SEED)); no external text is used. Released with tam_hf under Apache-2.0.

What shifts: each domain has its own aspects and its own sentiment words, and a few words shared by all three
domains change polarity with the domain ("unpredictable" praises a plot and faults a battery; "simple" faults a
script and praises a charger; "quiet" faults a soundtrack and praises a keyboard). So a model trained on the
next domain must learn new words and reverse some it knew: what it keeps of the earlier domains (forgetting,
backward transfer) is measurable on their eval sets. Why it needs composition: as in task A, a negation flips
a clause, in "X, but Y" / "although X, Y" the second clause decides, and in three-clause reviews the majority of
the (possibly negated) clauses decides. Labels are exact; each file is balanced exactly (the labels alternate,
the rows are shuffled).
"""

from __future__ import annotations

import random

SEED = 20250318
N_TRAIN, N_EVAL = 800, 160

# Words whose polarity depends on the domain: word -> {domain: positive?}.
SHIFTING = {
    "unpredictable": {"movies": True, "restaurants": False, "gadgets": False},
    "simple": {"movies": False, "restaurants": True, "gadgets": True},
    "quiet": {"movies": False, "restaurants": True, "gadgets": True},
    "heavy": {"movies": True, "restaurants": False, "gadgets": False},
    "cold": {"movies": False, "restaurants": False, "gadgets": True},
}

DOMAINS = {
    "movies": {
        "aspects": ["plot", "acting", "script", "soundtrack", "pacing", "ending", "cast", "dialogue", "camera work"],
        "positive": ["gripping", "moving", "witty", "stunning", "engaging", "clever", "touching", "riveting"],
        "negative": ["dull", "wooden", "clumsy", "tedious", "shallow", "corny", "forgettable", "overlong"],
    },
    "restaurants": {
        "aspects": ["soup", "service", "steak", "dessert", "bread", "coffee", "waiter", "pasta", "wine list"],
        "positive": ["tasty", "fresh", "tender", "crispy", "friendly", "generous", "juicy", "flavorful"],
        "negative": ["greasy", "stale", "soggy", "rude", "salty", "burnt", "overpriced", "watery"],
    },
    "gadgets": {
        "aspects": ["battery", "screen", "keyboard", "camera", "speaker", "charger", "case", "software", "hinge"],
        "positive": ["fast", "sturdy", "sharp", "responsive", "reliable", "bright", "durable", "snappy"],
        "negative": ["sluggish", "flimsy", "glitchy", "blurry", "noisy", "fragile", "laggy", "dim"],
    },
}


def _word(rng, domain: str, positive: bool) -> str:
    if rng.random() < 0.2:  # a domain-dependent word: its polarity here is what the domain says
        return rng.choice([w for w, by in SHIFTING.items() if by[domain] == positive])
    return rng.choice(DOMAINS[domain]["positive" if positive else "negative"])


def _clause(rng, domain: str, aspect: str, positive: bool) -> str:
    if rng.random() < 0.3:
        return f"the {aspect} was not {_word(rng, domain, not positive)}"
    return f"the {aspect} was {_word(rng, domain, positive)}"


def review(rng, domain: str, positive: bool) -> str:
    aspects = rng.sample(DOMAINS[domain]["aspects"], 3)
    kind = rng.random()
    if kind < 0.4:  # single clauses give the first steps a signal to start from
        text = _clause(rng, domain, aspects[0], positive)
    elif kind < 0.55:  # the clause after "but" decides
        text = f"{_clause(rng, domain, aspects[0], not positive)}, but {_clause(rng, domain, aspects[1], positive)}"
    elif kind < 0.7:  # the main clause decides
        text = (f"although {_clause(rng, domain, aspects[0], not positive)}, "
                f"{_clause(rng, domain, aspects[1], positive)}")
    else:  # three clauses, two or three with the label's polarity, in random order
        votes = [positive, positive, positive if rng.random() < 0.25 else not positive]
        rng.shuffle(votes)
        a, b, c = (_clause(rng, domain, x, v) for x, v in zip(aspects, votes))
        text = f"{a}, {b} and {c}"
    return f"{text[0].upper()}{text[1:]}."


def rows(domain: str, n: int, rng: random.Random, exclude: frozenset = frozenset()) -> list[dict]:
    out, seen = [], set(exclude)
    while len(out) < n:
        positive = len(out) % 2 == 0  # exact balance; the order is shuffled below
        text = review(rng, domain, positive)
        if text in seen:  # no duplicates, and no eval review that also appears in training
            continue
        seen.add(text)
        out.append({"text": text, "label": "positive" if positive else "negative"})
    rng.shuffle(out)
    return out


def generate() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    files = {}
    for domain in DOMAINS:
        train = rows(domain, N_TRAIN, rng)
        files[f"shift_{domain}_train.jsonl"] = train
        files[f"shift_{domain}_eval.jsonl"] = rows(domain, N_EVAL, rng, exclude=frozenset(r["text"] for r in train))
    return files
