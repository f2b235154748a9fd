"""Julia's macros as functions: ``spawnat``, ``spawn``, ``fetchfrom``, ``everywhere``,
``distributed``.

``ANY`` (the string ``"any"``) lets pydist choose the worker, round-robin over the
workers as Julia's ``@spawnat :any`` does (process 1 when there are none).
"""
from __future__ import annotations

import dis
import itertools
import linecache
import sys
import threading
import zlib
from collections.abc import Callable, Iterable
from functools import reduce
from typing import Any, ParamSpec, TypeVar

from ..cluster.dispatch import capture
from ..cluster.group import PGRP
from ..cluster.membership import myid, procs, workers
from ..cluster.values import Failure
from ..errors import RemoteException
from .remotecall import remotecall, remotecall_fetch
from .remoteref import Future

__all__ = ["ANY", "spawnat", "spawn", "fetchfrom", "everywhere", "distributed", "splitrange",
           "remotecall_eval"]

ANY = "any"
P = ParamSpec("P")
R = TypeVar("R")
_next = itertools.count()
_next_lock = threading.Lock()


def _nextproc() -> int:
    """The next worker in round-robin order."""
    ids = workers()
    with _next_lock:
        return ids[next(_next) % len(ids)]


def _resolve(p: int | str) -> int:
    if p == ANY:
        return _nextproc()
    if not isinstance(p, int) or isinstance(p, bool):
        raise TypeError(f"p must be a process id (an int) or pydist.ANY ('any'), not {p!r} "
                        f"({type(p).__name__})")
    return p


