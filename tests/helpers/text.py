"""Small deterministic text corpora for the data tests."""

from __future__ import annotations

import random

WORDS = ["def", "return", "class", "import", "self", "value", "index", "print", "for", "while", "if", "yield"]


def make_text(n_lines: int, seed: int = 0) -> str:
    """n_lines lines of 3-9 words drawn from WORDS, the same for the same seed."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n_lines)]
    return "\n".join(lines) + "\n"
