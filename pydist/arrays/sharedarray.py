"""``SharedArray``: one numpy array in shared memory, mapped by local processes (Julia's
``SharedArrays``).

``SharedArray(shape, dtype, init=..., pids=...)`` makes the memory (``sharedmap.py`` tells
its lifetime), maps it on the creating process and on every process in ``pids`` (by
default all local workers), runs ``init(S)`` on each process of ``pids`` and returns once
all are done. Each participant owns an even share of the last axis, ``localindices(S)``.

A SharedArray is a ``numpy.ndarray`` subclass, so numpy code runs on it unchanged. Sent in
a message (a call, a Channel, a ``pmap`` argument, a drop-in task), it travels as its
name, offset, shape and strides: the receiver gets a view of the same memory, never a
copy. Slices travel the same way. Arrays *computed* from it (``S + 1``) are plain arrays.

Its handle is a reference counted like a Future's (the creator owns it; sending it to a
process makes that process a client first), so the memory is forgotten everywhere once no
process holds a handle, and freed in each process with its last view.
"""
from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, SupportsIndex

import numpy as np

from ..cluster.destinations import restrict
from ..cluster.group import PGRP
from ..cluster.membership import myid, procs
from ..refs.remotecall import remotecall
from . import sharedmap
from .sharedmap import Mapping

__all__ = ["SharedArray", "sdata", "localindices", "indexpids", "shared_zeros", "shared_ones"]


class _SharedRef:
    """This process's one handle on a SharedArray: its mapping, and how many counts it holds
    with the owner (released when the handle dies, that is, with the last array of it)."""

    __slots__ = ("mapping", "base_address", "tokens", "__weakref__")

    def __init__(self, m: Mapping) -> None:
        self.mapping, self.tokens = m, 0
        self.base_address: int = np.frombuffer(m.buf, np.uint8, count=1).__array_interface__["data"][0]

    def __del__(self) -> None:
        if self.tokens:
            try:
                sharedmap.release(self.mapping.owner, self.mapping.rrid, self.tokens)
            except Exception:  # interpreter shutdown: nobody left to tell
                pass

    def check_destination(self, arr: np.ndarray) -> bool:
        """Before pickling ``arr``: refuse a destination that has no mapping
        (``cluster/destinations.py``: now, or before bytes pickled ahead are sent); count it as a
        holder, once per message even if the message is pickled twice. Whether it was
        counted."""
        m = self.mapping
        dest = restrict(frozenset((m.owner, *m.pids)), partial(_refusal, m))
        counted = getattr(PGRP.sending, "counted", None) if dest is not None else None
        key = (id(arr), arr.__array_interface__["data"][0], arr.shape, arr.strides)
        if counted is not None and key in counted:
            sent: bool = counted[key]
            return sent
        done = sharedmap.note_sent(m.owner, m.rrid, dest)
        if counted is not None:
            counted[key] = done
        return done

    def contains(self, arr: np.ndarray) -> bool:
        """Whether every byte ``arr`` can reach lies inside the mapping."""
        lo, hi = _extent(arr)
        return self.base_address <= lo and hi <= self.base_address + self.mapping.nbytes


def _refusal(m: Mapping, dest: int) -> str:
    return (f"cannot send SharedArray {m.name} to process {dest}: it is mapped only by "
            f"processes {sorted({m.owner, *m.pids})} (all on this host); create it with pids "
            f"including {dest}, or send sdata(S) to copy the data")


_handles: weakref.WeakValueDictionary[Any, _SharedRef] = weakref.WeakValueDictionary()
_handles_lock = threading.Lock()


def _handle(m: Mapping, counts: int) -> _SharedRef:
    """This process's handle for ``m`` (one per SharedArray), now holding ``counts`` more."""
    with _handles_lock:
        ref = _handles.get(m.rrid)
        if ref is None or ref.mapping is not m:
            ref = _SharedRef(m)
            _handles[m.rrid] = ref
        ref.tokens += counts
        return ref


def _extent(arr: np.ndarray) -> tuple[int, int]:
    """[lowest, highest+1) addresses of the bytes ``arr`` covers."""
    start = arr.__array_interface__["data"][0]
    if arr.size == 0:
        return start, start
    lo = hi = start
    for n, stride in zip(arr.shape, arr.strides):
        if stride < 0:
            lo += (n - 1) * stride
        else:
            hi += (n - 1) * stride
    return lo, hi + arr.itemsize


