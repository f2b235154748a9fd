"""multiprocessing's shared objects handed to local workers, as multiprocessing hands them
to the processes it starts.

A ``Lock``, ``Value``, ``Queue`` (and the rest of ``multiprocessing.synchronize``,
``sharedctypes`` and ``queues``) refuses to be pickled except while multiprocessing
starts a process: ``context.assert_spawning`` checks that a *spawning popen* is set, and
the objects ask that popen to pass their file descriptors on (``DupFd``). A pydist local
worker is a freshly started interpreter, like a spawned child, so ``dumps_shared`` pickles
under a popen of its own (``_LocalSpawn``) whose ``DupFd`` hands each descriptor over
multiprocessing's resource sharer: a Unix socket of this process, which the worker
connects to with the multiprocessing authkey it was given at start (see
``worker_side._init_worker``) to receive the descriptor (SCM_RIGHTS). Semaphores are
reopened by name on the worker.

One twist: a semaphore made under the ``fork`` start method (the default on Linux before
Python 3.14) has no name, so no other process can open it. The first time such a lock is
sent to a worker while nobody holds it, it is re-based on a named semaphore of the same
kind and value (``_rebase``); the object stays the same object, and this process and the
workers share the new semaphore from then on. (Processes forked from this one before that
keep the old semaphore: do not mix both kinds of children around one lock.)

The plain pickler is tried first, so arguments that need none of this pay nothing.

A spawned child also shares its parent's resource tracker (the process that unlinks
named semaphores and shared memory left behind). A worker that attached a
``SharedMemory`` with a tracker of its own would have it unlink the segment when the worker
exits, under the master's feet; so when the master's tracker runs, or the program uses
``multiprocessing.shared_memory``, each local worker is handed the master's tracker at
start (``tracker_handle``), as spawn hands it over.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.context as mp_context
import multiprocessing.queues  # noqa: F401  (the classes pickled here)
import multiprocessing.sharedctypes as sharedctypes
import multiprocessing.synchronize as synchronize
import sys
from collections import ChainMap
from collections.abc import Callable
from multiprocessing import resource_sharer, resource_tracker
from multiprocessing.reduction import ForkingPickler
from typing import Any

from ..errors import SerializationError
from ..wire.serialize import dumps, dumps_with

__all__ = ["check_shared", "dumps_shared", "tracker_handle"]


class _LocalSpawn:
    """The spawning popen multiprocessing's objects ask for while they are pickled."""

    def duplicate_for_child(self, fd: int) -> int:
        return fd

    def DupFd(self, fd: int) -> Any:   # noqa: N802  (multiprocessing's name)
        return resource_sharer.DupFd(fd)


def dumps_shared(obj: Any, main_by_reference: bool = False) -> tuple[bytes, list[Any]]:
    """``dumps(obj)``; if that fails, again as for a process multiprocessing starts (see
    the module's docstring). Raises the second ``SerializationError`` if both fail.
    ``main_by_reference`` as for ``serialize.dumps``."""
    try:
        return dumps(obj, main_by_reference)
    except SerializationError:
        return _spawn_dumps(obj, _LocalSpawn(), main_by_reference)


def check_shared(obj: Any, main_by_reference: bool = False) -> None:
    """Raise ``SerializationError`` unless ``dumps_shared(obj)`` would work (a dry run:
    no descriptor is offered to anyone)."""
    try:
        dumps(obj, main_by_reference)
    except SerializationError:
        _spawn_dumps(obj, _DryRun(), main_by_reference)


class _DryRun(_LocalSpawn):
    def DupFd(self, fd: int) -> Any:   # noqa: N802
        return None


def _spawn_dumps(obj: Any, popen: _LocalSpawn, main_by_reference: bool) -> tuple[bytes, list[Any]]:
    previous = mp_context.get_spawning_popen()
    mp_context.set_spawning_popen(popen)   # type: ignore[arg-type]  # any object with DupFd serves
    try:
        extra = ForkingPickler._extra_reducers   # type: ignore[attr-defined]  # not in typeshed
        return dumps_with(obj, ChainMap(_REDUCERS, extra), main_by_reference)
    except SerializationError:
        raise     # the second error: it says why the multiprocessing way failed too
    finally:
        mp_context.set_spawning_popen(previous)


def tracker_handle() -> Any:
    """For one new local worker: the master's resource tracker's descriptor (to be
    ``detach()``-ed there), or ``None`` if this program has no use for a tracker."""
    tracker: Any = resource_tracker._resource_tracker   # (its fields are not in typeshed)
    if tracker._fd is None and "multiprocessing.shared_memory" not in sys.modules:
        return None
    return resource_sharer.DupFd(tracker.getfd())


# -- semaphores made under fork ------------------------------------------------------------------
# multiprocessing's locks, conditions and synchronized values are handled by their internal
# fields (``_semlock``, ``_lock``, ``_make_methods``), which typeshed does not describe: they
# are typed ``Any`` here.
_SPAWN = multiprocessing.get_context("spawn")


def _fresh_like(lock: Any) -> Any:
    """A new named semaphore of ``lock``'s class and current value."""
    cls = type(lock)
    if cls is synchronize.Lock or cls is synchronize.RLock:
        return cls(ctx=_SPAWN)
    value = lock._semlock._get_value()
    return cls(value, ctx=_SPAWN)


def _rebase(lock: Any) -> None:
    """Give a fork-made ``lock`` a named semaphore (see the module's docstring)."""
    if lock._semlock.name is not None:
        return
    sl = lock._semlock
    if isinstance(lock, (synchronize.Lock, synchronize.RLock)) and sl._get_value() != 1:
        raise RuntimeError(
            f"a {type(lock).__name__} made under the 'fork' start method can be sent to a "
            f"pydist worker only while nobody holds it; make it with "
            f"multiprocessing.get_context('spawn') instead")
    fresh = _fresh_like(lock)
    lock._semlock = fresh._semlock
    lock._is_fork_ctx = False
    lock._pydist_named = fresh  # its finalizer unlinks the name
    lock._make_methods()


def _reduce_semlock(lock: synchronize.SemLock) -> Any:
    _rebase(lock)
    return lock.__reduce_ex__(5)


def _reduce_condition(cond: Any) -> Any:
    _rebase(cond._lock)
    cond._make_methods()       # its bound acquire/release follow the lock's semaphore
    return cond.__reduce_ex__(5)


def _reduce_synchronized(obj: Any) -> Any:
    lock = obj._lock
    if isinstance(lock, synchronize.SemLock):
        _rebase(lock)
        obj.acquire, obj.release = lock.acquire, lock.release
    return obj.__reduce__()


_SEMLOCKS = (synchronize.Lock, synchronize.RLock, synchronize.Semaphore,
             synchronize.BoundedSemaphore)
_SYNCHRONIZED = (sharedctypes.Synchronized, sharedctypes.SynchronizedArray,
                 sharedctypes.SynchronizedString)
# Consulted before multiprocessing's own table (ForkingPickler._extra_reducers: Connection,
# socket, heap arenas, and each ctypes type of a Value or Array, registered as made).
_REDUCERS: dict[type, Callable[[Any], Any]] = {
    **{cls: _reduce_semlock for cls in _SEMLOCKS},
    synchronize.Condition: _reduce_condition,
    **{cls: _reduce_synchronized for cls in _SYNCHRONIZED},
}
