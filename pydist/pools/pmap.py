"""``pmap``: a parallel map over the workers of a pool, with retries and error handling.

How the work flows (one ``_Mapper`` per call, driven by the calling thread; ``mapper.py``):

1. The inputs are collected (``zip`` of the iterables). Each element is, at any moment,
   in exactly one place: not yet sent, in a *chunk* on its way to or running on a worker,
   waiting for a retry, or done.
2. Workers are taken from the pool (all idle ones, and more as they become free or are
   added) and each is kept busy with a window of chunks in flight, so a worker never
   waits for a round trip. While someone else waits for a worker of the same pool, the
   map hands one back at each poll (keeping one for itself). The windows and the handing
   back are the scheduling the drop-ins use too (``scheduler.py``). The function is shipped to
   each worker once (the CachingPool mechanism; a private cache for this call unless the
   pool is a CachingPool).
3. A chunk is one remote call running ``f`` over several elements and answering each
   element's value or captured failure separately. With ``batch_size=1`` (the default) its
   length is chosen from the time one element takes there: one element at first, then
   enough for a few milliseconds of work, smaller again towards the end so every worker
   finishes together. That is only a way to send messages: retries, ``on_error`` and the
   order of results are per element, exactly as if each element were its own call. With
   ``batch_size=n`` a chunk holds ``n`` elements, as Julia's batches do.
4. A failed element is retried after the next of ``retry_delays`` (if ``retry_check``
   agrees), on whichever worker is free; elements on a worker that died are retried
   elsewhere. Once retries are exhausted, ``on_error(exc)`` gives its result, or the
   exception is raised and the map stops.
5. Workers go back to the pool when the map no longer needs them (after their last call
   there has finished).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from ..cluster.dispatch import capture
from ..cluster.group import PGRP
from .mapper import _Mapper
from .progress import check_progress, progress_bar
from .retries import Delays, RetryPolicy
from .workerpool import AbstractWorkerPool, default_worker_pool

__all__ = ["pmap"]


# -- the public function -----------------------------------------------------------------------------
def pmap(f: Callable[..., Any], *iterables: Iterable[Any], pool: AbstractWorkerPool | None = None,
         distributed: bool = True, batch_size: int | str = 1,
         on_error: Callable[[BaseException], Any] | None = None,
         retry_delays: Iterable[float] = (), retry_check: Callable[..., Any] | None = None,
         progress: bool = False) -> list[Any]:
    """``[f(*xs) for xs in zip(*iterables)]``, computed on the workers of ``pool``
    (default: ``default_worker_pool()``), in input order. Julia's ``pmap(f, pool, xs)``
    works too: a worker pool as the first iterable is taken as ``pool``.

    ``batch_size``: elements per remote call (an int, or ``"auto"``). ``on_error(exc)``
    gives a failed element's result; without it the first failure (a ``RemoteException``,
    or ``ProcessExitedException``) is raised. ``retry_delays``: seconds to wait before each
    retry of a failed element; ``retry_check(state, exc) -> (state, bool)`` may veto one.
    ``distributed=False`` runs everything in this process. ``progress=True`` shows a
    ``tqdm.auto`` bar (needs ``pip install 'pydist[progress]'``).
    """
    if pool is None and len(iterables) > 1 and isinstance(iterables[0], AbstractWorkerPool):
        pool, iterables = iterables[0], iterables[1:]   # Julia's pmap(f, pool, xs)
    if not callable(f):
        raise TypeError(f"pmap needs a callable, not {type(f).__name__}")
    if not iterables:
        raise TypeError("pmap needs at least one iterable")
    for i, it in enumerate(iterables):
        if not isinstance(it, Iterable):
            raise TypeError(f"pmap(f, xs...): argument {i + 2} must be iterable, not {it!r}")
    if pool is not None and not isinstance(pool, AbstractWorkerPool):
        raise TypeError(f"pmap's pool must be a worker pool, not {type(pool).__name__}")
    for name, fn in (("on_error", on_error), ("retry_check", retry_check)):
        if fn is not None and not callable(fn):
            raise TypeError(f"pmap's {name} must be callable, not {type(fn).__name__}")
    if batch_size != "auto" and (not isinstance(batch_size, int) or isinstance(batch_size, bool)):
        raise TypeError(f"batch_size must be an int or 'auto', not {batch_size!r}")
    if isinstance(batch_size, int) and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_progress(progress, "pmap")
    policy = RetryPolicy(Delays(retry_delays), retry_check)
    star = len(iterables) > 1
    items = list(zip(*iterables)) if star else list(iterables[0])
    if not items:
        return []
    bar = progress_bar(len(items), "pmap") if progress else None
    try:
        if distributed:
            pool = default_worker_pool() if pool is None else pool
            if len(pool) == 0 or pool.workers() == [PGRP.myid]:
                distributed = False      # nothing to distribute to (as Julia does)
        if not distributed or pool is None:
            return _map_here(f, items, star, policy, on_error, bar)
        return _Mapper(f, items, star, pool, batch_size, policy, on_error, bar).run()
    finally:
        if bar is not None:
            bar.close()


def _map_here(f: Callable[..., Any], items: list[Any], star: bool, policy: RetryPolicy,
              on_error: Callable[[BaseException], Any] | None, bar: Any) -> list[Any]:
    """``distributed=False``: every element in this process, in order."""
    out = []
    for i, x in enumerate(items):
        while True:
            try:
                value = f(*x) if star else f(x)
            except Exception as e:
                exc = capture(e)
                delay = policy.on_failure(i, exc)
                if delay is None:
                    if on_error is None:
                        raise exc from None
                    value = on_error(exc)
                else:
                    time.sleep(delay)
                    continue
            break
        out.append(value)
        if bar is not None:
            bar.update(1)
    return out
