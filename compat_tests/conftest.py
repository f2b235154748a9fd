"""Fixtures for the differential tests: the same scenario on the standard library's class
and on pydist's (``impl`` is ``"stdlib"`` or ``"pydist"``), and the leak check that ends
every run (no worker process left, nothing of pydist in /dev/shm)."""
from __future__ import annotations

import os
import sys

import pytest

import pydist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _compat import IMPLS, make_executor, make_pool, wait_until, worker_children  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def stdlib_helpers_stopped():
    """After each module: multiprocessing's forkserver and resource tracker (started by the
    standard library's classes) are stopped, so no process outlives the tests that used it."""
    yield
    from multiprocessing import forkserver, resource_tracker
    for helper in (forkserver._forkserver, resource_tracker._resource_tracker):
        try:
            helper._stop()
        except Exception:
            pass


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=IMPLS)
def shared_executor(request):
    """Two workers of ``impl``, shared by a module's scenarios that do not break them."""
    ex = make_executor(request.param, 2)
    ex.impl = request.param
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module", params=IMPLS)
def shared_pool(request):
    pool = make_pool(request.param, 2)
    pool.impl = request.param
    yield pool
    pool.terminate()
    pool.join()


@pytest.fixture
def executors():
    """A factory of executors of either kind; every one is shut down afterwards."""
    made = []

    def factory(impl: str, *args, **kwargs):
        ex = make_executor(impl, *args, **kwargs)
        made.append(ex)
        return ex
    yield factory
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def pools():
    made = []

    def factory(impl: str, *args, **kwargs):
        pool = make_pool(impl, *args, **kwargs)
        made.append(pool)
        return pool
    yield factory
    for pool in made:
        pool.terminate()
        pool.join()


def _shm_entries() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if "pydist" in n}
    except FileNotFoundError:
        return set()


@pytest.fixture(scope="session", autouse=True)
def no_leaks_at_end():
    before = _shm_entries()
    yield
    ids = [p for p in pydist.workers() if p != 1]
    if ids:
        pydist.rmprocs(*ids, waitfor=30)
    assert wait_until(lambda: not worker_children(), 15), \
        f"processes left behind: {[(p.pid, p.cmdline()) for p in worker_children()]}"
    leaked = _shm_entries() - before
    assert not leaked, f"shared memory left behind: {sorted(leaked)}"
