"""Channel and RemoteChannel: FIFO order, rendezvous, closing, timeouts, from any process."""
from __future__ import annotations

import math
import threading
import time

import pytest

import pydist as pd


def test_channel_sizes_and_errors():
    with pytest.raises(ValueError, match="-1"):
        pd.Channel(-1)
    with pytest.raises(TypeError):
        pd.Channel("3")
    with pytest.raises(ValueError):
        pd.Channel(2.5)
    assert pd.Channel(math.inf).size == math.inf


def test_buffered_channel_is_fifo_and_blocks_when_full():
    c = pd.Channel(2)
    c.put(1)
    c.put(2)
    assert c.isready() and c.fetch() == 1 and len(c) == 2
    with pytest.raises(TimeoutError):
        c.put(3, timeout=0.1)
    assert [c.take(), c.take()] == [1, 2]
    with pytest.raises(TimeoutError):
        c.take(timeout=0.1)
    assert not c.isready()


def test_unbounded_channel_never_blocks_a_put():
    c = pd.Channel(math.inf)
    for i in range(10_000):
        c.put(i)
    assert [c.take() for _ in range(10_000)] == list(range(10_000))


def test_rendezvous_put_waits_for_a_taker():
    c = pd.Channel(0)
    with pytest.raises(TimeoutError):
        c.put("x", timeout=0.1)                  # nobody takes: put times out ...
    assert not c.isready()                       # ... and the value is withdrawn
    taken = []
    t = threading.Thread(target=lambda: (time.sleep(0.2), taken.append(c.take(timeout=5))))
    t.start()
    t0 = time.monotonic()
    c.put("y", timeout=5)
    assert time.monotonic() - t0 >= 0.15
    t.join(5)
    assert taken == ["y"]


def test_closed_channel():
    c = pd.Channel(3)
    c.put(1)
    pd.close(c)
    pd.close(c)                                   # idempotent
    with pytest.raises(pd.InvalidStateException):
        c.put(2)
    assert c.take() == 1                          # items put before closing still come out
    with pytest.raises(pd.InvalidStateException):
        c.take()
    with pytest.raises(pd.InvalidStateException):
        c.fetch()


def test_close_wakes_a_blocked_taker():
    c = pd.Channel(1)
    errors = []

    def taker():
        try:
            c.take(timeout=10)
        except pd.InvalidStateException as e:
            errors.append(e)
    t = threading.Thread(target=taker)
    t.start()
    time.sleep(0.1)
    c.close()
    t.join(5)
    assert len(errors) == 1


def test_remote_channel_on_a_worker(cluster):
    a, _ = cluster
    rc = pd.RemoteChannel(lambda: pd.Channel(10), a)
    assert rc.where == a and not rc.isready()
    rc.put(5)
    assert pd.isready(rc) and pd.fetch(rc) == 5 and pd.take(rc) == 5
    with pytest.raises(TimeoutError):
        rc.take(timeout=0.2)
    rc.put(6)
    assert rc.take(timeout=5) == 6               # the timed-out take lost nothing


def test_remote_channel_default_is_a_one_item_channel(cluster):
    a, _ = cluster
    rc = pd.RemoteChannel(pid=a)
    rc.put(1)
    with pytest.raises(TimeoutError):
        rc.put(2, timeout=0.2)
    assert rc.take() == 1


def test_remote_channel_closed(cluster):
    a, _ = cluster
    rc = pd.RemoteChannel(lambda: pd.Channel(2), a)
    rc.put(1)
    rc.close()
    with pytest.raises(pd.InvalidStateException):
        rc.put(2)
    assert rc.take() == 1
    with pytest.raises(pd.InvalidStateException):
        rc.take()


def producer(ch, n):
    for i in range(n):
        ch.put(i)
    ch.put(None)


def consumer(ch):
    out = []
    while (x := ch.take()) is not None:
        out.append(x)
    return out


def test_producer_and_consumer_on_two_workers(cluster):
    a, b = cluster
    n = 100_000
    rc = pd.RemoteChannel(lambda: pd.Channel(1000), a)
    made = pd.remotecall(producer, a, rc, n)
    got = pd.remotecall(consumer, b, rc)
    assert got.fetch(timeout=120) == list(range(n))
    made.wait(timeout=10)


def test_rendezvous_through_a_remote_channel(cluster):
    a, b = cluster
    rc = pd.RemoteChannel(lambda: pd.Channel(0), a)
    taker = pd.remotecall(lambda ch: (time.sleep(0.3), ch.take())[1], b, rc)
    t0 = time.monotonic()
    rc.put("handed over")
    assert time.monotonic() - t0 >= 0.25
    assert taker.fetch(timeout=10) == "handed over"


def test_master_owned_remote_channel_used_by_workers(cluster):
    a, b = cluster
    rc = pd.RemoteChannel(lambda: pd.Channel(100))
    assert rc.where == 1
    pd.remotecall_wait(lambda ch: [ch.put(pd.myid()) for _ in range(3)], a, rc)
    pd.remotecall_wait(lambda ch: [ch.put(pd.myid()) for _ in range(3)], b, rc)
    assert sorted(rc.take() for _ in range(6)) == [a] * 3 + [b] * 3


def test_channel_from_id_and_remoteref_id(cluster):
    a, _ = cluster
    rc = pd.RemoteChannel(lambda: pd.Channel(4), a)
    rrid = pd.remoteref_id(rc)
    assert rrid.whence == 1
    assert pd.remotecall_fetch(lambda r: repr(pd.channel_from_id(r)).startswith("Channel"), a, rrid)
    with pytest.raises(ValueError):
        pd.channel_from_id(rrid)                 # it lives on a, not here


def test_a_factory_must_make_a_channel(cluster):
    with pytest.raises(pd.RemoteException):
        pd.RemoteChannel(lambda: 42, cluster[0])


def test_dropped_remote_channels_are_freed(cluster):
    a, _ = cluster
    from test_future import count_refs
    from testkit import wait_until
    base = pd.remotecall_fetch(count_refs, a)
    chans = [pd.RemoteChannel(pid=a) for _ in range(50)]
    assert pd.remotecall_fetch(count_refs, a) >= 50
    del chans
    assert wait_until(lambda: pd.remotecall_fetch(count_refs, a) <= base, 10)
