"""Large frames over shared memory skip the ring: one copy into a pooled segment the receiver
maps, handed back when the received frame's last view dies. Hostile descriptors break the
connection without mapping anything they name."""
from __future__ import annotations

import gc
import os
import random
import threading

import pytest
from testkit import shm_entries, wait_until

from pydist import transport
from pydist.errors import TransportBroken
from pydist.shm import bigbuf
from pydist.shm import segment as seg
from pydist.shm import transport as shm
from pydist.wire import codec

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
    assert not names(a) & shm_entries(), \
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


def names(end) -> set[str]:
    """The names of the segments in ``end``'s sending pool, as /dev/shm lists them."""
    return {o.segment.name.lstrip("/") for o in end._big_out._pool}


def test_the_first_large_frame_has_the_receiver_ready_a_segment_for_its_answer(pair):
    a, b = pair
    got = []
    a.send_frame([payload(BIG, 1)])
    assert bytes(b.recv_frame()) == payload(BIG, 1)
    assert wait_until(lambda: b._big_out.stats() == (1, BIG), 10), b._big_out.stats()
    reader = threading.Thread(target=lambda: got.append(bytes(a.recv_frame())))
    reader.start()
    # Announced: the sender of the first frame opens it (and removes its name) at once.
    assert wait_until(lambda: not names(b) & shm_entries(), 10), names(b)
    assert reader.is_alive() and not got      # a notice is not a frame
    b.send_frame([payload(BIG, 2)])
    reader.join(10)
    assert got == [payload(BIG, 2)]
    assert b._big_out.stats() == (1, BIG)     # the answer went in the segment made ahead
    assert a._big_out.stats() == (1, BIG)     # and the hint went one way only


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
                                  "over the limit", "announced, another owner",
                                  "bytes in no segment"])
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
        elif case == "announced, another owner":
            made = other_owners_segment()
            forge(a, made.name, 1 << 20, 0)            # "open this one now"
        elif case == "bytes in no segment":
            forge(a, "", 1 << 20, 10)
        else:
            b.max_frame = 1 << 20
            forge(a, seg.new_name(), 4 << 20, 2 << 20)
        match = {"forged name": "not a pydist segment", "not ours": "is gone",
                 "another owner": "owned by uid 65534", "size lies": "promised",
                 "over the limit": "over the limit", "announced, another owner": "owned by uid 65534",
                 "bytes in no segment": "in no segment"}[case]
        with pytest.raises(TransportBroken, match=match):
            b.recv_frame()
        assert b.closed
    finally:
        if made is not None:
            made.unlink()
            made.close()
        a.abort()
        b.abort()


def test_a_hint_past_the_limit_is_ignored(pair):
    a, b = pair
    forge(a, "", 1 << 40, 0)                   # "make a segment this large for your answers"
    a.send_frame([b"after"])
    assert bytes(b.recv_frame()) == b"after" and not b.closed
    assert b._big_out.stats() == (0, 0)


def test_an_announcement_of_a_segment_gone_meanwhile_is_passed_over(pair):
    a, b = pair     # the sender dropped it before the receiver read the notice (closing)
    forge(a, seg.new_name(), 1 << 20, 0)
    a.send_frame([b"after"])
    assert bytes(b.recv_frame()) == b"after" and not b.closed


def test_an_interrupt_after_the_notices_cancels_the_frame_and_keeps_the_stream(pair, monkeypatch):
    a, b = pair
    announce = bigbuf.BigOut._announce

    def interrupted(self, out, locked):
        announce(self, out, locked)            # the hint and the announcement are out
        raise KeyboardInterrupt
    monkeypatch.setattr(bigbuf.BigOut, "_announce", interrupted)
    with pytest.raises(KeyboardInterrupt):
        a.send_frame([payload(BIG, 1)])
    monkeypatch.setattr(bigbuf.BigOut, "_announce", announce)
    a.send_frame([b"next"])
    assert bytes(b.recv_frame()) == b"next"
    a.send_frame([payload(BIG, 2)])           # the segment, given back, serves again
    assert bytes(b.recv_frame()) == payload(BIG, 2) and a._big_out.stats() == (1, BIG)


def test_new_segments_are_announced_before_their_pages_are_mapped(pair, monkeypatch):
    # Both the sender's own segment and the one its receiver makes ahead for the answer:
    # the peer opens each (and maps its pages) while the maker maps them on its side.
    a, b = pair
    opened_first = []
    map_pages = bigbuf._Out.map_pages

    def watching(out):
        if not out.mapped:
            opened_first.append(wait_until(lambda: out.words[bigbuf.OPENED] == 1, 5))
        return map_pages(out)
    monkeypatch.setattr(bigbuf._Out, "map_pages", watching)
    got = {}
    readers = [threading.Thread(target=lambda end=end: got.update({end: bytes(end.recv_frame())}))
               for end in (a, b)]
    for r in readers:
        r.start()
    a.send_frame([payload(BIG, 1)])
    assert wait_until(lambda: len(opened_first) == 2 and b._big_out.stats()[0] == 1, 15)
    b.send_frame([payload(BIG, 2)])
    for r in readers:
        r.join(10)
    assert got == {b: payload(BIG, 1), a: payload(BIG, 2)}
    assert opened_first == [True, True]
