"""The receiving side of large frames (``bigbuf.py`` tells the model), and the pair of pools
of one connection end.

A descriptor names a segment of the sender's; the receiver maps it once (keeping the
mapping) and hands out each frame as a view of it. A descriptor of length 0 is a notice:
with a name, the sender announces a segment it just made (opened now, while the sender
fills it); without one, a hint that a frame of that size came, so that an answer as large
finds a segment of this side's pool ready (``BigOut.prepare``).
"""
from __future__ import annotations

import ctypes
import threading
import weakref
from collections.abc import Callable
from typing import Any

from . import segment as seg
from .bigbuf import (
    _DESC,
    _MAGIC,
    _ROUND,
    CAPACITY,
    DESC_SIZE,
    HEADER,
    LENT,
    MADV_POPULATE_READ,
    MAGIC,
    OPENED,
    RETIRED,
    BigOut,
    Locked,
    populate,
    trimmer,
)
from .fence import tso_by_default
from .layout import SEMS_PER_RING

__all__ = ["BigIn", "ends"]


def ends(segment: seg.Segment, dialer: bool, tso: bool | None,
         notify: Callable[[bytes, bool | None], bool] | None = None) -> tuple[BigOut, BigIn]:
    """The sending and receiving pools of one connection end; where plain accesses are not
    ordered (``tso`` False), each uses the mutex semaphore of the ring it goes along.
    ``notify`` sends a notice to the peer (see ``BigOut``)."""
    mutex = None if (tso_by_default() if tso is None else tso) else len(SEMS_PER_RING) - 1
    tx_ring = 0 if dialer else 1

    def sem(ring: int) -> Any:
        return None if mutex is None else segment.sems[len(SEMS_PER_RING) * ring + mutex]
    return BigOut(sem(tx_ring), notify), BigIn(sem(1 - tx_ring))


class _In:
    """The receiver's mapping of one of the sender's segments, its pages mapped at once."""

    __slots__ = ("segment", "words", "data", "cap")

    def __init__(self, name: str, cap: int) -> None:
        self.cap = cap
        self.segment = seg.Segment.attach(name, [], HEADER + cap)
        self.segment.unlink()   # opened: the name has done its job
        view = memoryview(self.segment.buf)
        self.words = view[:HEADER].cast("Q")
        self.data = view[HEADER:HEADER + cap]
        if self.words[MAGIC] != _MAGIC or self.words[CAPACITY] != cap:
            self.drop()
            raise seg.SegmentError(f"large-frame segment {name} has a bad header")
        self.words[OPENED] = 1
        populate(self.segment.buf, MADV_POPULATE_READ)

    def drop(self) -> None:
        # Frames still alive keep the mapping alive; it goes with the last of them.
        self.segment.close()


def _give_back(locked: Locked, words: memoryview) -> None:
    """The last view of a received frame died: the sender may fill its segment again."""
    try:
        locked.store(words, LENT, 0)
    except Exception:  # the connection is gone, and the segment with it
        pass


class BigIn:
    """The receiving side: descriptors turned into frames that are views of the segment."""

    def __init__(self, mutex: Any = None) -> None:
        self._locked = Locked(mutex)
        self._lock = threading.Lock()
        self._maps: dict[str, _In] = {}
        self._closed = False

    @staticmethod
    def length(desc: memoryview | bytes) -> int:
        """The frame length a descriptor announces (0 for a notice or a malformed one)."""
        return _DESC.unpack(desc)[2] if len(desc) == DESC_SIZE else 0

    def open(self, desc: memoryview | bytes, limit: int) -> memoryview | int:
        """The frame a descriptor stands for, a view of the sender's segment; for a notice,
        the capacity a hint asks for (0 after an announcement). SegmentError/ValueError for
        a bad descriptor."""
        if self.length(desc) == 0 and not bytes(desc[:1]).strip(b"\0"):
            cap = _DESC.unpack(desc)[1]   # a hint: one we would not take is only ignored
            return cap if 0 < cap <= limit + _ROUND else 0
        name, cap, length = self._parse(desc, limit)
        if length == 0:   # an announcement; the sender may have dropped it since (closing)
            try:
                self._mapping(name, cap)
            except seg.SegmentGone:
                pass
            return 0
        m = self._mapping(name, cap)
        # A fresh exporter per frame: every view of the frame, and every array decoded from
        # it, refers to it, so it dies with the last of them (memoryviews and PickleBuffers
        # do not: their slices refer to the mapping itself). One ctypes type per capacity.
        lease = (ctypes.c_ubyte * m.cap).from_buffer(m.data)
        weakref.finalize(lease, _give_back, self._locked, m.words)
        return memoryview(lease).cast("B")[:length]

    @staticmethod
    def _parse(desc: memoryview | bytes, limit: int) -> tuple[str, int, int]:
        if len(desc) != DESC_SIZE:
            raise ValueError(f"a large-frame descriptor has {DESC_SIZE} bytes, not {len(desc)}")
        raw, cap, length = _DESC.unpack(desc)
        name = raw.rstrip(b"\0").decode("ascii", "replace")
        if name and not seg.valid_name(name):
            raise ValueError(f"large-frame descriptor names {name!r}, not a pydist segment")
        if not name and length:
            raise ValueError(f"large-frame descriptor announces {length} bytes in no segment")
        if length > cap or length > limit or cap > limit + _ROUND:
            raise ValueError(f"large-frame descriptor announces {length} bytes in a segment of "
                             f"{cap}, over the limit of {limit}")
        return name, cap, length

    def _mapping(self, name: str, cap: int) -> _In:
        with self._lock:
            if self._closed:
                raise ValueError("the connection is closed")
            m = self._maps.get(name)
            fresh = m is None or m.cap != cap
            if m is None or fresh:
                m = self._maps[name] = _In(name, cap)
        if fresh:
            trimmer().watch(self)
        return m

    def trim(self) -> bool:
        """Drop mappings of segments the sender retired; whether any remain."""
        with self._lock:
            for name, m in list(self._maps.items()):
                if m.words[RETIRED]:
                    del self._maps[name]
                    m.drop()
            return bool(self._maps)

    def close(self) -> None:
        """Drop every mapping (frames still alive keep theirs). Idempotent."""
        with self._lock:
            self._closed = True
            maps, self._maps = self._maps, {}
        for m in maps.values():
            m.drop()
