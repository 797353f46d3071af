"""Study task C: follow a made-up rule on a list of words (causal LM, format prompt_completion). Written by
`python scripts/generate_study_data.py` to tam_hf/assets/study/rules_{train,eval}.jsonl.

Provenance and licence: every row is produced by the code below from a fixed seed (random.Random(SEED)); no
external text is used. Released with tam_hf under Apache-2.0.

A row: prompt "Apply zorp then flim to: fox red plum owl\\nResult:", completion " owl plum red fox" (TRL appends the
end token; the loss is on the completion only). Each invented operation name stands for a list
operation (reverse, rotate left or right, swap the ends, sort, drop the first word), one or two of them in
order. Why it needs learning and composition: the names are nonsense words, so the pretrained model cannot know
them and must infer each operation from the examples; two-operation rules need the operations composed in the
stated order (flim then mip is the identity, mip then zorp is not). The eval prompts are held out (no eval
prompt appears in training), so eval loss on the completion measures the rule learned, not rows memorised. Rows
are short (~20 SmolLM2 tokens, the answer 4-6 of them) so that a LoRA step on CPU stays near a second.
"""

from __future__ import annotations

import random

SEED = 20250211
N_TRAIN, N_EVAL = 800, 100

WORDS = ["cat", "dog", "fox", "owl", "cow", "pig", "hen", "bee", "red", "blue", "green", "pink", "gold", "gray",
         "apple", "pear", "plum", "lime", "milk", "salt", "sand", "rock", "moon", "star"]

# Invented name -> what it does to the list of words.
OPERATIONS = {
    "zorp": lambda w: w[::-1],              # reverse
    "flim": lambda w: w[1:] + w[:1],        # rotate left: the first word goes to the end
    "mip": lambda w: w[-1:] + w[:-1],       # rotate right: the last word comes first
    "blick": lambda w: w[-1:] + w[1:-1] + w[:1],  # swap the first and the last word
    "trell": sorted,                        # alphabetical order
    "quax": lambda w: w[1:],                # drop the first word
}


def row(rng) -> dict:
    words = rng.sample(WORDS, rng.choice((4, 5, 6)))
    names = rng.sample(list(OPERATIONS), 2) if rng.random() < 0.7 else [rng.choice(list(OPERATIONS))]
    result = list(words)
    for name in names:
        result = list(OPERATIONS[name](result))
    return {"prompt": f"Apply {' then '.join(names)} to: {' '.join(words)}\nResult:",
            "completion": " " + " ".join(result)}


def rows(n: int, rng: random.Random, exclude: frozenset = frozenset()) -> list[dict]:
    out, seen = [], set(exclude)
    while len(out) < n:
        r = row(rng)
        if r["prompt"] in seen:  # no duplicate prompts, and no eval prompt seen in training
            continue
        seen.add(r["prompt"])
        out.append(r)
    return out


def generate() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    train = rows(N_TRAIN, rng)
    evaluation = rows(N_EVAL, rng, exclude=frozenset(r["prompt"] for r in train))
    return {"rules_train.jsonl": train, "rules_eval.jsonl": evaluation}
