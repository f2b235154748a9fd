"""The functions ``bench/bench.py`` runs on workers.

They live in a module of their own (not in the benchmark script's ``__main__``) so that
every backend sends them by reference, as a module and a name, and a worker imports
this module instead of receiving the function by value:

- pydist workers receive the master's ``sys.path``, which holds this directory when the
  benchmark runs as ``python bench/bench.py``;
- forked ``multiprocessing`` and ``concurrent.futures`` workers inherit it;
- loky's fresh interpreters are given the master's ``sys.path`` too.
"""
from __future__ import annotations

from typing import Any


def noop() -> None:
    """Nothing: what is left of a call is the cost of the round trip."""
    return None


def square(x: int) -> int:
    """A tiny task: far cheaper than its round trip."""
    return x * x


def echo(a: Any) -> Any:
    """Send the argument straight back (an array round trip)."""
    return a
