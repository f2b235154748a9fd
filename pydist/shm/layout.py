"""The layout of one connection's segment, and the ring ends each side builds on it.

Segment layout (one per connection)::

    offset 0      header: magic u64, ring capacity u64
    offset 64     ring 0 control (dialer -> acceptor), 128 bytes
    offset 192    ring 1 control (acceptor -> dialer), 128 bytes
    offset 4096   ring 0 data, `capacity` bytes
    ...           ring 1 data, `capacity` bytes

    semaphores, per ring r:  3r "data" (consumer sleeps on it), 3r+1 "space" (producer
    sleeps on it), 3r+2 "mutex" (orders accesses where the CPU does not; see fence.py)

The dialer produces ring 0 and consumes ring 1; the acceptor the other way round. Each
frame is ``codec.frame_header(length)`` then the payload, streamed through a ring.
"""
from __future__ import annotations

import struct
from typing import TypeVar

from ..errors import TransportBroken
from . import segment as seg
from .fence import LockedFence, TsoFence, tso_by_default
from .placement import Placement
from .ring import CTL_SIZE, WRITER_CPU, RingReader, RingWriter
from .wait import LinkState, Waiter

__all__ = ["DEFAULT_CAPACITY", "MAX_CAPACITY", "DATA_OFFSET", "SEMS_PER_RING", "SEM_COUNT",
           "make_ends", "new_segment", "segment_size", "check_capacity", "check_header"]

# Per direction. 1, 4 and 16 MiB rings moved 128 MiB equally fast here (within noise), but a
# connection costs 2, 11 and 48 ms to set up (the pages are reserved and pre-faulted) and
# 2x the ring in RAM; 4 MiB leaves slack for a briefly descheduled reader.
DEFAULT_CAPACITY = 4 << 20
MAX_CAPACITY = 1 << 30
DATA_OFFSET = 4096
SEMS_PER_RING = (0, 0, 1)  # initial values: data, space, mutex
SEM_COUNT = 2 * len(SEMS_PER_RING)
_CTL_OFFSET = 64
_MAGIC = int.from_bytes(b"PYDSHM02", "little")
_HEADER = struct.Struct("<QQ")
_E = TypeVar("_E", RingWriter, RingReader)


def segment_size(capacity: int) -> int:
    return DATA_OFFSET + 2 * capacity


def check_capacity(capacity: object) -> int:
    """``capacity`` if it is a valid ring size, else ValueError."""
    if not isinstance(capacity, int) or not 64 <= capacity <= MAX_CAPACITY \
            or capacity & (capacity - 1):
        raise ValueError(f"ring capacity must be a power of two in [64, {MAX_CAPACITY}], "
                         f"not {capacity!r}")
    return capacity


def check_header(segment: seg.Segment) -> int:
    """The ring capacity the segment's header announces, once it proves sane."""
    capacity: int
    magic, capacity = _HEADER.unpack_from(segment.buf, 0)
    if magic != _MAGIC or segment_size(check_capacity(capacity)) > segment.size:
        raise TransportBroken(f"shared-memory segment {segment.name} has a bad header")
    return capacity


def new_segment(capacity: int, names: seg.NamePlan | None = None) -> seg.Segment:
    """A fresh segment (and its semaphores) with rings of ``capacity`` bytes, under the
    names of ``names`` (``SEM_COUNT`` semaphores; fresh names if None)."""
    segment = seg.Segment.create(segment_size(check_capacity(capacity)), SEMS_PER_RING * 2,
                                 names)
    _HEADER.pack_into(segment.buf, 0, _MAGIC, capacity)
    return segment


def make_ends(segment: seg.Segment, side: int, state: LinkState, spin: str,
              tso: bool | None, peer_cpus: frozenset[int] | None = None
              ) -> tuple[RingWriter, RingReader]:
    """Our writer on ring ``side`` and our reader on the other ring.

    ``spin`` is the ``Waiter`` mode; ``peer_cpus`` the peer's CPU affinity if known (see
    ``placement.Placement``: only the accepting side, 1, may move); ``tso`` forces a fence
    mode (None: by machine).
    """
    capacity = check_header(segment)
    view = memoryview(segment.buf)
    use_tso = tso_by_default() if tso is None else tso

    def ctl(ring: int) -> memoryview:
        start = _CTL_OFFSET + ring * CTL_SIZE
        return view[start:start + CTL_SIZE].cast("Q")

    def data(ring: int) -> memoryview:
        start = DATA_OFFSET + ring * capacity
        return view[start:start + capacity]

    tx_ctl, rx_ctl = ctl(side), ctl(1 - side)
    placement = Placement(tx_ctl, rx_ctl, WRITER_CPU, peer_cpus, may_move=side == 1)

    def end(cls: type[_E], ring: int, ctl_view: memoryview, own: int, peer: int) -> _E:
        sems = segment.sems[3 * ring: 3 * ring + 3]
        fence = TsoFence(ctl_view) if use_tso else LockedFence(ctl_view, sems[2], state)
        waiter = Waiter(ctl_view, fence.store_load, own_sem=sems[own], peer_sem=sems[peer],
                        state=state, placement=placement, mode=spin)
        return cls(ctl_view, data(ring), fence, waiter, state)

    writer = end(RingWriter, side, tx_ctl, 1, 0)
    reader = end(RingReader, 1 - side, rx_ctl, 0, 1)
    view.release()
    return writer, reader