def spawnat(p: int | str, f: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Future[R]:
    """``@spawnat p f(args...)``: start the call on ``p`` (or ``ANY``); its Future."""
    return remotecall(f, _resolve(p), *args, **kwargs)


def spawn(f: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Future[R]:
    """``@spawn``: ``spawnat(ANY, f, ...)``."""
    return spawnat(ANY, f, *args, **kwargs)


def fetchfrom(p: int | str, f: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``@fetchfrom p f(args...)``: run on ``p`` (or ``ANY``) and return the value."""
    return remotecall_fetch(f, _resolve(p), *args, **kwargs)


# -- everywhere -----------------------------------------------------------------------------------
def _exec_in_main(code: str) -> None:
    """Run ``code`` in this process's ``__main__`` namespace; its lines are kept in
    ``linecache`` (under a name of their own), so tracebacks through it show them."""
    main = sys.modules["__main__"]
    name = f"<everywhere {zlib.crc32(code.encode()):08x}>"
    linecache.cache[name] = (len(code), None, code.splitlines(keepends=True), name)
    exec(compile(code, name, "exec"), main.__dict__)


def _eval_in_main(code: str) -> Any:
    """Run ``code`` in ``__main__``: the value of an expression, ``None`` for statements."""
    main = sys.modules["__main__"]
    try:
        compiled = compile(code, "<remotecall_eval>", "eval")
    except SyntaxError:
        exec(compile(code, "<remotecall_eval>", "exec"), main.__dict__)
        return None
    return eval(compiled, main.__dict__)


def remotecall_eval(procs: Any, code: str) -> Any:
    """Julia's ``remotecall_eval``: run ``code`` (a str) in ``__main__`` of each process of
    ``procs`` at once and wait; failures are raised as ``everywhere`` raises them. Given one
    id (an int), run it there and return its value (``None`` for statements)."""
    if not isinstance(code, str):
        raise TypeError(f"remotecall_eval(procs, code): code must be a str, not {code!r}")
    if isinstance(procs, int) and not isinstance(procs, bool):
        return remotecall_fetch(_eval_in_main, procs, code)
    if isinstance(procs, (str, bytes)) or not isinstance(procs, Iterable):
        raise TypeError(f"remotecall_eval(procs, code): procs must be a process id or a list "
                        f"of them, not {procs!r}")
    targets = sorted(set(_check_procs(procs)))
    _run_everywhere(_eval_in_main, (code,), {}, targets)
    return None


def _define_in_main(name: str, f: Callable[..., Any]) -> None:
    setattr(sys.modules["__main__"], name, f)


def _called_as_decorator(f: Callable[..., Any]) -> bool:
    """Whether the caller's caller is about to store our result under ``f``'s own name,
    which is what ``@everywhere`` over ``def f`` compiles to."""
    frame = sys._getframe(2)
    code = frame.f_code
    name = getattr(f, "__name__", None)
    for ins in dis.get_instructions(code):
        if ins.offset <= frame.f_lasti:     # f_lasti may point into the call's cache entries
            continue
        return (ins.opname in ("STORE_NAME", "STORE_FAST", "STORE_GLOBAL", "STORE_DEREF")
                and ins.argval == name)
    return False


def _run_everywhere(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                    targets: list[int]) -> None:
    """Run ``fn`` on every target at once (this process last) and wait for all of them."""
    me = myid()
    futures = [(p, remotecall(fn, p, *args, **kwargs)) for p in targets if p != me]
    errors: list[Exception] = []
    if me in targets:
        try:
            fn(*args, **kwargs)
        except Exception as e:
            errors.append(capture(e))
    for _p, fut in futures:
        try:
            fut.wait()
        except (RemoteException, Exception) as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ExceptionGroup(f"everywhere failed on {len(errors)} processes", errors)


def everywhere(code_or_f: Any = None, *args: Any, procs: Iterable[int] | None = None,
               **kwargs: Any) -> Any:
    """``@everywhere``: run code on every process (the master too) and wait.

    A string is executed in each process's ``__main__``; a callable is called with
    ``args``; over a ``def`` (``@everywhere`` or ``@everywhere(procs=[...])``) the function
    is defined in ``__main__`` on every process and returned.
    """
    targets = sorted(set(_all_procs() if procs is None else _check_procs(procs)))
    if code_or_f is None:            # @everywhere(procs=...) form
        def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
            _run_everywhere(_define_in_main, (f.__name__, f), {}, targets)
            return f
        return decorate
    if isinstance(code_or_f, str):
        _run_everywhere(_exec_in_main, (code_or_f,), {}, targets)
        return None
    if not callable(code_or_f):
        raise TypeError(f"everywhere takes code (a str) or a callable, not {type(code_or_f).__name__}")
    if not args and not kwargs and _called_as_decorator(code_or_f):
        _run_everywhere(_define_in_main, (code_or_f.__name__, code_or_f), {}, targets)
        return code_or_f
    _run_everywhere(code_or_f, args, kwargs, targets)
    return None


def _check_procs(procs: Any) -> list[int]:
    """``procs`` as a list of process ids (``TypeError`` naming a bad one)."""
    if isinstance(procs, (str, bytes)) or not isinstance(procs, Iterable):
        raise TypeError(f"procs must be a list of process ids, not {procs!r}")
    out = list(procs)
    for p in out:
        PGRP.check_pid(p, "procs")
    return out


def _all_procs() -> list[int]:
    return procs()


# -- distributed -----------------------------------------------------------------------------------
def splitrange(n: int, parts: int) -> list[range]:
    """Julia's ``splitrange``: ``range(n)`` in ``parts`` contiguous chunks whose sizes differ by at
    most one, the larger first (fewer chunks when ``n < parts``)."""
    parts = max(1, min(parts, n))
    each, extra = divmod(n, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + each + (1 if i < extra else 0)
        out.append(range(lo, hi))
        lo = hi
    return [r for r in out if len(r)] or [range(0)]


def _chunk_reduce(f: Callable[..., Any], reducer: Callable[[Any, Any], Any] | None, items: Any) -> Any:
    values = map(f, items)
    if reducer is None:
        for _ in values:
            pass
        return None
    return reduce(reducer, values)


def distributed(f: Callable[[Any], Any], iterable: Iterable[Any],
                reducer: Callable[[Any, Any], Any] | None = None) -> Any:
    """``@distributed [reducer] for x in iterable``: one contiguous chunk per worker.

    With a reducer, each worker reduces its chunk and the partial results are reduced here,
    in order; the value is returned. Without one, returns at once a ``Future`` that is ready
    (value ``None``) once every chunk is done.
    """
    if not callable(f):
        raise TypeError(f"distributed(f, iterable): f must be callable, not {f!r}")
    if not isinstance(iterable, Iterable):
        raise TypeError(f"distributed(f, iterable): iterable must be iterable, not {iterable!r}")
    if reducer is not None and not callable(reducer):
        raise TypeError(f"distributed: reducer must be callable or None, not {reducer!r}")
    items = iterable if isinstance(iterable, (range, list, tuple)) else list(iterable)
    ids = workers()
    chunks = [items[r.start:r.stop] for r in splitrange(len(items), len(ids))] if len(items) else []
    futures = [remotecall(_chunk_reduce, ids[i % len(ids)], f, reducer, chunk)
               for i, chunk in enumerate(chunks)]
    if reducer is not None:
        if not futures:
            raise ValueError("distributed with a reducer needs at least one element")
        return reduce(reducer, [fut.fetch() for fut in futures])
    done: Future[None] = Future()

    def wait_all() -> None:
        try:
            for fut in futures:
                fut.wait()
            done.put(None)
        except BaseException as e:
            PGRP.lookup_ref(done.rrid).try_set(Failure(e))
    threading.Thread(target=wait_all, name="pydist-distributed", daemon=True).start()
    return done
