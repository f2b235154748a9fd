"""A cluster manager written outside pydist, with only its public interface: it starts its
own workers with the ``pydist-worker`` command (or ``python -m pydist.worker``), hands
them the cookie on stdin, reads their contact lines, and answers the four callbacks."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from testkit import live_children, subprocess_env, wait_until

import pydist as pd

pytestmark = pytest.mark.timeout(120)


def worker_command() -> list[str]:
    exe = shutil.which("pydist-worker")
    return [exe] if exe else [sys.executable, "-m", "pydist.worker"]


class PipeManager(pd.ClusterManager):
    """Starts ``n`` local workers; records every callback it gets."""

    def __init__(self, n: int, *, dial_myself: bool = False) -> None:
        self.n = n
        self.dial_myself = dial_myself
        self.calls: list[tuple] = []
        self.launch_params: dict = {}

    def known_params(self) -> tuple[str, ...]:
        return ("flavour",)

    def launch(self, params, launched, launch_ntfy) -> None:
        self.calls.append(("launch",))
        self.launch_params = dict(params)
        cookie = pd.cluster_cookie()
        for i in range(self.n):
            proc = subprocess.Popen(
                [*worker_command(), "--lifeline", "--transports", "tcp"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                cwd=params["dir"], env=subprocess_env(), start_new_session=True)
            proc.stdin.write(f"{cookie}\n".encode())   # the cookie: on stdin, never argv
            proc.stdin.flush()                          # stdin stays open: the lifeline
            config = pd.WorkerConfig(process=proc, ospid=proc.pid, host="127.0.0.1",
                                     addresses=read_contact_line(proc), transport="tcp",
                                     userdata={"index": i, "flavour": params.get("flavour")})
            threading.Thread(target=drain, args=(proc,), daemon=True).start()
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify_all()

    def connect(self, pid, config):
        self.calls.append(("connect", pid))
        if self.dial_myself:
            from pydist import transport
            return transport.connect(config.addresses[0], 10.0)
        return super().connect(pid, config)

    def manage(self, pid, config, op) -> None:
        self.calls.append(("manage", pid, op))
        if op == "interrupt":
            config.process.send_signal(signal.SIGINT)

    def kill(self, pid, config) -> None:
        self.calls.append(("kill", pid))
        super().kill(pid, config)   # asks the worker to exit, then SIGTERM/SIGKILL if it lingers
        config.process.stdin.close()
        config.process.wait(10)


def read_contact_line(proc: subprocess.Popen, timeout: float = 30.0) -> tuple[str, ...]:
    """``PYDIST_WORKER 1 <url> ...``: the addresses, from the worker's first lines."""
    found: list[tuple[str, ...]] = []

    def read() -> None:
        for line in proc.stdout:
            words = line.decode().split()
            if words[:2] == ["PYDIST_WORKER", "1"]:
                found.append(tuple(words[2:]))
                return
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        proc.kill()
        raise RuntimeError(f"no contact line from the worker (exit status {proc.wait(5)})")
    return found[0]


def drain(proc: subprocess.Popen) -> None:
    for _ in iter(proc.stdout.readline, b""):
        pass


def sleeper(box: pd.Future) -> None:
    box.put(pd.myid())
    time.sleep(30)


@pytest.mark.parametrize("dial_myself", [False, True])
def test_custom_manager_lifecycle(dial_myself):
    mgr = PipeManager(2, dial_myself=dial_myself)
    pids = pd.addprocs(mgr, flavour="vanilla")
    try:
        assert len(pids) == 2 and set(pids) <= set(pd.workers())
        assert mgr.launch_params["flavour"] == "vanilla"
        for key in ("dir", "exename", "exeflags", "topology", "lazy", "enable_threaded_blas"):
            assert key in mgr.launch_params
        assert [c for c in mgr.calls if c[0] == "connect"] == [("connect", p) for p in pids]
        assert {c[1] for c in mgr.calls if c[-1] == "register"} == set(pids)
        # Remote calls, worker to worker too.
        assert pd.remotecall_fetch(os.getpid, pids[0]) != os.getpid()
        ask = lambda q: pd.remotecall_fetch(pd.myid, q)   # noqa: E731
        assert pd.remotecall_fetch(ask, pids[0], pids[1]) == pids[1]
        # Interrupt goes through manage(..., "interrupt").
        box = pd.Future()
        fut = pd.remotecall(sleeper, pids[1], box)
        assert box.fetch(timeout=20) == pids[1]
        pd.interrupt(pids[1])
        with pytest.raises(pd.RemoteException) as info:
            fut.fetch(timeout=20)
        assert isinstance(info.value.captured.ex, KeyboardInterrupt)
        assert ("manage", pids[1], "interrupt") in mgr.calls
        assert pd.remotecall_fetch(lambda: 7, pids[1]) == 7
    finally:
        procs = [w.config.process for p in pids if (w := pd_worker(p)) is not None]
        pd.rmprocs(*pids, waitfor=30)
    assert {c[1] for c in mgr.calls if c[0] == "kill"} == set(pids)
    assert wait_until(lambda: {c[1] for c in mgr.calls if c[-1] == "deregister"} == set(pids), 10)
    assert all(p.poll() is not None for p in procs)
    assert not set(pids) & set(pd.workers())
    ours = {p.pid for p in procs}
    assert wait_until(lambda: not [c for c in live_children() if c.pid in ours], 10)


def pd_worker(pid: int):
    from pydist.cluster.group import PGRP
    return PGRP.workers.get(pid)


def test_worker_config_has_julias_fields():
    config = pd.WorkerConfig()
    for name in ("exename", "exeflags", "host", "port", "sshflags", "max_parallel", "connect_at",
                 "process", "ospid", "environ", "ident", "connect_idents",
                 "enable_threaded_blas", "count", "bind_addr", "tunnel", "multiplex",
                 "userdata", "transport"):
        assert hasattr(config, name), name


def test_a_manager_that_fails_to_launch():
    class Broken(pd.ClusterManager):
        def launch(self, params, launched, launch_ntfy):
            raise RuntimeError("no machines today")

    with pytest.raises(pd.LaunchError, match="no machines today"):
        pd.addprocs(Broken())
