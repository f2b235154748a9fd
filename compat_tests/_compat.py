"""Helpers of the differential tests: making either implementation, recording outcomes,
running a script in a fresh interpreter."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import multiprocessing.pool
import os
import subprocess
import sys
import time

import psutil

import pydist
from pydist.managers.forkclient import worker_server_pid

HERE = os.path.dirname(os.path.abspath(__file__))

IMPLS = ["stdlib", "pydist"]
# The standard library's classes get the forkserver start method: this process has threads
# (pydist's), which a fork would copy in an unknown state.
MP_CONTEXT = multiprocessing.get_context("forkserver")


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def worker_children() -> list[psutil.Process]:
    """Child processes still running (pydist's worker server and multiprocessing's
    resource tracker, which live as long as this process, are not among them)."""
    from multiprocessing import resource_tracker
    out = []
    services = {worker_server_pid(), getattr(resource_tracker._resource_tracker, "_pid", None)}
    for child in psutil.Process().children(recursive=True):
        if child.pid in services:
            continue
        try:
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def make_executor(impl: str, *args, **kwargs) -> cf.Executor:
    if impl == "stdlib":
        kwargs.setdefault("mp_context", MP_CONTEXT)
        return cf.ProcessPoolExecutor(*args, **kwargs)
    return pydist.ProcessPoolExecutor(*args, **kwargs)


def make_pool(impl: str, *args, **kwargs):
    if impl == "stdlib":
        kwargs.setdefault("context", MP_CONTEXT)
        return multiprocessing.pool.Pool(*args, **kwargs)
    return pydist.Pool(*args, **kwargs)


def outcome(fn, *args, **kwargs) -> tuple:
    """``("ok", value)`` or ``("raised", type name, str(exception))``."""
    try:
        return ("ok", fn(*args, **kwargs))
    except BaseException as e:   # SystemExit too: it is a task's outcome here
        return ("raised", type(e).__name__, str(e))


def run_script(impl: str, body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter where ``Executor``/``Pool`` are ``impl``'s."""
    if impl == "stdlib":
        head = ("from concurrent.futures import ProcessPoolExecutor as Executor\n"
                "from multiprocessing import Pool\n")
    else:
        head = "from pydist import ProcessPoolExecutor as Executor, Pool\n"
    env = dict(os.environ)
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, root, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", head + body], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=HERE)
