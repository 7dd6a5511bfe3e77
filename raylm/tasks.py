"""Supervised tasks raylm generates, for quickstarts, tests and benchmarks (no downloads).

    arithmetic   {"prompt": "Q: 23+58=\\nA:", "completion": " 81"}
    recall       {"prompt": "K7=red K2=blue K9=green\\nK2?", "completion": " blue"}

A model pretrained on stories has not seen either format, so exact match before fine-tuning is ~0.
"""

from __future__ import annotations

import random

WORDS = ("red", "blue", "green", "gold", "pink", "gray", "black", "white", "brown", "teal")


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return {"prompt": f"Q: {a}+{b}=\nA:", "completion": f" {a + b}"}


def recall(rng: random.Random) -> dict:
    keys = rng.sample(range(10), 3)
    values = rng.sample(WORDS, 3)
    table = " ".join(f"K{k}={v}" for k, v in zip(keys, values, strict=True))
    asked = rng.randrange(3)
    return {"prompt": f"{table}\nK{keys[asked]}?", "completion": f" {values[asked]}"}


TASKS = {"arithmetic": arithmetic, "recall": recall}


def generate(task: str, examples: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [TASKS[task](rng) for _ in range(examples)]
