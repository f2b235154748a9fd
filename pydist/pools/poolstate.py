"""A worker pool's state on its owner: members, idle workers, and who waits for one.

The model:

* A ``WorkerPool``'s state (its member workers, the queue of idle ones, the takers waiting
  for one) lives on its *owner*, the process that created it, in the cell of a remote
  reference (``PGRP.refs``). Other processes send every operation to the owner as
  ``_pool_op``, an internal operation answered on the owner's reader thread without
  blocking: a ``take`` that has to wait parks a *taker* that the next ``put_back``/``push``
  hands a worker to, and a deadline on the shared timer thread (``channel.TIMERS``)
  withdraws it.
* A worker handed out is *lent* to the taking process; if that process dies, its workers
  go back to the pool. A worker that dies leaves every pool of every process that hears of
  it (``PGRP.on_worker_lost``), and ``take`` skips workers known to be gone.
* The default pool's state is made on process 1 under a fixed id (``DEFAULT_POOL_ID``) on
  first use, from the connected workers; ``addprocs``/``rmprocs`` keep it current. While
  it has no member it lends process 1.
"""
from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

from ..cluster.dispatch import OpContext, internal_op
from ..cluster.group import PGRP
from ..cluster.peers import W_CONNECTED, W_TERMINATED, W_TERMINATING
from ..cluster.values import Failure
from ..processes.lifecycle import on_workers_added
from ..refs.channel import TIMERS
from ..wire.messages import RRID

DEFAULT_POOL_ID = RRID(1, 0)       # never handed out by next_rrid (ids start at 1)


def _alive(pid: int) -> bool:
    """Whether ``pid`` may still be handed out (not known to be gone or going)."""
    if pid == PGRP.myid:
        return True
    if pid in PGRP.removed:
        return False
    w = PGRP.workers.get(pid)
    if w is None:
        return PGRP.role == "worker"    # a peer this worker has not met yet
    return w.state not in (W_TERMINATING, W_TERMINATED)


# -- who waits ----------------------------------------------------------------------------------
class _Waiter:
    """Someone waiting on a pool: a taker (wants a worker) or a watcher (wants readiness)."""

    __slots__ = ("client", "_ctx", "_given", "value")

    def __init__(self, client: int, ctx: OpContext | None = None) -> None:
        self.client = client
        self._ctx = ctx
        self._given = threading.Event() if ctx is None else None
        self.value: Any = None

    def give(self, value: Any) -> None:
        """Hand over ``value`` (a pid, or ``None`` for a watcher); called outside pool locks."""
        if self._ctx is not None:
            self._ctx.reply(value)
        else:
            self.value = value
            self._given.set()       # type: ignore[union-attr]  # made when there is no ctx

    def wait(self, timeout: float | None) -> bool:
        """Whether something was handed over within ``timeout`` (may be called again)."""
        runner = PGRP.existing_runner
        if runner is None:
            return self._given.wait(timeout)    # type: ignore[union-attr]  # a local waiter's
        with runner.blocking():
            return self._given.wait(timeout)    # type: ignore[union-attr]  # a local waiter's


# -- the owner's state --------------------------------------------------------------------------
_Handovers = list[tuple[_Waiter, Any]]     # (waiter, what it is handed), made under the lock


