"""``max_memory_per_child``: a drop-in worker whose resident memory is over the limit after
a task takes no more tasks and is replaced (loky's guard against leaks), on both
transports; bad values are refused before anything starts."""
from __future__ import annotations

import itertools
import os

import pytest

import pydist as pd

MB = 1 << 20
_hoard: list[bytes] = []        # in each worker: what the "leaky" tasks keep


def leak(mb: int) -> int:
    """Keep ``mb`` MiB of written pages alive in this worker; its os pid."""
    _hoard.append(b"x" * (mb * MB))
    return os.getpid()


def runs(pids: list[int]) -> list[int]:
    """How many consecutive tasks each worker ran, in order."""
    return [len(list(group)) for _, group in itertools.groupby(pids)]


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_worker_over_the_limit_is_replaced_between_tasks(transport, leak_oracle, kind):
    limit = 200 * MB
    if kind == "executor":
        with pd.ProcessPoolExecutor(1, max_memory_per_child=limit, transport=transport) as ex:
            pids = [ex.submit(leak, 64).result(timeout=60) for _ in range(8)]
    else:
        with pd.Pool(1, max_memory_per_child=limit, transport=transport) as pool:
            pids = [pool.apply(leak, (64,)) for _ in range(8)]
    # A fresh worker holds well under 200 MiB, so it passes the limit within 4 tasks of
    # 64 MiB and runs at most one more: never 5 tasks in a row, and at least 2 workers.
    assert len(set(pids)) >= 2, pids
    assert max(runs(pids)) <= 4, pids


def test_without_a_limit_one_worker_runs_everything(transport, leak_oracle):
    with pd.ProcessPoolExecutor(1, transport=transport) as ex:
        pids = [ex.submit(leak, 64).result(timeout=60) for _ in range(5)]
    assert len(set(pids)) == 1, pids


@pytest.mark.parametrize("value, error, message", [
    ("1GB", TypeError, "max_memory_per_child must be an int (bytes) or None, not '1GB'"),
    (True, TypeError, "max_memory_per_child must be an int (bytes) or None, not True"),
    (0, ValueError, "max_memory_per_child must be > 0 bytes, got 0"),
])
def test_bad_limits_are_named(value, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        pd.ProcessPoolExecutor(1, max_memory_per_child=value)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        pd.Pool(1, max_memory_per_child=value)


def test_a_limit_needs_workers_of_its_own():
    with pytest.raises(ValueError, match="not a given pool"):
        pd.ProcessPoolExecutor(max_memory_per_child=MB, pool=pd.WorkerPool())
