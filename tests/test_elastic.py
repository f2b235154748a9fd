"""``ElasticManager``: workers started by a plain command join the master as they come.

On loopback everywhere; once more in a namespace of the Slurm lab (a "node" of its own,
reached over the lab's bridge), where root and the packages allow it."""
from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import textwrap
import time

import pytest
from slurmlab import SlurmLab, _processes_in_netns
from testkit import wait_until

import pydist as pd
from pydist import transport as _transport
from pydist.errors import TransportError
from pydist.wire.codec import Handshake


def _start(em: pd.ElasticManager, cookie: str, transport: str = "shm",
           cookie_file: str | None = None) -> subprocess.Popen:
    """A worker by the command ``em`` gives, the cookie on its standard input (or a file)."""
    argv = shlex.split(em.worker_command(cookie_file=cookie_file))
    if transport == "tcp":
        argv += ["--transports", "tcp"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    if cookie_file is None:
        proc.stdin.write((cookie + "\n").encode())
    proc.stdin.close()
    return proc


@pytest.fixture
def em(leak_oracle):
    manager = pd.ElasticManager("127.0.0.1", 0)
    started: list[subprocess.Popen] = []
    yield manager, started
    alive = [p for p in pd.workers() if p != 1]
    if alive:
        pd.rmprocs(alive, waitfor=30)
    manager.close()
    for proc in started:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()


def test_workers_join_as_they_come_compute_and_leave(em, transport):
    manager, started = em
    cookie = pd.cluster_cookie()
    started.append(_start(manager, cookie, transport))
    assert wait_until(lambda: len(pd.workers()) == 1 and pd.workers() != [1], 30), \
        "the first worker did not appear in workers() on its own"
    started.append(_start(manager, cookie, transport))
    pids = pd.addprocs(manager, 2, timeout=30)
    assert sorted(pids) == pd.workers()
    assert pd.remotecall_fetch(lambda x: x * 2, pids[0], 21) == 42
    assert pd.remotecall_fetch(lambda q: pd.remotecall_fetch(pd.myid, q), pids[1], pids[0]) == pids[0]
    assert {pd.remotecall_fetch(os.getpid, p) for p in pids} == {p.pid for p in started}
    pd.rmprocs(pids, waitfor=30)
    assert [p.wait(15) for p in started] == [0, 0]
    assert pd.workers() == [1]


def test_a_cookie_file_only_its_owner_reads(em, tmp_path):
    manager, started = em
    path = str(tmp_path / "cookie")
    manager.write_cookie_file(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    started.append(_start(manager, "", cookie_file=path))
    [pid] = pd.addprocs(manager, 1, timeout=30)
    assert pd.remotecall_fetch(pd.myid, pid) == pid
    os.chmod(path, 0o644)
    loose = _start(manager, "", cookie_file=path)
    started.append(loose)
    assert loose.wait(30) != 0
    assert b"chmod 600" in loose.stdout.read()
    assert pd.workers() == [pid]


def test_a_wrong_cookie_is_refused_and_nothing_is_unpickled(em, tmp_path):
    manager, started = em
    wrong = _start(manager, "not-the-cookie")
    started.append(wrong)
    assert wrong.wait(30) != 0
    assert b"refused" in wrong.stdout.read()
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Touch(str(marker)))
    # A peer that knows no cookie and sends a pickle at once, and one that sends it after
    # a hello with a wrong cookie: the master must read neither.
    raw = _transport.connect(f"tcp://{manager.address}", 5)
    _send_quietly(raw, evil)
    hello = _transport.connect(f"tcp://{manager.address}", 5)
    hs = Handshake("not-the-cookie", "accept")
    hello.send_frame([hs.first_frame()])
    hello.send_frame([hs.receive(hello.recv_frame())])
    _send_quietly(hello, evil)
    for t in (raw, hello):
        with pytest.raises(TransportError):
            for _ in range(3):   # the master's hello frames, then its close
                t.recv_frame()
        t.close()
    time.sleep(0.5)
    assert not marker.exists()
    assert pd.workers() == [1]
    started.append(_start(manager, pd.cluster_cookie()))   # the right cookie still joins
    assert len(pd.addprocs(manager, 1, timeout=30)) == 1


class _Touch:
    """Creates a file when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _send_quietly(t, frame: bytes) -> None:
    try:
        t.send_frame([frame])
    except Exception:
        pass   # the master may have closed it already


def test_waiting_for_workers_that_do_not_come_times_out(em):
    manager, _ = em
    t = time.monotonic()
    with pytest.raises(pd.LaunchError, match=r"0 of 2 workers joined within 0.5 s.*--connect"):
        pd.addprocs(manager, 2, timeout=0.5)
    assert time.monotonic() - t < 5
    with pytest.raises(TypeError, match="ElasticManager"):
        pd.addprocs(pd.LocalManager(1), 2)
    with pytest.raises(ValueError, match="port"):
        pd.ElasticManager("127.0.0.1", 70000)
    with pytest.raises(ValueError, match="cannot dial '0.0.0.0'"):
        pd.ElasticManager("0.0.0.0", 0)


def test_idle_connections_cannot_lock_a_worker_out(em):
    manager, started = em
    idle = [_transport.connect(f"tcp://{manager.address}", 5) for _ in range(80)]
    try:
        started.append(_start(manager, pd.cluster_cookie()))
        assert len(pd.addprocs(manager, 1, timeout=30)) == 1
    finally:
        for t in idle:
            t.close()


# -- in the Slurm lab: a worker on another "host" ----------------------------------------
@pytest.fixture(scope="module")
def lab():
    ok, reason = SlurmLab.available()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the lab tests: {reason}")
        pytest.skip(reason)
    with SlurmLab() as lab:
        yield lab


def test_a_worker_started_by_hand_on_another_node_joins(lab, tmp_path):
    script = tmp_path / "master.py"
    script.write_text(textwrap.dedent(f"""
        import json, shlex, subprocess
        import pydist as pd
        em = pd.ElasticManager({lab.ctl_addr!r}, 0)
        argv = {lab.node_argv(0, [])!r} + shlex.split(em.worker_command())
        worker = subprocess.Popen(argv, stdin=subprocess.PIPE)
        worker.stdin.write((pd.cluster_cookie() + "\\n").encode())
        worker.stdin.close()
        [pid] = pd.addprocs(em, 1, timeout=60)
        listens = list(pd.cluster.group.PGRP.workers[pid].config.addresses)
        peer = pd.remotecall_fetch(lambda: pd.cluster.group.PGRP.workers[1].transport.peer, pid)
        total = pd.remotecall_fetch(sum, pid, range(1000))
        pd.rmprocs(pid, waitfor=30)
        print("RESULT " + json.dumps(dict(listens=listens, peer=peer, total=total,
                                          code=worker.wait(15), workers=pd.workers())))
        """))
    done = lab.client([lab.python, str(script)], timeout=120, check=False)
    lines = [x[7:] for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr
    out = json.loads(lines[0])
    assert out["peer"].startswith(f"tcp://{lab.ctl_addr}:")   # it dialed across the bridge
    assert out["total"] == 499500 and out["code"] == 0 and out["workers"] == [1]
    assert out["listens"][0].startswith(f"tcp://{lab.nodes[0][1]}:")   # on the node's address
    assert [p for p in _processes_in_netns(lab.nodes[0][2]) if b"pydist.worker" in _cmdline(p)] == []


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
