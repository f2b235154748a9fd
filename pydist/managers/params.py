"""Checking and normalizing the keywords every ``addprocs`` call shares, before anything starts.

* ``exeflags``: a string is split as a POSIX shell would (``shlex``), as Julia users write
  ``exeflags="-O"``; a list or tuple of strings is taken as is. For a Python interpreter a
  ``-`` among its options is refused: it would read its standard input, which carries the
  cookie, as a program.
* ``env``: a dict, or Julia's list of ``(name, value)`` pairs.
* ``worker_timeout``: how long a worker may take to start and join, in seconds (Julia's
  ``JULIA_WORKER_TIMEOUT``: default from ``PYDIST_WORKER_TIMEOUT``, else 60).
"""
from __future__ import annotations

import os
import re
import shlex
from typing import Any

__all__ = ["normalize_exeflags", "normalize_env", "worker_timeout", "scrub", "DEFAULT_WORKER_TIMEOUT"]

DEFAULT_WORKER_TIMEOUT = 60.0
_PYTHON = re.compile(r"(python|pypy)[0-9.]*(\.exe)?\Z")
# Options of the CPython command line that take the next word as their value.
_WITH_VALUE = ("-W", "-X", "--check-hash-based-pycs")


def normalize_exeflags(flags: Any, exename: Any) -> tuple[str, ...]:
    """``exeflags`` as a tuple of words (``TypeError``/``ValueError`` naming the bad value)."""
    if flags is None:
        return ()
    if isinstance(flags, str):
        try:
            words = tuple(shlex.split(flags))
        except ValueError as e:
            raise ValueError(f"exeflags={flags!r} cannot be split into words: {e}") from None
    elif isinstance(flags, (list, tuple)) and all(isinstance(f, str) for f in flags):
        words = tuple(flags)
    else:
        raise TypeError(f"exeflags must be a str (split as a shell would) or a list of str, "
                        f"not {flags!r}")
    if isinstance(exename, str) and _PYTHON.match(os.path.basename(exename)):
        _check_python_options(words)
    return words


def _check_python_options(words: tuple[str, ...]) -> None:
    """Refuse ``-``: the interpreter would run its standard input, the cookie, as a program
    (and wait for more). ``-c`` or a script that starts the worker itself is fine."""
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in _WITH_VALUE:
            skip = True
        elif word == "-":
            raise ValueError(f"exeflags={list(words)!r}: '-' would make the interpreter read its "
                             f"standard input (which carries the cluster cookie) as a program")
        elif word in ("-c", "-m") or not word.startswith("-"):
            return    # the rest are that program's arguments


def normalize_env(env: Any) -> dict[str, str]:
    """``env`` as a dict of strings: from a dict or from Julia's ``[(name, value), ...]``."""
    if env is None:
        return {}
    if isinstance(env, dict):
        items = list(env.items())
    elif isinstance(env, (list, tuple)):
        items = list(env)
    else:
        raise TypeError(f"env must be a dict or a list of (name, value) pairs, not {env!r}")
    out: dict[str, str] = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"env must be a dict or a list of (name, value) pairs; "
                            f"{item!r} is not a pair")
        name, value = item
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise ValueError(f"env: {name!r} is not a valid environment variable name")
        if not isinstance(value, (str, int, float)) or isinstance(value, bool) or "\0" in str(value):
            raise ValueError(f"env: the value of {name} must be a str or a number, not {value!r}")
        out[name] = str(value)
    return out


def worker_timeout(value: Any = None) -> float:
    """Seconds a worker may take to start and join: ``value``, else ``PYDIST_WORKER_TIMEOUT``."""
    where = "worker_timeout"
    if value is None:
        raw = os.environ.get("PYDIST_WORKER_TIMEOUT")
        if raw is None or not raw.strip():
            return DEFAULT_WORKER_TIMEOUT
        where = "PYDIST_WORKER_TIMEOUT"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"PYDIST_WORKER_TIMEOUT must be a number of seconds, not {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or value != value or value == float("inf"):
        raise ValueError(f"{where} must be a positive, finite number of seconds, not {value!r}")
    return float(value)


def scrub(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` (the cookie) replaced by a placeholder."""
    if not secret or secret not in text:
        return text
    return text.replace(secret, "<cluster cookie>")
