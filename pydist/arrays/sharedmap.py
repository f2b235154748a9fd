"""The mappings behind SharedArrays: one table per process, and who may forget what, when.

A SharedArray's memory is one POSIX shared-memory object (made by ``shm/segment.py``: a
name from ``secrets``, created exclusively with mode 0600, reserved with
``posix_fallocate``). Its story, in the process that creates it (the *owner*):

1. create and map the segment;
2. ask every other process in ``pids`` to map it (``attach_here``, which checks the name's
   form, the owner uid, the mode and the size before mapping), each keeping the mapping in
   its table under the segment's name;
3. unlink the name: from now on the memory lives exactly as long as some process maps it,
   so a ``kill -9`` of every process leaves nothing in ``/dev/shm``.

Each process's table keeps its mapping so that a SharedArray sent to it later (by name,
never by bytes) finds the memory again. The owner counts the processes holding a handle,
much as it does for a Future (``OwnedArray``); once none is left, it tells every process
in ``pids`` to forget the mapping. A process's memory goes when its table entry and its
last numpy view are gone; a worker that dies only drops its own mapping.
"""
from __future__ import annotations

import mmap
import queue
import threading
import weakref
from typing import Any

from ..cluster.dispatch import OpContext, internal_op
from ..cluster.group import PGRP
from ..cluster.waiting import call_on_owner
from ..errors import ProcessExitedException
from ..shm import segment as seg
from ..wire.messages import RRID, MsgHeader, RemoteDoMsg

__all__ = ["Mapping", "OwnedArray", "create_segment", "unlink", "add", "attach_here", "lookup",
           "forget_here", "table_size", "register_owned", "count_holder", "note_sent", "release",
           "abandon",
           "mapping_or_error"]


class Mapping:
    """One process's mapping of a SharedArray's segment, and what the array looks like."""

    __slots__ = ("name", "buf", "nbytes", "owner", "rrid", "pids", "__weakref__")

    def __init__(self, name: str, buf: mmap.mmap, nbytes: int, owner: int, rrid: RRID,
                 pids: tuple[int, ...]) -> None:
        self.name, self.buf, self.nbytes = name, buf, nbytes
        self.owner, self.rrid, self.pids = owner, rrid, pids

    def __repr__(self) -> str:
        return f"<Mapping {self.name} {self.nbytes} bytes, pids {list(self.pids)}>"


_lock = threading.Lock()
_table: dict[str, Mapping] = {}


def _size(nbytes: int) -> int:
    # A zero-sized object cannot be mapped: an empty array still gets one page.
    return max(nbytes, mmap.PAGESIZE)


def create_segment(nbytes: int) -> tuple[str, mmap.mmap]:
    """A fresh segment of ``nbytes`` (name, mapping); ``OSError`` if /dev/shm lacks room."""
    segment = seg.Segment.create(_size(nbytes), [])
    return segment.name, segment.buf


def unlink(name: str) -> None:
    seg.unlink_names(name, [])


def add(m: Mapping) -> None:
    with _lock:
        _table[m.name] = m


def attach_here(name: str, nbytes: int, owner: int, rrid: RRID, pids: tuple[int, ...]) -> None:
    """Map the segment ``name`` into this process (a call the owner makes on each pid).

    Refused with ``SegmentError`` (an ``OSError``) before anything is mapped if the name is
    not of pydist's form, the object is gone, belongs to another user, grants group or
    other access, or is smaller than ``nbytes``.
    """
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"a SharedArray's size must be an int >= 0, not {nbytes!r}")
    segment = seg.Segment.attach(name, [], _size(nbytes))
    add(Mapping(name, segment.buf, nbytes, owner, rrid, tuple(pids)))


def lookup(name: str) -> Mapping | None:
    with _lock:
        return _table.get(name)


def forget_here(names: list[str]) -> None:
    """Drop this process's table entries; each mapping goes with its last numpy view."""
    with _lock:
        for name in names:
            _table.pop(name, None)


def table_size() -> int:
    """How many SharedArray mappings this process's table holds."""
    with _lock:
        return len(_table)


@internal_op
def _forget(ctx: OpContext, names: list[str]) -> None:
    forget_here(names)


# -- the owner's record --------------------------------------------------------------------
class OwnedArray:
    """What the owner keeps in ``PGRP.refs`` for a SharedArray: how many handles each process
    was sent and has not yet released (``holders``). Counting, not a set, keeps a release
    that is still on its way from cancelling a send made after it. When the last holder is
    gone, every process in ``pids`` is told to forget the mapping."""

    __slots__ = ("holders", "name", "pids", "__weakref__")

    def __init__(self, name: str, pids: tuple[int, ...], holder: int) -> None:
        self.holders = {holder: 1}
        self.name = name
        self.pids = pids
        weakref.finalize(self, _notices.forget, name, pids)