class _PoolState:
    """Members, idle workers, waiting takers and watchers of one pool, on its owner."""

    def __init__(self, lends_master: bool = False) -> None:
        self.lock = threading.Lock()
        self.members: set[int] = set()
        self.idle: deque[int] = deque()
        self.takers: deque[_Waiter] = deque()
        self.watchers: list[_Waiter] = []
        self.lent: dict[int, int] = {}          # worker -> process that took it
        self.lends_master = lends_master
        _STATES.add(self)

    # Every method decides under the lock and hands over outside it.
    def _lending(self) -> bool:
        return self.lends_master and not self.members

    def _offer(self, pid: int, out: _Handovers) -> None:
        """Give ``pid`` to the first live taker, else make it idle (under the lock)."""
        while self.takers:
            w = self.takers.popleft()
            if w.client == PGRP.myid or w.client not in PGRP.removed:
                self.lent[pid] = w.client
                out.append((w, pid))
                return
        if pid not in self.idle:
            self.idle.append(pid)
        out.extend((w, None) for w in self.watchers)
        self.watchers.clear()

    def _lend_master_to_all(self, out: _Handovers) -> None:
        """The default pool just became empty: everyone waiting gets process 1."""
        out.extend((w, 1) for w in self.takers)
        out.extend((w, None) for w in self.watchers)
        self.takers.clear()
        self.watchers.clear()

    @staticmethod
    def _hand_over(out: _Handovers) -> None:
        for w, value in out:
            w.give(value)

    def push(self, pids: Iterable[int]) -> None:
        out: _Handovers = []
        with self.lock:
            for pid in pids:
                if pid not in self.members:
                    self.members.add(pid)
                    self._offer(pid, out)
        self._hand_over(out)

    def put_back(self, pid: int) -> None:
        out: _Handovers = []
        with self.lock:
            if self.lent.pop(pid, None) is None:
                return      # not taken from this pool (or already back): nothing to do
            if pid in self.members and pid not in self.idle:
                if _alive(pid):
                    self._offer(pid, out)
                else:
                    self._drop_locked(pid, out)
        self._hand_over(out)

    def _drop_locked(self, pid: int, out: _Handovers) -> None:
        self.members.discard(pid)
        self.lent.pop(pid, None)
        try:
            self.idle.remove(pid)
        except ValueError:
            pass
        if self._lending():
            self._lend_master_to_all(out)

    def drop(self, pid: int) -> None:
        """``pid`` died: it leaves the pool; workers lent to it come back."""
        out: _Handovers = []
        with self.lock:
            if pid in self.members:
                self._drop_locked(pid, out)
            self.takers = deque(w for w in self.takers if w.client != pid)
            self.watchers = [w for w in self.watchers if w.client != pid]
            for worker in [p for p, c in self.lent.items() if c == pid]:
                del self.lent[worker]
                if worker in self.members and _alive(worker):
                    self._offer(worker, out)
        self._hand_over(out)

    def _take_idle_locked(self, client: int) -> int | None:
        while self.idle:
            pid = self.idle.popleft()
            if _alive(pid):
                self.lent[pid] = client
                return pid
            self._drop_locked(pid, [])   # nobody can wait while a worker is idle
        return None

    def take(self, waiter: _Waiter, timeout: float | None) -> int | None:
        """A worker now, or ``None`` once ``waiter`` is parked (``TimeoutError`` if
        ``timeout`` is 0 and none is free)."""
        with self.lock:
            pid = self._take_idle_locked(waiter.client)
            if pid is not None:
                return pid
            if self._lending():
                return 1
            if timeout is not None and timeout <= 0:
                raise TimeoutError("no worker of the pool is free")
            self.takers.append(waiter)
        if timeout is not None:
            TIMERS.call_later(timeout, lambda: self._expire(waiter, timeout))
        return None

    def take_some(self, n: int, client: int) -> list[int]:
        """Up to ``n`` idle workers, without waiting and without lending process 1."""
        out: list[int] = []
        with self.lock:
            while len(out) < n:
                pid = self._take_idle_locked(client)
                if pid is None:
                    break
                out.append(pid)
        return out

    def waiting(self) -> int:
        """How many takers wait for a worker."""
        with self.lock:
            return len(self.takers)

    def ready(self) -> bool:
        with self.lock:
            return bool(self.idle) or self._lending()

    def watch(self, waiter: _Waiter, timeout: float | None) -> bool:
        """True if ready now; else park ``waiter`` until it is (or ``timeout``)."""
        with self.lock:
            if self.idle or self._lending():
                return True
            if timeout is not None and timeout <= 0:
                raise TimeoutError("no worker of the pool became free")
            self.watchers.append(waiter)
        if timeout is not None:
            TIMERS.call_later(timeout, lambda: self._expire(waiter, timeout))
        return False

    def cancel(self, waiter: _Waiter) -> bool:
        """Withdraw a waiter; False if it was already handed something."""
        with self.lock:
            for queue in (self.takers, self.watchers):
                try:
                    queue.remove(waiter)
                    return True
                except ValueError:
                    pass
        return False

    def _expire(self, waiter: _Waiter, timeout: float) -> None:
        if self.cancel(waiter) and waiter._ctx is not None:
            waiter._ctx.reply(Failure(TimeoutError(
                f"timed out after {timeout} s waiting for a worker of the pool")))

    def snapshot(self) -> list[int]:
        with self.lock:
            return sorted(self.members)


# -- the states this process owns --------------------------------------------------------------
_STATES: weakref.WeakSet[_PoolState] = weakref.WeakSet()
_default_lock = threading.Lock()
_default: _PoolState | None = None


def _default_state() -> _PoolState:
    """The master's default pool state, made on first use from the connected workers."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                st = _PoolState(lends_master=True)
                with PGRP.lock:
                    pids = [p for p, w in PGRP.workers.items() if w.state == W_CONNECTED and p != 1]
                st.push(sorted(pids))
                _default = st
    return _default


def _state(rrid: RRID) -> _PoolState:
    """The state of pool ``rrid`` owned by this process."""
    if rrid == DEFAULT_POOL_ID and PGRP.myid == 1:
        return _default_state()
    cell = PGRP.lookup_ref(rrid, create=False)
    if cell is None or not cell.ready() or not isinstance(cell.value, _PoolState):
        raise ValueError(f"worker pool {rrid.whence}:{rrid.id} no longer exists on process {PGRP.myid}")
    return cell.value


def _check_pid(pid: Any) -> int:
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise TypeError(f"a pool holds worker ids (int), not {pid!r} ({type(pid).__name__})")
    PGRP.check_pid(pid)
    return pid


# -- operations from other processes, and news of workers ------------------------------------
@internal_op
def _pool_op(ctx: OpContext, rrid: RRID, name: str, args: tuple[Any, ...]) -> None:
    """Every pool operation, run on the owner for another process."""
    try:
        st = _state(rrid)
        if name == "take":
            pid = st.take(_Waiter(ctx.sender, ctx), args[0])
            if pid is not None:
                ctx.reply(pid)
        elif name == "wait":
            if st.watch(_Waiter(ctx.sender, ctx), args[0]):
                ctx.reply(None)
        elif name == "put_back":
            st.put_back(args[0])
            ctx.reply(None)
        elif name == "push":
            st.push([_check_pid(args[0])])
            ctx.reply(None)
        elif name == "take_some":
            ctx.reply(st.take_some(args[0], ctx.sender))
        elif name == "poll":
            ctx.reply((st.take_some(args[0], ctx.sender), st.waiting()))
        elif name == "len":
            ctx.reply(len(st.members))
        elif name == "isready":
            ctx.reply(st.ready())
        elif name == "workers":
            ctx.reply(st.snapshot())
        else:
            raise ValueError(f"unknown pool operation {name!r}")
    except Exception as e:
        ctx.reply(Failure(e))


def _on_worker_lost(pid: int) -> None:
    for st in list(_STATES):
        st.drop(pid)


def _on_workers_added(pids: list[int]) -> None:
    if PGRP.myid == 1 and _default is not None:
        _default.push(pids)


PGRP.on_worker_lost.append(_on_worker_lost)
on_workers_added.append(_on_workers_added)
