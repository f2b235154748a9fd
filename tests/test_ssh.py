"""SSHManager against real OpenSSH servers: the hosts of the SSH lab (tests/sshlab.py).

Every host is a network namespace with its own sshd, hostname and /dev/shm; the master
(this process) stays in the root namespace. Pids are shared between the namespaces, so
whether a process still runs "on a host" is checked by namespace membership
(``lab.processes_in``), never by a kill from here.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest
from sshlab import SSHLab
from testkit import subprocess_env, wait_until

import pydist as pd
from pydist.cluster.group import PGRP
from pydist.errors import LaunchError
from pydist.managers.ssh import SSHManager, parse_machine

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sshlab():
    ok, reason = SSHLab.available()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SSH tests: {reason}")
        pytest.skip(reason)
    with SSHLab(n_hosts=2) as lab:
        yield lab


# -- helpers -----------------------------------------------------------------------------
def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pydist_processes(lab, host) -> list[str]:
    """The pydist processes running on a lab host (its sshd's arguments name the lab)."""
    return [f"{p}: {c}" for p in lab.processes_in(host)
            if "pydist" in (c := _cmdline(p)) and not c.startswith("sshd:")]


def ssh_sessions(lab, host) -> int:
    """How many ssh connections the host's sshd is serving."""
    return sum(1 for p in lab.processes_in(host) if _cmdline(p).startswith("sshd: root@"))


def assert_hosts_clean(lab, timeout: float = 15.0) -> None:
    def left() -> dict:
        return {h.name: pydist_processes(lab, h) for h in lab.hosts if pydist_processes(lab, h)}
    assert wait_until(lambda: not left(), timeout, 0.05), f"left on the hosts: {left()}"


def hostname_of(pid: int) -> str:
    return pd.remotecall_fetch(socket.gethostname, pid)


def add(lab, machines, **kw) -> list[int]:
    kw.setdefault("sshflags", lab.sshflags)
    kw.setdefault("exename", lab.python)
    return pd.addprocs(machines, **kw)


def running(box: pd.Future, seconds: float) -> None:
    """Run on a worker: say so through ``box``, then sleep."""
    box.put(pd.myid())
    time.sleep(seconds)


# -- four workers on two hosts ----------------------------------------------------------------
@pytest.fixture(scope="module")
def four(sshlab):
    a, b = sshlab.hosts
    pids = add(sshlab, [(a.spec, 2), (b.spec, 2)])
    yield pids
    pd.rmprocs(*[p for p in pids if p in pd.workers()], waitfor=30)
    assert_hosts_clean(sshlab)


def test_four_workers_on_two_hosts(sshlab, four):
    a, b = sshlab.hosts
    assert len(four) == 4 and all(p in pd.workers() for p in four)
    names = sorted(hostname_of(p) for p in four)
    assert names == sorted([a.name, a.name, b.name, b.name])
    for pid in four:
        config = PGRP.workers[pid].config
        assert config.transport == "tcp"
        # The worker listens on its host's lab address: reachable from the other host,
        # and neither loopback nor every interface.
        host = config.addresses[0].removeprefix("tcp://").rpartition(":")[0]
        assert host == (a.addr if hostname_of(pid) == a.name else b.addr)


def test_procs_groups_by_host(sshlab, four):
    a, _ = sshlab.hosts
    on_a = sorted(p for p in four if hostname_of(p) == sshlab.hosts[0].name)
    on_b = sorted(set(four) - set(on_a))
    assert pd.procs(on_a[0]) == on_a and pd.procs(on_b[1]) == on_b
    assert pd.procs(1) == [1]


def test_worker_to_worker_across_hosts(sshlab, four):
    a, b = sshlab.hosts
    on_a = [p for p in four if hostname_of(p) == a.name]
    on_b = [p for p in four if hostname_of(p) == b.name]

    def ask(other: int) -> tuple[int, str]:
        return pd.remotecall_fetch(lambda: (pd.myid(), socket.gethostname()), other)

    # Both directions: the higher id dials the lower one itself; the lower one asks the
    # higher one, through the master, to dial it.
    for src, dst in ((on_a[0], on_b[0]), (on_b[1], on_a[1]), (max(four), min(four))):
        assert pd.remotecall_fetch(ask, src, dst) == (dst, hostname_of(dst))


def test_cookie_is_not_in_argv_or_environment(sshlab, four):
    cookie = pd.cluster_cookie()
    for pid in four:
        ospid = PGRP.workers[pid].ospid
        with open(f"/proc/{ospid}/environ", "rb") as f:
            environ = f.read()
        assert cookie not in _cmdline(ospid) and cookie.encode() not in environ


def test_interrupt_reaches_a_remote_call(sshlab, four):
    pid = four[-1]
    box = pd.Future()
    fut = pd.remotecall(running, pid, box, 30)
    assert box.fetch(timeout=20) == pid
    started = time.monotonic()
    pd.interrupt(pid)
    with pytest.raises(pd.RemoteException) as info:
        fut.fetch(timeout=20)
    assert isinstance(info.value.captured.ex, KeyboardInterrupt)
    assert time.monotonic() - started < 10
    assert pd.remotecall_fetch(lambda x: x * 2, pid, 21) == 42   # the worker lives on


def test_rmprocs_leaves_nothing_on_either_host(sshlab, four):
    on_hosts = lambda: {p for h in sshlab.hosts for p in sshlab.processes_in(h)}   # noqa: E731
    gone, kept = [four[0], four[-1]], four[1:-1]
    ospid = {p: PGRP.workers[p].ospid for p in four}
    pd.rmprocs(*gone, waitfor=30)
    assert not set(gone) & set(pd.workers())
    assert wait_until(lambda: not {ospid[p] for p in gone} & on_hosts(), 10)
    assert {ospid[p] for p in kept} <= on_hosts()
    pd.rmprocs(*kept, waitfor=30)
    assert_hosts_clean(sshlab)
    assert wait_until(lambda: sum(ssh_sessions(sshlab, h) for h in sshlab.hosts) == 0, 10)


def stuck(box: pd.Future) -> None:
    """Run on a worker: say so, then hold the GIL in C for a minute (deaf to everything)."""
    import ctypes
    box.put(pd.myid())
    ctypes.PyDLL(None).sleep(60)


def test_rmprocs_reaches_a_stuck_worker(sshlab):
    _, b = sshlab.hosts
    [pid] = add(sshlab, [b.spec])
    box = pd.Future()
    fut = pd.remotecall(stuck, pid, box)
    assert box.fetch(timeout=20) == pid
    started = time.monotonic()
    pd.rmprocs(pid, waitfor=30)
    assert_hosts_clean(sshlab)
    assert time.monotonic() - started < 20
    with pytest.raises(pd.ProcessExitedException):
        fut.fetch(timeout=10)
    assert wait_until(lambda: ssh_sessions(sshlab, b) == 0, 10)


# -- parameters ---------------------------------------------------------------------------
def test_env_and_dir_reach_the_worker(sshlab, tmp_path):
    a, _ = sshlab.hosts
    value = "it's \"quoted\" $HOME `x` ; & |"
    workdir = tmp_path / "a dir with spaces"
    workdir.mkdir()
    [pid] = add(sshlab, [a.spec], env={"PYDIST_TEST_VALUE": value}, dir=str(workdir))
    try:
        got = pd.remotecall_fetch(lambda: (os.environ.get("PYDIST_TEST_VALUE"), os.getcwd(),
                                           os.environ.get("OMP_NUM_THREADS")), pid)
        assert got == (value, str(workdir), "1")
    finally:
        pd.rmprocs(pid, waitfor=30)
    assert_hosts_clean(sshlab)


def test_tunnel(sshlab):
    a, b = sshlab.hosts
    pids = add(sshlab, [(a.spec, 2), b.spec], tunnel=True)
    try:
        for pid in pids:
            config = PGRP.workers[pid].config
            assert config.tunnel and config.connect_at.startswith("tcp://127.0.0.1:")
            assert config.addresses[0].startswith("tcp://127.0.0.1:")   # bound to loopback there
        assert sorted(map(hostname_of, pids)) == sorted([a.name, a.name, b.name])
        # Workers of one host still reach each other (over their host's loopback).
        on_a = [p for p in pids if hostname_of(p) == a.name]
        ask = lambda q: pd.remotecall_fetch(pd.myid, q)   # noqa: E731
        assert pd.remotecall_fetch(ask, on_a[1], on_a[0]) == on_a[0]
    finally:
        pd.rmprocs(*pids, waitfor=30)
    assert_hosts_clean(sshlab)
    assert wait_until(lambda: sum(ssh_sessions(sshlab, h) for h in sshlab.hosts) == 0, 10)


def test_multiplex_uses_one_connection_per_host(sshlab):
    a, _ = sshlab.hosts
    pids = add(sshlab, [(a.spec, 3)], multiplex=True)
    try:
        assert len(pids) == 3 and {hostname_of(p) for p in pids} == {a.name}
        assert ssh_sessions(sshlab, a) == 1
        assert all(PGRP.workers[p].config.multiplex for p in pids)
    finally:
        pd.rmprocs(*pids, waitfor=30)
    assert_hosts_clean(sshlab)
    # The master connection is closed once its last worker is gone.
    assert wait_until(lambda: ssh_sessions(sshlab, a) == 0, 10)


def test_multiplex_with_tunnel(sshlab):
    _, b = sshlab.hosts
    pids = add(sshlab, [(b.spec, 2)], multiplex=True, tunnel=True)
    try:
        assert ssh_sessions(sshlab, b) == 1
        assert [pd.remotecall_fetch(pd.myid, p) for p in pids] == pids
    finally:
        pd.rmprocs(*pids, waitfor=30)
    assert_hosts_clean(sshlab)
    assert wait_until(lambda: ssh_sessions(sshlab, b) == 0, 10)


def test_auto_count_is_the_hosts_cpu_count(sshlab):
    a, _ = sshlab.hosts
    expected = int(sshlab.ssh(a, f"{sshlab.python} -c 'import os; print(os.cpu_count())'").stdout)
    pids = add(sshlab, [(a.spec, "auto")])
    try:
        assert len(pids) == expected
        assert all(PGRP.workers[p].config.count == expected for p in pids)
    finally:
        pd.rmprocs(*pids, waitfor=30)
    assert_hosts_clean(sshlab)


def test_host_that_does_not_answer(sshlab):
    """A silent host and a dead one are each a LaunchError naming them, in bounded time,
    while the good host's worker joins."""
    a, _ = sshlab.hosts
    started = time.monotonic()
    with pytest.raises(LaunchError) as info:
        add(sshlab, [f"root@{sshlab.silent_addr}", f"root@{sshlab.dead_addr}", a.spec])
    took = time.monotonic() - started
    print(f"\nsilent host reported after {took:.1f} s")
    message = str(info.value)
    assert sshlab.silent_addr in message and sshlab.dead_addr in message
    assert took < 30
    joined = info.value.pids
    try:
        assert len(joined) == 1 and hostname_of(joined[0]) == a.name
    finally:
        pd.rmprocs(*joined, waitfor=30)
    assert_hosts_clean(sshlab)


def test_launch_failure_on_the_host_is_reported(sshlab):
    a, _ = sshlab.hosts
    with pytest.raises(LaunchError, match="no/such/python"):
        add(sshlab, [a.spec], exename="/no/such/python")
    with pytest.raises(LaunchError, match="no-such-dir"):
        add(sshlab, [a.spec], dir="/no-such-dir")
    assert_hosts_clean(sshlab)


def test_a_leased_worker_outlives_long_calls_and_idleness(sshlab):
    """Heartbeats are read while a call runs and while the worker idles."""
    a, _ = sshlab.hosts
    [pid] = add(sshlab, [a.spec], lease=1.0)
    try:
        assert pd.remotecall_fetch(lambda: time.sleep(3) or "done", pid) == "done"
        time.sleep(2)
        assert pd.remotecall_fetch(pd.myid, pid) == pid
    finally:
        pd.rmprocs(pid, waitfor=30)
    assert_hosts_clean(sshlab)


def test_launch_timeout_ends_the_session(sshlab):
    a, _ = sshlab.hosts
    with pytest.raises(LaunchError, match="launch timeout"):
        add(sshlab, [a.spec], launch_timeout=0.05)
    assert_hosts_clean(sshlab)
    assert wait_until(lambda: ssh_sessions(sshlab, a) == 0, 10)


# -- the master's death ---------------------------------------------------------------------
_MASTER = r"""
import json, os, sys, time
import pydist as pd
specs, flags, lease, multiplex = json.loads(sys.argv[1])
pids = pd.addprocs(specs, sshflags=flags, exename=sys.executable, lease=lease,
                   multiplex=multiplex)
print("READY", *[pd.remotecall_fetch(os.getpid, p) for p in pids], flush=True)
time.sleep(300)
"""


def _start_master(lab, lease: float, multiplex: bool) -> tuple[subprocess.Popen, list[int]]:
    arg = json.dumps([[h.spec for h in lab.hosts], list(lab.sshflags), lease, multiplex])
    proc = subprocess.Popen([lab.python, "-c", _MASTER, arg], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=subprocess_env(), text=True,
                            start_new_session=True)
    ready: list[list[int]] = []

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("READY"):
                ready.append([int(w) for w in line.split()[1:]])
                return
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    assert ready, f"the master never got ready (exit status {proc.poll()})"
    return proc, ready[0]


def _ssh_clients(master: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(master.pid).children(recursive=True) if "ssh" in c.name()]


def _gone(procs: list[psutil.Process]) -> bool:
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def _control_masters(lab) -> list[psutil.Process]:
    """ssh multiplexing masters to the lab's hosts (daemons: not our children)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or ())
        if "ControlPersist" in line and any(h.addr in line for h in lab.hosts):
            found.append(p)
    return found


@pytest.mark.parametrize("how, multiplex", [("SIGKILL", False), ("SIGSTOP", False),
                                            ("SIGKILL", True)])
def test_no_worker_outlives_its_master(sshlab, how, multiplex):
    """SIGKILL: the ssh sessions end and the lifeline ends the workers. SIGSTOP stands for
    a master that vanished silently (its connections stay open): the lease ends them."""
    lease = 3.0
    master, ospids = _start_master(sshlab, lease, multiplex)
    clients = _ssh_clients(master) + (_control_masters(sshlab) if multiplex else [])
    try:
        on_hosts = {p for h in sshlab.hosts for p in sshlab.processes_in(h)}
        assert len(ospids) == 2 and set(ospids) <= on_hosts, (ospids, [
            (p, _cmdline(p)) for h in sshlab.hosts for p in sshlab.processes_in(h)])
        started = time.monotonic()
        os.kill(master.pid, getattr(signal, how))
        assert_hosts_clean(sshlab, timeout=lease + 15)
        took = time.monotonic() - started
        print(f"\nafter {how} of the master{' (multiplex)' if multiplex else ''}, its workers "
              f"were gone in {took:.1f} s (lease {lease:g} s)")
        if how == "SIGSTOP":
            assert took >= lease * 0.8   # the lease, not the lifeline, ended them
    finally:
        master.kill()
        master.wait(10)
    # Its ssh clients end too (a multiplexing master once idle for ControlPersist seconds).
    assert wait_until(lambda: _gone(clients), 20), "the master's ssh clients lingered"
    assert wait_until(lambda: sum(ssh_sessions(sshlab, h) for h in sshlab.hosts) == 0, 10)


# -- a host lost mid-call (last: restarting sshd gives host b a fresh /dev/shm) --------------
def test_sshd_and_worker_killed_mid_call(sshlab):
    _, b = sshlab.hosts
    [pid] = add(sshlab, [b.spec])
    ospid = PGRP.workers[pid].ospid
    box = pd.Future()
    fut = pd.remotecall(running, pid, box, 30)
    assert box.fetch(timeout=20) == pid
    try:
        sshlab.kill_sshd(b)
        os.kill(ospid, signal.SIGKILL)   # the worker dies on its host
        started = time.monotonic()
        with pytest.raises(pd.ProcessExitedException):
            fut.fetch(timeout=20)
        assert time.monotonic() - started < 10
        with pytest.raises(pd.ProcessExitedException):
            pd.remotecall_fetch(pd.myid, pid)
        assert pid not in pd.workers()
    finally:
        sshlab.start_sshd(b)
    assert_hosts_clean(sshlab)
    assert wait_until(lambda: ssh_sessions(sshlab, b) == 0, 10)


# -- machine specs ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ("node1", ("node1", None, None, None, None, 1)),
    ("alice@node1:2222", ("node1", "alice", 2222, None, None, 1)),
    ("10.0.0.5 10.1.0.5", ("10.0.0.5", None, None, "10.1.0.5", None, 1)),
    ("bob@[::1]:22 [fd00::5]:9000", ("::1", "bob", 22, "fd00::5", 9000, 1)),
    (("n.example.org", 3), ("n.example.org", None, None, None, None, 3)),
    (("n2", "auto"), ("n2", None, None, None, None, "auto")),
])
def test_machine_specs_parse(spec, expected):
    m = parse_machine(spec)
    assert (m.host, m.user, m.port, m.bind_addr, m.bind_port, m.count) == expected


@pytest.mark.parametrize("spec", [
    "", "   ", "a b c", "user@", "@host", "host:", "host:99999", "host:0", "host:ssh",
    "-oProxyCommand=touch", "user@-oProxyCommand=x", "-l@host", "a/b", "host bind:port",
    "[::1", "::1", ("host", 0), ("host", -1), ("host", "many"), ("host", True),
    ("host",), ("host", 1, 2),
])
def test_bad_machine_specs_are_value_errors(spec):
    with pytest.raises(ValueError, match="machine|count|spec"):
        SSHManager([spec])
    with pytest.raises(ValueError):
        pd.addprocs([spec])


def test_bad_machine_types():
    with pytest.raises(TypeError):
        SSHManager([42])
    with pytest.raises(TypeError):
        SSHManager("host")
    with pytest.raises(ValueError):
        SSHManager([])


def test_bad_parameters(sshlab):
    a, _ = sshlab.hosts
    for kw, word in (({"shell": "csh"}, "shell"), ({"transport": "shm"}, "shm"),
                     ({"max_parallel": 0}, "max_parallel"), ({"lease": -1}, "lease"),
                     ({"env": {"NOT-A-NAME": "x"}}, "NOT-A-NAME")):
        with pytest.raises((ValueError, LaunchError), match=word):
            add(sshlab, [a.spec], **kw)
    with pytest.raises(TypeError, match="no_such_option"):
        add(sshlab, [a.spec], no_such_option=1)
    assert_hosts_clean(sshlab)
