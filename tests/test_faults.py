"""Faults: a worker killed mid-call, the master killed, intruders without the cookie."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
from testkit import subprocess_env, wait_until

import pydist as pd


def test_sigkill_mid_call_reaches_every_waiter_within_a_second(fresh):
    a, b = fresh(2)
    ospid = pd.remotecall_fetch(os.getpid, a)
    held = pd.remotecall(time.sleep, a, 30)
    gate = pd.Future(a)
    waiting = pd.remotecall(lambda g: g.fetch(), b, gate)       # b waits on a ref owned by a
    time.sleep(0.2)
    t0 = time.monotonic()
    os.kill(ospid, signal.SIGKILL)
    with pytest.raises(pd.ProcessExitedException) as info:
        held.fetch(timeout=10)
    assert time.monotonic() - t0 < 1.0
    assert info.value.worker_id == a and "SIGKILL" in str(info.value)
    with pytest.raises(pd.ProcessExitedException):
        pd.remotecall_fetch(pd.myid, a)
    with pytest.raises(pd.ProcessExitedException):
        gate.fetch(timeout=10)
    with pytest.raises(pd.RemoteException) as info2:      # b's call failed on a dead owner
        waiting.fetch(timeout=10)
    assert isinstance(info2.value.captured.ex, pd.ProcessExitedException)
    assert a not in pd.workers() and b in pd.workers()
    assert pd.remotecall_fetch(pd.myid, b) == b


def _exited(ospid: int) -> bool:
    try:
        return psutil.Process(ospid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _send_until_it_fails(pid: int) -> BaseException | None:
    """Send calls to ``pid`` (dead) until a send fails: that error (over TCP the first send
    may still be taken)."""
    for _ in range(100):
        try:
            pd.remotecall(int, pid, 1)
        except Exception as e:
            return e
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("sender", ["main", "reader"])
def test_answers_sent_just_before_a_death_reach_their_waiters(fresh, sender):
    """A worker answers, then exits before the master has read the answers (its reader is
    held in a callback meanwhile), and a send is the first to fail, from another thread or
    from the reader itself: the answers still reach their waiters, and the send raises
    ProcessExitedException."""
    (a,) = fresh(1)
    ospid = pd.remotecall_fetch(os.getpid, a)
    on_reader, failed = [], []

    def hold(_f) -> None:    # runs on the thread that reads a's connection
        on_reader.append(threading.current_thread().name)
        wait_until(lambda: _exited(ospid), 10)
        if sender == "reader":
            time.sleep(0.05)
            failed.append(_send_until_it_fails(a))
        else:
            time.sleep(0.25)      # the main thread's send fails meanwhile
    pd.remotecall(int, a, 0).add_done_callback(hold)   # its answer comes first
    answered = [pd.remotecall(lambda i: time.sleep(0.15) or i, a, i) for i in range(3)]
    for f in answered:
        f.add_done_callback(lambda f: None)   # fetched as soon as ready
    pd.remote_do(lambda: time.sleep(0.4) or os._exit(0), a)
    assert wait_until(lambda: _exited(ospid), 10)
    if sender == "main":
        time.sleep(0.05)
        failed.append(_send_until_it_fails(a))
    assert wait_until(lambda: failed, 10)
    assert isinstance(failed[0], pd.ProcessExitedException), failed
    assert [f.result(timeout=10) for f in answered] == [0, 1, 2]
    assert on_reader and on_reader[0] != "MainThread"
    assert wait_until(lambda: a not in pd.workers(), 10)


def _cut_and_stop() -> None:
    """On a worker, in a call: end its connection to the master, then stop (not exit) this
    process."""
    from pydist.cluster.group import PGRP
    time.sleep(0.3)         # the master waits for the call by then
    PGRP.workers[1].transport.abort()
    os.kill(os.getpid(), signal.SIGSTOP)


def test_a_waiter_with_a_timeout_gets_the_death_not_a_timeout(fresh):
    """A worker's connection ends while its process has not exited (stopped): the master
    takes a while to say how it ended. A fetch with a timeout that sees the end meanwhile
    waits for that verdict, ProcessExitedException, instead of raising TimeoutError."""
    (a,) = fresh(1)
    ospid = pd.remotecall_fetch(os.getpid, a)
    try:
        held = pd.remotecall(_cut_and_stop, a)
        with pytest.raises(pd.ProcessExitedException):
            held.fetch(timeout=10)
    finally:
        try:
            os.kill(ospid, signal.SIGKILL)
        except ProcessLookupError:    # it saw its master's end first, and exited
            pass


def test_process_exited_is_a_broken_process_pool():
    from concurrent.futures.process import BrokenProcessPool
    assert issubclass(pd.ProcessExitedException, BrokenProcessPool)


def test_worker_exit_inside_a_call(fresh):
    (a,) = fresh(1)
    with pytest.raises(pd.ProcessExitedException):
        pd.remotecall_fetch(os._exit, a, 3)
    assert a not in pd.workers()


MASTER = textwrap.dedent("""
    import os, sys, time
    import pydist as pd
    w = pd.addprocs(2, transport=sys.argv[1])
    print(" ".join(str(pd.remotecall_fetch(os.getpid, p)) for p in w), flush=True)
    time.sleep(60)
