"""Checked by mypy (scripts/lint.sh, tests/test_typing.py), never run: a ``Future`` knows
the type of its value, so what ``fetch`` returns is typed by the function called."""
from __future__ import annotations

from typing import assert_type

import pydist as pd
from pydist import Future


def square(x: int) -> int:
    return x * x


def greet(name: str, *, punct: str = "!") -> str:
    return f"hello {name}{punct}"


def check_calls(pid: int, pool: pd.WorkerPool) -> None:
    fut = pd.remotecall(square, pid, 3)
    assert_type(fut, Future[int])
    assert_type(pd.fetch(fut), int)
    assert_type(fut.fetch(), int)
    assert_type(fut.result(timeout=1.0), int)
    assert_type(pd.fetch(pd.remotecall(greet, pid, "you", punct="?")), str)
    assert_type(pd.remotecall_fetch(greet, pid, "you"), str)
    assert_type(pd.remotecall_wait(square, pid, 2), Future[int])
    assert_type(pd.remotecall(square, pool, 3), Future[int])
    assert_type(pd.spawnat(pid, square, 4), Future[int])
    assert_type(pd.spawnat(pd.ANY, square, 4), Future[int])
    assert_type(pd.spawn(greet, "x"), Future[str])
    assert_type(pd.fetchfrom(pid, square, 5), int)
    assert_type(pd.remote_do(print, pid, "done"), None)


def check_local_future() -> None:
    box: Future[list[str]] = Future()
    box.put(["a"])
    assert_type(pd.fetch(box), list[str])
    assert_type(box.wait(), Future[list[str]])


def check_fetch_of_a_plain_value() -> None:
    assert_type(pd.fetch(42), int)       # anything that is not a reference is returned as is


def check_arguments_are_checked(pid: int) -> None:
    pd.remotecall(square, pid, "three")          # type: ignore[arg-type]
    pd.remotecall_fetch(greet, pid, "a", bad=1)  # type: ignore[call-arg]


async def check_await(fut: Future[int]) -> None:
    assert_type(await fut, int)
