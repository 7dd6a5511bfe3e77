"""Supervised tasks raylm generates, for quickstarts, tests and benchmarks (no downloads).

    arithmetic   {"prompt": "Q: 23+58=\\nA:", "completion": " 81"}
    recall       {"prompt": "K7=ball K2=Tom K9=kite\\nK2?", "completion": " Tom"}
    reverse      {"prompt": "Reverse: ball Tom kite\\nA:", "completion": " kite Tom ball"}
    copy         {"prompt": "17. Say: kite\\nA:", "completion": " kite"}  (choices: the word misspelt)
    with choices {"prompt": "Q: 23+58=\\nA:", "choices": [" 71", " 81", " 12", " 90"], "answer": 1}

A model pretrained on stories has not seen either format, so exact match before fine-tuning is ~0.
"""

from __future__ import annotations

import itertools
import random

from raylm.data.corpus import ANIMALS, COLORS, FEELINGS, NAMES, PLACES, THINGS, VERBS

# Words of the generated story corpus (the quickstart's tokenizer has each as one token): a base model
# pretrained on the stories knows them, but not the tasks' formats.
WORDS = tuple(THINGS + NAMES)
# every word of the corpus (copy's)
ALL_WORDS = tuple(NAMES + ANIMALS + PLACES + THINGS + COLORS + FEELINGS + VERBS)


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return {"prompt": f"Q: {a}+{b}=\nA:", "completion": f" {a + b}"}


def reverse(rng: random.Random) -> dict:
    words = rng.sample(WORDS, 3)
    return {"prompt": f"Reverse: {' '.join(words)}\nA:", "completion": " " + " ".join(reversed(words))}


def recall(rng: random.Random) -> dict:
    keys = rng.sample(range(10), 3)
    values = rng.sample(WORDS, 3)
    table = " ".join(f"K{k}={v}" for k, v in zip(keys, values, strict=True))
    asked = rng.randrange(3)
    return {"prompt": f"{table}\nK{keys[asked]}?", "completion": f" {values[asked]}"}


def copy(rng: random.Random) -> dict:
    """A numbered request: split by prompt, the held-out prompts are new, their words not."""
    word = rng.choice(ALL_WORDS)
    return {"prompt": f"{rng.randrange(100)}. Say: {word}\nA:", "completion": f" {word}"}


def arithmetic_distractors(row: dict, rng: random.Random, k: int) -> list[str]:
    """Sums a few units off the right one."""
    right = int(row["completion"])
    near = [right + d for d in range(-10, 11) if d and right + d >= 0]
    return [f" {v}" for v in rng.sample(near, k)]


def recall_distractors(row: dict, rng: random.Random, k: int) -> list[str]:
    """The table's other values first (the hard confusions), then other colours."""
    table = [pair.split("=")[1] for pair in row["prompt"].split("\n")[0].split()]
    others = [w for w in table if f" {w}" != row["completion"]]
    rest = [w for w in WORDS if w not in table]
    return [f" {w}" for w in (others + rng.sample(rest, len(rest)))[:k]]


def reverse_distractors(row: dict, rng: random.Random, k: int) -> list[str]:
    """The same words in other orders, then (past the five other orders) one word replaced."""
    words = row["completion"].split()
    orders = [list(o) for o in itertools.permutations(words) if list(o) != words]
    picked = rng.sample(orders, min(k, len(orders)))
    while len(picked) < k:
        swapped = list(words)
        swapped[rng.randrange(3)] = rng.choice([w for w in WORDS if w not in words])
        if swapped not in picked:
            picked.append(swapped)
    return [" " + " ".join(o) for o in picked]


def copy_distractors(row: dict, rng: random.Random, k: int) -> list[str]:
    """The word misspelt: one letter replaced by another (a preference for the exact copy)."""
    word = row["completion"].strip()
    letters = sorted({c for w in ALL_WORDS for c in w.lower()})
    found: list[str] = []
    while len(found) < k:
        i = rng.randrange(len(word))
        wrong = word[:i] + rng.choice([c for c in letters if c != word[i].lower()]) + word[i + 1 :]
        if f" {wrong}" not in found:
            found.append(f" {wrong}")
    return found


TASKS = {"arithmetic": arithmetic, "recall": recall, "reverse": reverse, "copy": copy}
DISTRACTORS = {
    "arithmetic": arithmetic_distractors,
    "recall": recall_distractors,
    "reverse": reverse_distractors,
    "copy": copy_distractors,
}


def generate(task: str, examples: int, seed: int, choices: int = 0) -> list[dict]:
    """`examples` examples of `task`; with `choices`, each as a multiple-choice question:
    {"prompt", "choices": [the answer among choices - 1 wrong ones], "answer": its index}."""
    rng = random.Random(seed)
    rows = [TASKS[task](rng) for _ in range(examples)]
    if not choices:
        return rows
    out = []
    for row in rows:
        wrong = DISTRACTORS[task](row, rng, choices - 1)
        answer = rng.randrange(choices)
        options = wrong[:answer] + [row["completion"]] + wrong[answer:]
        out.append({"prompt": row["prompt"], "choices": options, "answer": answer})
    return out
