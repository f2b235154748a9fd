"""Shared fixtures: clusters on every transport, and the leak checks every test run ends with."""
from __future__ import annotations

import os
import sys

import pytest

import pydist as pd

sys.path.insert(0, os.path.dirname(__file__))


from testkit import TRANSPORTS, live_children, remove_all_workers, shm_entries, wait_until  # noqa: E402


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def cluster(transport):
    """Two workers on ``transport``, shared by a module's tests; removed afterwards."""
    remove_all_workers()
    pids = pd.addprocs(2, transport=transport)
    yield pids
    remove_all_workers()


# Threads pydist keeps for the life of the process, once started.
SERVICE_THREADS = ("pydist-refs", "pydist-timers", "pydist-runner", "pydist-reaper", "pydist-heartbeat",
                   "pydist-beat", "pydist-worker-server")


def _threads() -> set[tuple[int, str]]:
    import threading
    from multiprocessing import resource_sharer
    # multiprocessing's resource sharer serves descriptors to local drop-in workers (handed
    # multiprocessing objects) from one thread that lives as long as this process.
    sharer = getattr(resource_sharer._resource_sharer, "_thread", None)
    return {(t.ident, t.name) for t in threading.enumerate()
            if not t.name.startswith(SERVICE_THREADS) and t is not sharer}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def leak_oracle():
    """After the test: no new process (orphan or zombie), nothing new in /dev/shm, and the
    file descriptors and threads back to where they were."""
    children = {p.pid for p in live_children()}
    shm, fds, threads = shm_entries(), _fds(), _threads()
    yield
    assert wait_until(lambda: not ({p.pid for p in live_children()} - children), 10), \
        f"processes left: {[(p.pid, p.status()) for p in live_children() if p.pid not in children]}"
    assert wait_until(lambda: shm_entries() <= shm, 5), f"/dev/shm left: {sorted(shm_entries() - shm)}"
    assert wait_until(lambda: _fds() <= fds + 2, 5), f"file descriptors: {fds} before, {_fds()} after"
    assert wait_until(lambda: _threads() <= threads, 5), \
        f"threads left: {sorted(n for _, n in _threads() - threads)}"


@pytest.fixture
def fresh(transport, leak_oracle):
    """A factory of throwaway workers for tests that break them; all removed afterwards,
    and checked for leaks."""
    made: list[int] = []

    def make(n: int = 1) -> list[int]:
        pids = pd.addprocs(n, transport=transport)
        made.extend(pids)
        return pids
    yield make
    alive = [p for p in made if p in pd.workers()]
    if alive:
        pd.rmprocs(*alive, waitfor=30)


@pytest.fixture(scope="session", autouse=True)
def no_leaks_at_end():
    """After the whole run: no worker process left and nothing of pydist in /dev/shm."""
    before = shm_entries()
    yield
    remove_all_workers()
    assert wait_until(lambda: not live_children(), 10), \
        f"processes left behind: {[(p.pid, p.status()) for p in live_children()]}"
    leaked = shm_entries() - before
    assert not leaked, f"shared memory left behind: {sorted(leaked)}"