""")


def test_master_sigkill_leaves_no_worker(transport, tmp_path):
    script = tmp_path / "master.py"
    script.write_text(MASTER)
    master = subprocess.Popen([sys.executable, str(script), transport], stdout=subprocess.PIPE,
                              text=True, start_new_session=True, env=subprocess_env())
    try:
        line = master.stdout.readline()
        ospids = [int(x) for x in line.split()]
        assert len(ospids) == 2, f"the master printed {line!r}"
        master.kill()
        master.wait(10)

        def gone() -> bool:
            return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
                       for p in ospids)
        assert wait_until(gone, 5), "workers outlived their master by five seconds"
    finally:
        if master.poll() is None:
            master.kill()
            master.wait(10)


def start_standalone_worker(cookie: str) -> tuple[subprocess.Popen, list[str]]:
    """A ``pydist-worker`` started by hand, with ``cookie`` on its stdin."""
    from pydist.managers.base import parse_contact_line
    proc = subprocess.Popen([sys.executable, "-m", "pydist.worker", "--lifeline"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env=subprocess_env())
    proc.stdin.write(cookie + "\n")
    proc.stdin.flush()
    for _ in range(20):              # a few notices may come before the contact line
        line = proc.stdout.readline()
        addresses = parse_contact_line(line)
        if addresses or not line:
            break
    assert addresses, f"no contact line: {line!r}"
    return proc, list(addresses)


def test_wrong_cookie_is_refused_before_anything_is_unpickled(tmp_path):
    from pydist import transport
    from pydist.cluster.join import authenticate
    from pydist.errors import AuthenticationError, TransportError
    from pydist.wire.codec import encode_message
    from pydist.wire.messages import NULL_HEADER, RemoteDoMsg
    canary = tmp_path / "canary"
    proc, addresses = start_standalone_worker("right-cookie-0123456789")
    try:
        tcp = next(a for a in addresses if a.startswith("tcp://"))
        for wrong in ("wrong-cookie-0123456789", "", "right-cookie-012345678", "right-cookie-01234567890"):
            t = transport.connect(tcp, 5)
            with pytest.raises(AuthenticationError):
                authenticate(t, wrong, "dial", timeout=5)
            t.abort()
        # A raw pickle with no hello at all: it must never be unpickled.
        t = transport.connect(tcp, 5)
        t.max_frame = 1 << 30
        payload = encode_message(NULL_HEADER, RemoteDoMsg(canary.touch, (), {}))
        try:
            t.send_frame(payload)
            t.recv_frame()
        except TransportError:
            pass
        t.abort()
        time.sleep(0.3)
        assert not canary.exists()
        assert proc.poll() is None          # the worker is still up, waiting for its master
    finally:
        proc.kill()
        proc.wait(10)


def test_standalone_worker_exits_when_its_lifeline_closes():
    proc, _ = start_standalone_worker("some-cookie-0123456789")
    proc.stdin.close()
    assert proc.wait(5) == 0
