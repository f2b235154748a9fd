"""A drop-in made inside a task works, on private children of that worker, as the standard
library's does; the Julia API still lets only process 1 add workers. Both transports."""
from __future__ import annotations

import os

import pydist as pd


def _square(x: int) -> int:
    return x * x


def _pid(_: object = None) -> int:
    return os.getpid()


def _nested_work() -> tuple[list[int], list[int], bool]:
    with pd.ProcessPoolExecutor(2) as ex:
        squares = list(ex.map(_square, range(5)))
        ex_pids = set(ex.map(_pid, range(4)))
    with pd.Pool(2) as pool:
        more = pool.map(_square, range(5, 8))
        pool_pids = set(pool.map(_pid, range(4)))
    me = os.getpid()
    return squares, more, me not in ex_pids | pool_pids


def _addprocs_here() -> str:
    try:
        pd.addprocs(1)
    except RuntimeError as e:
        return str(e)
    return "added"


def test_executor_and_pool_inside_a_task(transport):
    with pd.ProcessPoolExecutor(1, transport=transport) as outer:
        squares, more, elsewhere = outer.submit(_nested_work).result(timeout=120)
    assert squares == [0, 1, 4, 9, 16] and more == [25, 36, 49] and elsewhere


def test_julia_api_still_adds_workers_only_on_process_1(cluster):
    said = pd.remotecall_fetch(_addprocs_here, cluster[0])
    assert "only process 1" in said
