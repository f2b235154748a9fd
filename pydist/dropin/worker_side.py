"""What runs on the workers, and what travels to them and back.

The master sends a batch as one call, ``_run_batch(fn, packed, pool_mode, key, seq)``:

* ``packed`` (``_Packed``) holds the batch's ``(kind, args, kwargs)`` triples, pickled
  ahead of the message, so a task whose arguments cannot be unpickled fails alone;
* ``kind`` says how to call ``fn``: ``CALL`` (``fn(*args, **kwargs)``), ``CHUNK`` (``fn``
  on each item of a chunk), ``STARCHUNK`` (``fn(*item)`` on each);
* the reply (``_Results``) is every task's result or ``Failure``, and the seconds the
  batch took to run, which the master uses to size its windows; if the tasks printed, it
  also carries how far the worker's output had got, and the master delivers the results
  only once its relay has passed that output on (``pydist/output.py``);
* ``key`` names the executor and ``seq`` the batch's place on this worker: a batch not
  started yet may be taken back (``pools/stealing.py``: its gate), and then answers
  ``REVOKED``.

Functions pickled by value are shipped once per worker through the function cache of the
pools (``funccache.py``) and referred to by id afterwards. A new worker first runs
``_init_worker``: the multiprocessing authkey, the master's main script (``main_spec``:
run once per worker as ``__mp_main__`` and made its ``__main__``, as the standard library's
spawn does, so that functions and classes of the script travel by reference and share its
globals), then the user's initializer.

Everything here is pickled by reference (``pydist.dropin.worker_side.<name>``).
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

from ..cluster.dispatch import capture
from ..cluster.group import PGRP
from ..cluster.output import printed, wait_relayed
from ..cluster.stopping import exit_worker
from ..cluster.values import Failure
from ..errors import CapturedException, RemoteErrorStandIn, RemoteException, SerializationError
from ..pools.stealing import REVOKED, claim
from ..wire.serialize import dumps, loads
from .mainscript import _load_main

CALL, CHUNK, STARCHUNK = 0, 1, 2     # how a task calls its function (see _run_batch)


class _Packed:
    """Arguments pickled ahead of the message: unpickled on the worker inside the task, so
    a failure to unpickle is that task's error, never the connection's."""

    __slots__ = ("data", "bufs")

    def __init__(self, data: Any, *bufs: Any) -> None:
        self.data, self.bufs = data, bufs

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Packed, (self.data, *self.bufs))


class _Results:
    """A batch's results on their way back: pickled as a whole when possible, else item by
    item, each item that cannot be pickled replaced by its pickling error."""

    __slots__ = ("values", "elapsed", "pool_mode", "mark")

    def __init__(self, values: list[Any], elapsed: float, pool_mode: bool,
                 mark: tuple[int, int] | None = None) -> None:
        self.values, self.elapsed, self.pool_mode = values, elapsed, pool_mode
        self.mark = mark     # (stdout, stderr) bytes written by the worker, if the tasks printed

    def __reduce__(self) -> tuple[Any, ...]:
        try:
            data, bufs = dumps(self.values)
        except BaseException:
            data, bufs = dumps([self._sendable(v) for v in self.values])
        if self.mark is not None:
            return (_load_printed, (PGRP.myid, self.mark, self.elapsed, data, *bufs))
        return (_load_results, (self.elapsed, data, *bufs))

    def _sendable(self, value: Any) -> Any:
        try:
            dumps(value)
            return value
        except BaseException as e:
            err = e.__cause__ if isinstance(e, SerializationError) and e.__cause__ else e
        if self.pool_mode:
            from multiprocessing.pool import MaybeEncodingError  # type: ignore[attr-defined]  # not in typeshed
            return Failure(MaybeEncodingError(err, value))
        if type(value) is Failure and isinstance(value.exc, RemoteException):
            ex, tb = value.exc.captured.ex, value.exc.captured.traceback
            stand_in = RemoteErrorStandIn(type(ex).__qualname__, str(ex))
            return Failure(RemoteException(PGRP.myid, CapturedException(stand_in, tb)))
        return Failure(capture(err))


def _load_results(elapsed: float, data: Any, *bufs: Any) -> tuple[Any, float]:
    """Unpickling a batch's results (on the reader thread): never let an error escape."""
    try:
        return loads(data, bufs), elapsed
    except BaseException as e:
        return _Undecodable(e), elapsed


