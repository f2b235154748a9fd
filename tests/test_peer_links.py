"""Worker-to-worker connections while workers come and go: a call between two live workers
never fails with the death of one of them, and a removed worker's calls report its own end,
never that of the peer they were waiting on."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import pydist as pd
from pydist import transport as pd_transport
from pydist.cluster.group import PGRP
from pydist.cluster.join import authenticate
from pydist.cluster.peers import choose_address
from pydist.errors import TransportError
from pydist.wire.codec import encode_message
from pydist.wire.messages import NULL_HEADER, IdentifySocketMsg

pytestmark = pytest.mark.timeout(180)


def tiny(x: int) -> int:
    return x + 1


def relay(peer: int, x: int) -> int:
    return pd.remotecall_fetch(tiny, peer, x)


def relay_len(peer: int, n: int) -> int:
    return pd.remotecall_fetch(len, peer, bytes(n))


def test_a_removed_worker_reports_its_own_end_not_its_slow_peers(fresh):
    (b,) = fresh(1)
    (a,) = fresh(1)     # a joined after b: a dials b, and closes b's connection first at exit
    assert pd.remotecall_fetch(relay_len, a, b, 10) == 10
    b_os = pd.remotecall_fetch(os.getpid, b)
    os.kill(b_os, signal.SIGSTOP)   # b is slow (stopped), not dead
    try:
        # a sends b a large argument that b does not read while stopped, and waits for it
        f = pd.remotecall(relay_len, a, b, 4 << 20)
        time.sleep(0.5)
        pd.rmprocs(a, waitfor=30)
        with pytest.raises(pd.ProcessExitedException) as info:
            f.fetch(timeout=30)
        assert info.value.worker_id == a, info.value
    finally:
        os.kill(b_os, signal.SIGCONT)
    assert pd.remotecall_fetch(tiny, b, 1) == 2   # b lives on


def test_a_fetch_with_a_timeout_raises_the_death_not_a_timeout(fresh):
    a, b = fresh(2)     # a's link to b is made after its master's: a closes its master first
    assert pd.remotecall_fetch(relay_len, a, b, 10) == 10
    b_os = pd.remotecall_fetch(os.getpid, b)
    os.kill(b_os, signal.SIGSTOP)   # a's exit then lingers closing b's link (after its master's)
    try:
        f = pd.remotecall(relay_len, a, b, 4 << 20)
        time.sleep(0.5)
        removal = pd.rmprocs(a, waitfor=0)
        with pytest.raises(pd.ProcessExitedException) as info:
            f.fetch(timeout=30)
        assert info.value.worker_id == a, info.value
    finally:
        os.kill(b_os, signal.SIGCONT)
    removal.wait(timeout=60)
    assert pd.remotecall_fetch(tiny, b, 1) == 2


def _named(exc: BaseException) -> int | None:
    """The worker a ProcessExitedException names (bare or inside a RemoteException)."""
    inner = exc.captured.ex if isinstance(exc, pd.RemoteException) else exc
    return inner.worker_id if isinstance(inner, pd.ProcessExitedException) else None


@pytest.mark.parametrize("rounds", [12])
def test_first_calls_both_ways_with_a_removal_name_only_the_removed(transport, leak_oracle, rounds):
    # Lazy connections are made by these very calls, both ways at once between each pair;
    # one worker is removed meanwhile. Every call between live workers gets its value; a
    # call that fails names the removed worker, and none waits out the 30 s connect timeout.
    for r in range(rounds):
        ws = pd.addprocs(4, transport=transport)
        gone, removal = ws[r % 4], None
        try:
            pairs = [(a, b) for a in ws for b in ws if a != b] * 2
            calls = [(a, b, x, pd.remotecall(relay, a, b, x)) for x, (a, b) in enumerate(pairs)]
            time.sleep(0.002 * r)
            removal = pd.rmprocs(gone, waitfor=0)
            for a, b, x, f in calls:
                try:
                    assert f.fetch(timeout=20) == x + 1
                except pd.ProcessExitedException as e:
                    assert _named(e) == gone, (r, a, b, gone, e)
                except pd.RemoteException as e:
                    assert _named(e) == gone and a != gone, (r, a, b, gone, e)
        finally:
            if removal is not None:
                removal.wait(timeout=60)   # the removal's ladder may take its 7 s
            pd.rmprocs(*[w for w in ws if w in pd.workers()], waitfor=30)


def _heard_gone(pid: int) -> bool:
    """Whether this worker has heard that ``pid`` is gone."""
    try:
        return pd.worker_state(pid) == pd.WorkerState.W_TERMINATED
    except ValueError:   # never heard of it at all
        return False


def test_a_dial_from_a_worker_said_gone_is_refused(fresh, transport):
    # A removed worker may still dial a peer while it exits, after the master has told that
    # peer it is gone. The peer must refuse it and keep no record of it: a record made then
    # looked alive, and a later call to that worker waited out the 30 s connect timeout for
    # a dial that never came. Here the test process dials in the removed worker's name.
    a, gone = fresh(2)
    pd.rmprocs(gone, waitfor=30)
    deadline = time.monotonic() + 10
    while not pd.remotecall_fetch(_heard_gone, a, gone):
        assert time.monotonic() < deadline, f"worker {a} never heard that {gone} is gone"
        time.sleep(0.02)
    t = pd_transport.connect(choose_address(PGRP.workers[a].addresses, transport), 10)
    timer = threading.Timer(10, t.abort)
    timer.start()
    try:
        authenticate(t, pd.cluster_cookie(), "dial")
        t.send_frame(encode_message(NULL_HEADER, IdentifySocketMsg(gone)))
        with pytest.raises(TransportError):
            t.recv_frame()   # no IdentifySocketAckMsg: the worker hangs up
        assert timer.is_alive(), "the worker neither answered nor hung up within 10 s"
        f = pd.remotecall(relay, a, gone, 1)
        with pytest.raises(pd.RemoteException) as info:
            f.fetch(timeout=20)
        assert _named(info.value) == gone, info.value
    finally:
        timer.cancel()
        t.abort()
