"""A small corpus raylm writes itself, so the quickstart and tests need no downloads.

    python -c "from raylm.data.corpus import stories; print(stories(2)[0])"

Templated children's stories: a fixed vocabulary and regular grammar that a tiny model learns in a
few hundred steps, so a sample generation after the quickstart reads like the corpus.
"""

from __future__ import annotations

import random

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam"]
ANIMALS = ["cat", "dog", "bird", "fox", "bear", "rabbit", "duck", "frog"]
PLACES = ["park", "garden", "forest", "river", "house", "field", "beach", "hill"]
THINGS = ["ball", "kite", "box", "hat", "book", "cake", "boat", "flower"]
COLORS = ["red", "blue", "green", "yellow", "big", "small", "shiny", "soft"]
FEELINGS = ["happy", "sad", "tired", "excited", "scared", "proud"]
VERBS = ["play", "run", "jump", "sing", "dance", "read", "swim", "draw"]

OPENINGS = [
    "Once upon a time, there was a little {animal} named {name}.",
    "One day, {name} the {animal} went to the {place}.",
    "{name} was a {feeling} {animal} who lived near the {place}.",
]
MIDDLES = [
    "{name} liked to {verb} in the {place} every day.",
    "In the {place}, {name} found a {color} {thing}.",
    "{name} saw a {color} {thing} and wanted to {verb} with it.",
    "{friend} came to the {place} and asked {name} to {verb}.",
    "The {thing} was {color}, and {name} felt {feeling}.",
]
ENDINGS = [
    "They played together until the sun went down, and {name} was {feeling}.",
    "At the end of the day, {name} went home with the {color} {thing}.",
    "{name} and {friend} became best friends.",
    "From that day on, {name} always took the {thing} to the {place}.",
]


def story(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    words = {
        "name": name,
        "friend": friend,
        "animal": rng.choice(ANIMALS),
        "place": rng.choice(PLACES),
        "thing": rng.choice(THINGS),
        "color": rng.choice(COLORS),
        "feeling": rng.choice(FEELINGS),
        "verb": rng.choice(VERBS),
    }
    middle = rng.sample(MIDDLES, rng.randint(2, 3))
    sentences = [rng.choice(OPENINGS), *middle, rng.choice(ENDINGS)]
    return " ".join(s.format(**words) for s in sentences)


def stories(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [story(rng) for _ in range(count)]
