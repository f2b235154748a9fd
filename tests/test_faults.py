"""Faults: a worker killed mid-call, the master killed, intruders without the cookie."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import pydist as pd
from testkit import subprocess_env, wait_until


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
    from pydist.wire.codec import encode_message
    from pydist.errors import AuthenticationError, TransportError
    from pydist.cluster.join import authenticate
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