class SharedArray(np.ndarray):
    """A numpy array in shared memory, mapped by this process and the processes ``pids``.

    ``SharedArray(shape, dtype=float64, *, init=None, pids=None)``: zero-filled; ``init(S)``
    runs on every process of ``pids`` (each fills its ``localindices(S)``) before this
    returns. ``pids`` defaults to every worker on this host (this process when there is
    none). ``OSError`` if /dev/shm has no room for it.
    """

    _ref: _SharedRef | None

    def __new__(cls, shape: int | Iterable[int], dtype: Any = np.float64, *,
                init: Callable[[SharedArray], Any] | None = None,
                pids: Iterable[int] | None = None) -> SharedArray:
        shape_t, dt = _check_shape(shape), _check_dtype(dtype)
        if init is not None and not callable(init):
            raise TypeError(f"init must be a callable taking the SharedArray, not {init!r}")
        chosen = _check_pids(pids)
        nbytes = math.prod(shape_t) * dt.itemsize
        m = _make_mapping(nbytes, chosen)
        arr = _view(_handle(m, 1), 0, shape_t, None, dt)
        if init is not None:
            try:
                _run_init(arr, init, chosen)
            except BaseException:
                # Nobody will get this array: forget it everywhere now, rather than when
                # every handle is gone (a traceback may hold one for a long time).
                sharedmap.abandon(m.rrid)
                raise
        return arr

    @classmethod
    def copy_of(cls, a: Any, *, pids: Iterable[int] | None = None) -> SharedArray:
        """A SharedArray holding a copy of array ``a`` (shape and dtype kept)."""
        src = np.asarray(a)
        out = cls(src.shape, src.dtype, pids=pids)
        np.copyto(out, src)
        return out

    # -- numpy subclass plumbing ---------------------------------------------------------
    def __array_finalize__(self, obj: Any) -> None:
        ref = getattr(obj, "_ref", None)
        # A view of the mapping stays shared; new memory (a copy) is not.
        self._ref = ref if ref is not None and ref.contains(self) else None

    def __array_wrap__(self, arr: Any, context: Any = None, return_scalar: bool = False) -> Any:
        out = super().__array_wrap__(arr, context, return_scalar)
        if isinstance(out, SharedArray) and out._ref is None:
            return out[()] if return_scalar else out.view(np.ndarray)
        return out

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        ref = self._ref
        if ref is None:
            return self.view(np.ndarray).__reduce_ex__(protocol)
        counted = ref.check_destination(self)
        m = ref.mapping
        offset = self.__array_interface__["data"][0] - ref.base_address
        return (_rebuild, (m.name, m.owner, m.rrid, m.pids, offset, self.shape, self.strides,
                           self.dtype.str if not self.dtype.fields else self.dtype.descr,
                           counted))

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(5)

    # -- Julia's accessors -----------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        """The processes that map this array and share its work (Julia's ``procs(S)``)."""
        ref = self._ref
        return list(ref.mapping.pids) if ref is not None else []

    @property
    def segment(self) -> str:
        """The name its shared memory had (already unlinked)."""
        ref = self._ref
        return ref.mapping.name if ref is not None else ""


def _rebuild(name: str, owner: int, rrid: Any, pids: tuple[int, ...], offset: int,
             shape: tuple[int, ...], strides: tuple[int, ...], dtype: Any,
             counted: bool = False) -> SharedArray:
    """On the receiver: a view of this process's own mapping, checked against its size."""
    m = sharedmap.mapping_or_error(name, pids, owner)
    if m.owner != owner or m.rrid != rrid:
        raise ValueError(f"SharedArray {name}: the message names another array than the "
                         "one mapped here under that name; refusing it")
    if owner == PGRP.myid:  # back home: the owner counts itself on receipt
        if not sharedmap.count_holder(m.rrid, owner, 1):
            raise ValueError(f"SharedArray {name} was freed on process {owner} (its owner)")
        counted = True
    return _view(_handle(m, int(bool(counted))), offset, tuple(shape), tuple(strides),
                 np.dtype(dtype))


def _view(ref: _SharedRef, offset: int, shape: tuple[int, ...],
          strides: tuple[int, ...] | None, dtype: np.dtype) -> SharedArray:
    """An array over ``ref``'s mapping; numpy refuses one that reaches past its end."""
    m = ref.mapping
    if not isinstance(offset, int) or offset < 0 or offset > m.nbytes:
        raise ValueError(f"SharedArray {m.name}: offset {offset!r} is outside its "
                         f"{m.nbytes} bytes")
    try:
        arr = np.ndarray.__new__(SharedArray, shape, dtype, buffer=m.buf, offset=offset,
                                 strides=strides)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"SharedArray {m.name}: a view of shape {shape}, strides {strides} "
                         f"at offset {offset} does not fit its {m.nbytes} bytes: {exc}") from None
    arr._ref = ref
    if not ref.contains(arr):
        raise ValueError(f"SharedArray {m.name}: a view of shape {shape}, strides {strides} "
                         f"at offset {offset} reaches outside its {m.nbytes} bytes")
    return arr


