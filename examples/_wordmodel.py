"""The worker-side code of pool_migration.py: a "model" loaded once per worker by the pool's
initializer, and the task that uses it.

It lives in a module of its own (not in the script's ``__main__``) because the initializer
and the tasks must share the module's globals: pydist workers import this module by name
(they get the master's ``sys.path``), whereas functions of ``__main__`` are shipped by
value, each with globals of its own.
"""
from __future__ import annotations

import random

_vocabulary: dict[str, int] | None = None      # set in each worker by load_vocabulary


def load_vocabulary(seed: int, size: int) -> None:
    """Run once per worker when it starts: the state every task of that worker reads."""
    global _vocabulary
    rng = random.Random(seed)
    words = {"".join(rng.choice("abcdefgh") for _ in range(3)) for _ in range(size)}
    _vocabulary = {w: i for i, w in enumerate(sorted(words))}


def known_words(line: str) -> int:
    """How many words of ``line`` are in the worker's vocabulary."""
    assert _vocabulary is not None, "the initializer did not run"
    return sum(w in _vocabulary for w in line.split())
