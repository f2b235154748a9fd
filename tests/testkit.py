"""Helpers shared by the test modules (imported as ``testkit``; conftest.py uses them too)."""
from __future__ import annotations

import os
import time

import psutil

import pydist as pd
from pydist.managers.forkclient import worker_server_pid


def available_transports() -> list[str]:
    """Every transport this machine can run; each cluster test runs on all of them."""
    if os.environ.get("PYDIST_TEST_TRANSPORTS"):
        return os.environ["PYDIST_TEST_TRANSPORTS"].split(",")
    found = ["tcp"]
    try:
        import pydist.shm.transport  # noqa: F401
        found.append("shm")
    except Exception:
        pass
    return found


TRANSPORTS = available_transports()


def shm_entries() -> set[str]:
    """pydist's names in /dev/shm (segments and semaphores)."""
    try:
        return {n for n in os.listdir("/dev/shm") if "pydist" in n}
    except FileNotFoundError:
        return set()


def service_pids() -> set[int]:
    """Helper processes that live as long as this one once started: pydist's worker server,
    and multiprocessing's resource tracker (which local drop-in workers share once a program
    uses shared memory)."""
    from multiprocessing import resource_tracker
    pids = {worker_server_pid(), getattr(resource_tracker._resource_tracker, "_pid", None)}
    return {p for p in pids if p is not None}


def live_children() -> list[psutil.Process]:
    """Processes started by this test process that are still running (zombies count);
    the helpers of ``service_pids`` are not among them."""
    out = []
    services = service_pids()
    for child in psutil.Process().children(recursive=True):
        if child.pid in services:
            continue
        try:
            out.append(child) if child.is_running() else None
        except psutil.NoSuchProcess:
            pass
    return out


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def subprocess_env() -> dict[str, str]:
    """The environment for a Python subprocess that must import this very pydist."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(pd.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def remove_all_workers() -> None:
    ids = [p for p in pd.workers() if p != 1]
    if ids:
        pd.rmprocs(*ids, waitfor=30)


class Unloadable:
    """Pickles on the master; unpickling raises everywhere but on process 1."""

    def __reduce__(self):
        return (_rebuild_unloadable, ())


def _rebuild_unloadable():
    if pd.myid() != 1:
        raise ImportError("this object cannot be rebuilt on a worker")
    return Unloadable()