def register_owned(rrid: RRID, name: str, pids: tuple[int, ...]) -> None:
    """Record a new SharedArray owned here, held once by this process."""
    with PGRP.lock:
        PGRP.refs[rrid] = OwnedArray(name, pids, PGRP.myid)  # type: ignore[assignment]  # refs is typed for Futures


def count_holder(rrid: RRID, pid: int, n: int) -> bool:
    """On the owner: ``pid`` holds ``n`` more (or fewer) handles; False if already freed."""
    with PGRP.lock:
        rec = PGRP.refs.get(rrid)
        if not isinstance(rec, OwnedArray):
            return False
        left = rec.holders.get(pid, 0) + n
        if left > 0:
            rec.holders[pid] = left
        else:
            rec.holders.pop(pid, None)
            if not rec.holders:
                del PGRP.refs[rrid]
        return True


def abandon(rrid: RRID) -> None:
    """Drop the record of a SharedArray owned here whatever its counts: every process of
    its ``pids`` forgets its mapping (for an array whose construction failed)."""
    with PGRP.lock:
        if isinstance(PGRP.refs.get(rrid), OwnedArray):
            del PGRP.refs[rrid]


@internal_op
def _count(ctx: OpContext, rrid: RRID, pid: int, n: int) -> None:
    ctx.reply(count_holder(rrid, pid, n))


def note_sent(owner: int, rrid: RRID, dest: int | None) -> bool:
    """While pickling for ``dest``: count it as a holder first (as a Future's sender makes
    the receiver a client). False when there is nothing to count: no known destination,
    or the owner itself (which counts on receipt)."""
    if dest is None or dest == owner:
        return False
    if owner == PGRP.myid:
        return count_holder(rrid, dest, 1)
    return bool(call_on_owner(_count, owner, rrid, dest, 1))


def release(owner: int, rrid: RRID, n: int) -> None:
    """A handle holding ``n`` counts died here: tell the owner (from the notices thread)."""
    _notices.put(("release", owner, rrid, n))


def _on_worker_lost(pid: int) -> None:
    """A dead process holds no handle any more (Julia drops it from every client set)."""
    with PGRP.lock:
        for rrid, rec in list(PGRP.refs.items()):
            if isinstance(rec, OwnedArray) and pid in rec.holders:
                count_holder(rrid, pid, -rec.holders[pid])


PGRP.on_worker_lost.append(_on_worker_lost)


class _Notices:
    """Sends releases and forget notices from a thread of its own: handles and records die
    wherever their last reference goes (inside the process group's lock, in a finalizer),
    where nothing may block on a connection."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def forget(self, name: str, pids: tuple[int, ...]) -> None:
        forget_here([name])
        others = tuple(p for p in pids if p != PGRP.myid)
        if others:
            self.put(("forget", name, others))

    def put(self, item: tuple[Any, ...]) -> None:
        self._queue.put(item)
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, daemon=True,
                                                    name="pydist-refs-shared")
                    self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item[0] == "forget":
                    for p in item[2]:
                        self._send(p, RemoteDoMsg(_forget, ([item[1]],), {}))
                elif item[1] == PGRP.myid:
                    count_holder(item[2], PGRP.myid, -item[3])
                else:
                    self._send(item[1], RemoteDoMsg(_count, (item[2], PGRP.myid, -item[3]), {}))
            except Exception:  # a notice must never kill the thread that sends the others
                pass

    @staticmethod
    def _send(pid: int, msg: RemoteDoMsg) -> None:
        try:
            PGRP.send(pid, MsgHeader(), msg)
        except (ProcessExitedException, ValueError, OSError):
            pass  # gone, and its mapping and handles with it


_notices = _Notices()


def mapping_or_error(name: str, pids: tuple[int, ...], owner: int) -> Mapping:
    """This process's mapping of ``name``, or a ValueError that says why there is none."""
    m = lookup(name)
    if m is not None:
        return m
    me = PGRP.myid
    if me not in pids and me != owner:
        raise ValueError(f"SharedArray {name} is not mapped on process {me}: it is shared by "
                         f"processes {sorted({owner, *pids})} only; pass pids=... including "
                         f"{me} when creating it, or send sdata(S) to copy the data")
    raise ValueError(f"SharedArray {name} is no longer mapped on process {me}: every handle to "
                     "it was dropped (keep the SharedArray alive while calls that use it run)")