# -- creation ------------------------------------------------------------------------------
def _check_shape(shape: Any) -> tuple[int, ...]:
    def is_dim(d: Any) -> bool:
        return isinstance(d, (int, np.integer)) and not isinstance(d, bool) and bool(d >= 0)
    dims = (shape,) if is_dim(shape) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        dims = ()
    if not dims or not all(is_dim(d) for d in dims):
        raise ValueError(f"shape must be an int >= 0 or a non-empty tuple of them, not {shape!r}")
    return tuple(int(d) for d in dims)


def _check_dtype(dtype: Any) -> np.dtype[Any]:
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype {dtype!r} is not a numpy dtype: {exc}") from None
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects, which cannot live in shared memory")
    return dt


def _check_pids(pids: Iterable[int] | None) -> tuple[int, ...]:
    """The participating processes: given, or every local worker (Julia's default)."""
    local = procs(myid())
    if pids is None:
        chosen = [p for p in local if p != 1] if len(local) > 1 else local
        return tuple(chosen)
    if isinstance(pids, (int, str, bytes)):
        raise TypeError(f"pids must be an iterable of process ids, not {pids!r}")
    chosen = list(dict.fromkeys(pids))
    if not chosen:
        raise ValueError("pids must name at least one process")
    everyone = procs()
    for p in chosen:
        if not isinstance(p, int) or isinstance(p, bool):
            raise TypeError(f"pids must hold process ids (ints), not {p!r}")
        if p not in everyone:
            raise ValueError(f"pids names process {p}, which is not in this cluster "
                             f"(processes: {everyone})")
        if p not in local:
            raise ValueError(f"pids names process {p}, which runs on another host: a "
                             "SharedArray is shared by the processes of one host only")
    return tuple(chosen)


def _make_mapping(nbytes: int, pids: tuple[int, ...]) -> Mapping:
    """Create the segment, map it on every pid, then unlink its name (see sharedmap)."""
    name, buf = sharedmap.create_segment(nbytes)
    me, rrid = PGRP.myid, PGRP.next_rrid()
    others = [p for p in pids if p != me]
    attached: list[int] = []
    try:
        calls = [(p, remotecall(sharedmap.attach_here, p, name, nbytes, me, rrid, pids))
                 for p in others]
        failure: BaseException | None = None
        for p, f in calls:
            try:
                f.fetch()
                attached.append(p)
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
    except BaseException:
        sharedmap.unlink(name)
        for p in attached:
            remotecall(sharedmap.forget_here, p, [name])
        raise
    sharedmap.unlink(name)
    m = Mapping(name, buf, nbytes, me, rrid, pids)
    sharedmap.add(m)
    sharedmap.register_owned(rrid, name, pids)
    return m


def _run_init(arr: SharedArray, init: Callable[[SharedArray], Any],
              pids: tuple[int, ...]) -> None:
    """``init(S)`` on every process of ``pids`` at once; returns when all are done."""
    me = PGRP.myid
    calls = [remotecall(init, p, arr) for p in pids if p != me]
    if me in pids:
        init(arr)
    for f in calls:
        f.wait()


# -- Julia's functions -------------------------------------------------------------------------
def sdata(S: np.ndarray) -> np.ndarray:
    """The plain ``numpy.ndarray`` over the same memory (sent, it is copied like any array)."""
    return S.view(np.ndarray)


def indexpids(S: SharedArray) -> int:
    """This process's position in ``S.pids`` (0-based), or -1 if it has no share."""
    try:
        return S.pids.index(PGRP.myid)
    except ValueError:
        return -1


def localindices(S: SharedArray) -> slice:
    """This process's share of the last axis (an even split over ``S.pids``; empty for a
    process outside them): fill it with ``S[..., localindices(S)] = ...``."""
    i = indexpids(S)
    if i < 0:
        return slice(0, 0)
    n, parts = S.shape[-1] if S.ndim else 1, len(S.pids)
    return slice(i * n // parts, (i + 1) * n // parts)


def shared_zeros(shape: int | Iterable[int], dtype: Any = np.float64, *,
                 pids: Iterable[int] | None = None) -> SharedArray:
    """A zero-filled SharedArray (``numpy.zeros`` in shared memory)."""
    return SharedArray(shape, dtype, pids=pids)


def shared_ones(shape: int | Iterable[int], dtype: Any = np.float64, *,
                pids: Iterable[int] | None = None) -> SharedArray:
    """A SharedArray filled with ones (``numpy.ones`` in shared memory)."""
    S = SharedArray(shape, dtype, pids=pids)
    S.fill(1)
    return S
