"""Large frames over shared memory skip the ring: one copy into a pooled segment the receiver
maps, handed back when the received frame's last view dies. Hostile descriptors break the
connection without mapping anything they name."""
from __future__ import annotations

import gc
import os
import random
import threading

import pytest

from pydist import transport
from pydist.wire import codec
from pydist.errors import TransportBroken
from pydist.shm import bigbuf, segment as seg
from pydist.shm import transport as shm

from testkit import shm_entries

BIG = 3 << 20


def make_pair():
    a, b = shm.shm_pair(4 << 20)  # room for any frame under the threshold: no reader needed
    a.max_frame = b.max_frame = transport.DEFAULT_MAX_FRAME
    return a, b


@pytest.fixture
def pair(leak_oracle):
    a, b = make_pair()
    yield a, b
    a.close()
    b.close()


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_a_large_frame_lands_in_the_senders_segment_and_goes_back_when_dropped(pair):
    a, b = pair
    a.send_frame([payload(BIG, 1)])
    first = b.recv_frame()
    assert bytes(first) == payload(BIG, 1) and not first.readonly
    assert a._big_out.stats() == (1, BIG)
    assert not shm_entries() - {n for n in shm_entries() if n.startswith("sem.")}, \
        "the receiver unlinks a segment's name as soon as it has opened it"
    a.send_frame([payload(BIG, 2)])          # the first is still held: a second segment
    second = b.recv_frame()
    assert a._big_out.stats()[0] == 2 and bytes(first) == payload(BIG, 1)
    del first, second
    gc.collect()
    for seed in range(3, 6):                 # given back: the two serve again, no third
        a.send_frame([payload(BIG, seed)])
        assert bytes(b.recv_frame()) == payload(BIG, seed)
    assert a._big_out.stats()[0] == 2


def test_small_frames_and_a_disabled_threshold_use_the_ring(pair, monkeypatch):
    a, b = pair
    a.send_frame([payload(bigbuf.THRESHOLD - 1, 1)])
    assert bytes(b.recv_frame()) == payload(bigbuf.THRESHOLD - 1, 1)
    assert a._big_out.stats() == (0, 0)
    monkeypatch.setenv("PYDIST_SHM_BIGBUF", "0")
    c, d = make_pair()
    try:
        c.send_frame([payload(BIG, 2)])
        assert bytes(d.recv_frame()) == payload(BIG, 2) and c._big_out.stats() == (0, 0)
    finally:
        c.close()
        d.close()


def test_frames_sent_just_before_a_clean_close_are_still_read(leak_oracle):
    a, b = make_pair()
    try:
        for seed in range(3):
            a.send_frame([payload(BIG, seed)])
        closing = threading.Thread(target=a.close)
        closing.start()
        for seed in range(3):
            assert bytes(b.recv_frame()) == payload(BIG, seed)
        closing.join(10)
        assert not closing.is_alive()
    finally:
        a.abort()
        b.close()


def forge(a, name: str, cap: int, length: int) -> None:
    """Write a descriptor straight into ``a``'s ring, as a hostile peer would."""
    desc = struct_desc(name, cap, length)
    a._tx.write([codec.FRAME_HEADER.pack(bigbuf.FLAG | len(desc)), desc])
    a._tx.flush()


def struct_desc(name: str, cap: int, length: int) -> bytes:
    return bigbuf._DESC.pack(name.encode(), cap, length)


def other_owners_segment() -> seg.Segment:
    s = seg.Segment.create(bigbuf.HEADER + (1 << 20), [])
    os.chown("/dev/shm/" + s.name.lstrip("/"), 65534, 65534)
    return s


@pytest.mark.parametrize("case", ["forged name", "not ours", "another owner", "size lies",
                                  "over the limit"])
def test_hostile_descriptors_break_the_connection(case, leak_oracle):
    a, b = make_pair()
    made = None
    try:
        if case == "forged name":
            forge(a, "/etc/passwd", 1 << 20, 10)
        elif case == "not ours":
            forge(a, seg.new_name(), 1 << 20, 10)      # a pydist name that names nothing
        elif case == "another owner":
            made = other_owners_segment()
            forge(a, made.name, 1 << 20, 10)
        elif case == "size lies":
            made = seg.Segment.create(bigbuf.HEADER + (1 << 20), [])
            forge(a, made.name, 64 << 20, 10)          # bigger than the segment is
        else:
            b.max_frame = 1 << 20
            forge(a, seg.new_name(), 4 << 20, 2 << 20)
        match = {"forged name": "not a pydist segment", "not ours": "is gone",
                 "another owner": "owned by uid 65534", "size lies": "promised",
                 "over the limit": "over the limit"}[case]
        with pytest.raises(TransportBroken, match=match):
            b.recv_frame()
        assert b.closed
    finally:
        if made is not None:
            made.unlink()
            made.close()
        a.abort()
        b.abort()
