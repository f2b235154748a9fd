"""Deadlines on the hello and the join: one keeper thread for all, and a silent peer is cut
off when its deadline passes."""
from __future__ import annotations

import threading
import time

import pytest
from testkit import wait_until

from pydist import transport as _transport
from pydist.cluster import deadlines
from pydist.cluster.join import authenticate
from pydist.errors import AuthenticationError
from pydist.net.address import format_tcp_url

STEP = 10.0


def test_deadlines_fire_in_order_from_one_thread_that_ends_when_none_is_left():
    fired: list[int] = []
    done = threading.Event()
    before = threading.active_count()
    marks = [deadlines.after(0.05 * (5 - i), lambda i=i: fired.append(i)) for i in range(5)]
    dropped = deadlines.after(0.01, lambda: fired.append(-1))
    dropped.cancel()
    last = deadlines.after(0.3, done.set)
    assert threading.active_count() <= before + 1        # one keeper, not a thread each
    assert done.wait(STEP)
    assert fired == [4, 3, 2, 1, 0]
    assert all(m.expired() for m in marks) and last.expired() and not dropped.expired()
    long = deadlines.after(3600, lambda: None)
    time.sleep(0.1)         # (the keeper now waits for it)
    long.cancel()           # nothing pending: the keeper ends soon, not in an hour
    assert wait_until(lambda: not any(t.name == "pydist-deadlines"
                                      for t in threading.enumerate()), STEP)


def _listen(scheme: str):
    return _transport.listen(format_tcp_url("127.0.0.1", 0) if scheme == "tcp" else f"{scheme}://")


def test_a_silent_peer_fails_the_hello_when_its_deadline_passes(transport):
    listener = _listen(transport)
    accepted: list = []
    acceptor = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    acceptor.start()
    t = _transport.connect(listener.address, STEP)
    try:
        t0 = time.monotonic()
        with pytest.raises(AuthenticationError, match="timed out"):
            authenticate(t, "a" * 32, "dial", timeout=0.3)    # the other end never answers
        assert 0.25 <= time.monotonic() - t0 < STEP
    finally:
        t.abort()
        acceptor.join(STEP)
        for a in accepted:
            a.abort()
        listener.close()
