"""A drop-in made inside a task: the standard library's own class, on private children.

The drop-ins' workers join the pydist cluster, and only process 1 adds workers to it (as
in Julia). A program written for the standard library may still make an executor or a
pool inside a task; there, on a pydist worker, ``Executor(...)`` and ``Pool(...)`` give the
standard library's ``ProcessPoolExecutor`` and ``multiprocessing.pool.Pool`` with the
``spawn`` start method (never ``fork``: a worker has threads), whose processes are
children of that worker alone and go away with it. Their pickling rules are the standard
library's. An executor given a pydist worker pool (``pool=``) stays pydist's.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import multiprocessing.pool
from typing import Any

from ..cluster.group import PGRP
from .mainscript import check_not_importing_main

__all__ = ["in_task", "nested_executor", "nested_pool"]


def in_task() -> bool:
    """Whether this process is a pydist worker (so a drop-in made here is nested)."""
    return PGRP.role == "worker"


def _spawn() -> Any:
    return multiprocessing.get_context("spawn")


def nested_executor(max_workers: int | None, initializer: Any, initargs: tuple[Any, ...],
                    max_tasks_per_child: int | None) -> cf.ProcessPoolExecutor:
    """The standard library's executor, on spawned children of this worker (refused while
    this worker runs the main script: its children would run it too, without end)."""
    check_not_importing_main()
    return cf.ProcessPoolExecutor(max_workers, _spawn(), initializer, initargs,
                                  max_tasks_per_child=max_tasks_per_child)


def nested_pool(processes: int | None, initializer: Any, initargs: Any,
                maxtasksperchild: int | None) -> multiprocessing.pool.Pool:
    """The standard library's pool, on spawned children of this worker (refused while
    this worker runs the main script)."""
    check_not_importing_main()
    pool: multiprocessing.pool.Pool = _spawn().Pool(processes, initializer, initargs, maxtasksperchild)
    return pool