def _load_printed(pid: int, mark: tuple[int, int], elapsed: float, data: Any,
                  *bufs: Any) -> tuple[Any, float]:
    """``_load_results`` once what worker ``pid`` printed before them has been passed on."""
    wait_relayed(pid, *mark)
    return _load_results(elapsed, data, *bufs)


class _Undecodable:
    """Results that could not be unpickled here: every task of the batch fails with why."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _load_calls(packed: _Packed) -> Any:
    """The calls in ``packed``, or a ``Failure`` saying why they could not be unpickled."""
    try:
        return loads(packed.data, packed.bufs)
    except SystemExit as e:
        # Unpickling the arguments asked the process to exit: it does, as a
        # multiprocessing worker would (the task fails with ProcessExitedException).
        exit_worker(e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException as e:
        return Failure(capture(e))


# Types whose values always pickle and unpickle: arguments of these travel inline, and such
# a result comes back as itself (no safety wrapper needed around either).
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes})


def inline_ok(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``args`` and ``kwargs`` are atoms only (they cannot fail to unpickle)."""
    atoms = _ATOMS
    for a in args:
        if type(a) not in atoms:
            return False
    for a in kwargs.values():
        if type(a) not in atoms:
            return False
    return True


def _run_one(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], packed: _Packed | None,
             pool_mode: bool) -> Any:
    """On a worker: one task sent to an idle worker (first in line, so never revoked).
    Its arguments come inline when they are atoms, else in ``packed``. An atom result comes
    back as itself; any other result, or the task's error, in ``_Results``."""
    t0 = time.perf_counter()
    if packed is not None:
        calls = _load_calls(packed)
        if type(calls) is Failure:
            return calls
        _, args, kwargs = calls[0]
        del packed, calls
    try:
        value = fn(*args, **kwargs)
    except BaseException as e:   # SystemExit and KeyboardInterrupt are the task's error too
        value = Failure(capture(e))
    mark = printed()
    if type(value) in _ATOMS and mark is None:
        return value
    return _Results([value], time.perf_counter() - t0, pool_mode, mark)


def _run_batch(fn: Callable[..., Any], packed: _Packed, pool_mode: bool, key: Any, seq: int) -> Any:
    """On a worker: run a batch of tasks of ``fn``; a result or a ``Failure`` for each."""
    if not claim(key, seq):
        return REVOKED
    t0 = time.perf_counter()
    calls = _load_calls(packed)
    if type(calls) is Failure:
        return calls
    del packed
    out: list[Any] = []
    for i in range(len(calls)):
        kind, args, kwargs = calls[i]
        calls[i] = None           # let the arguments go as soon as the task is done
        try:
            if kind == CALL:
                out.append(fn(*args, **kwargs))
            elif kind == CHUNK:
                out.append(list(map(fn, args)))       # map's C loop: no frame per item
            else:
                out.append(list(itertools.starmap(fn, args)))
        except BaseException as e:   # SystemExit and KeyboardInterrupt are the task's error too
            out.append(Failure(capture(e)))
        del args, kwargs
    return _Results(out, time.perf_counter() - t0, pool_mode, printed())


def _init_worker(authkey: bytes | None, packed: _Packed, log: bool, tracker: Any = None,
                 main: tuple[Any, ...] | None = None) -> tuple[int, int] | None:
    """On a new worker: the master's multiprocessing authkey (so manager proxies passed as
    arguments connect, as in a multiprocessing child) and resource tracker, if given (see
    mpshare.py), its main script (``main``: how to find it, the master's ``sys.path`` and
    ``sys.argv``, and its code as the master compiled it), then the user's initializer
    (unpickled only now, after the authkey). Answers how far the worker's output got if
    they printed."""
    if authkey is not None:
        multiprocessing.current_process().authkey = authkey
    if tracker is not None:
        from multiprocessing import resource_tracker  # only programs that use one pay
        resource_tracker._resource_tracker._fd = tracker.detach()   # type: ignore[attr-defined]  # not in typeshed
    if main is not None:
        _load_main(*main)
    initializer, initargs = loads(packed.data, packed.bufs)
    if initializer is None:
        return printed()
    try:
        initializer(*initargs)
    except BaseException:
        if log:
            logging.getLogger("concurrent.futures").critical("Exception in initializer:",
                                                             exc_info=True)
        raise
    return printed()
