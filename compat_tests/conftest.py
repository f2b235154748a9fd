"""Fixtures for the differential tests: the same scenario on the standard library's class
and on pydist's (``impl`` is ``"stdlib"`` or ``"pydist"``), and the leak check that ends
every run (no worker process left, nothing of pydist in /dev/shm)."""
from __future__ import annotations

import os
import signal
import sys
import threading

import psutil
import pytest

import pydist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _compat import IMPLS, make_executor, make_pool, wait_until, worker_children  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def stdlib_helpers_stopped():
    """After each module: multiprocessing's forkserver and resource tracker (started by the
    standard library's classes) are stopped, so no process outlives the tests that used it.
    A helper that does not stop (a process still holds its pipe) fails the module, naming
    the holders, instead of hanging it."""
    yield
    from multiprocessing import forkserver, resource_tracker
    for helper in (forkserver._forkserver, resource_tracker._resource_tracker):
        pipe = _pipe_of(getattr(helper, "_fd", None) or getattr(helper, "_forkserver_alive_fd", None))
        pid = getattr(helper, "_pid", None) or getattr(helper, "_forkserver_pid", None)
        stopping = threading.Thread(target=_quietly, args=(helper._stop,), daemon=True)
        stopping.start()
        stopping.join(HELPER_STOP)
        if stopping.is_alive():
            held = _holders(pipe)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)     # lets the waiting thread go
            stopping.join(5)
            pytest.fail(f"{type(helper).__name__} (pid {pid}) did not stop within "
                        f"{HELPER_STOP} s: its pipe {pipe} is still open in {held}")


HELPER_STOP = 20


def _quietly(stop) -> None:
    try:
        stop()
    except Exception:
        pass


def _pipe_of(fd: int | None) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") if fd is not None else None
    except OSError:
        return None


def _holders(pipe: str | None) -> list[str]:
    """The processes (pid and command line) with ``pipe`` open."""
    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
            if any(_readlink(f"/proc/{proc.pid}/fd/{fd}") == pipe for fd in fds):
                out.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:120]}")
        except OSError:
            pass
    return out


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


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
