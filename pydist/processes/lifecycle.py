"""Adding, removing and interrupting workers: ``addprocs``, ``rmprocs``, ``interrupt``,
and the cluster cookie.

Only process 1 changes the cluster. ``addprocs`` runs the manager's ``launch`` in a
thread and joins each worker as soon as its config appears (ids in launch order), so a
slow host does not hold up a fast one.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..cluster.dispatch import OpContext, internal_op
from ..cluster.group import PGRP, cluster_cookie
from ..cluster.join import join_worker
from ..cluster.peers import TRANSPORTS, W_CONNECTED, W_TERMINATED, W_TERMINATING, Worker, WorkerConfig
from ..cluster.stopping import request_exit, send_interrupt
from ..errors import LaunchError, ProcessExitedException
from ..managers.base import ClusterManager, default_addprocs_params
from ..managers.local import LocalManager
from ..managers.params import normalize_env, normalize_exeflags, worker_timeout
from ..refs.remoteref import Future
from ..wire.messages import NULL_HEADER, RemoteDoMsg

__all__ = ["addprocs", "rmprocs", "interrupt", "on_workers_added"]

TOPOLOGIES = ("all_to_all", "master_worker", "custom")
_LOCAL_PARAMS = ("restrict",)
_SSH_PARAMS = ("tunnel", "multiplex", "sshflags", "shell", "max_parallel")
_SSH_ONLY = ("tunnel", "multiplex", "sshflags", "shell", "lease", "launch_timeout")
on_workers_added: list[Callable[[list[int]], None]] = []


def _only_master(what: str) -> None:
    if PGRP.role == "worker" or PGRP.myid != 1:
        raise RuntimeError(f"only process 1 (the master) may {what}; this is process {PGRP.myid}")


def _manager_for(arg: Any, kwargs: dict[str, Any]) -> ClusterManager:
    if isinstance(arg, ClusterManager):
        return arg
    if arg is None or (isinstance(arg, int) and not isinstance(arg, bool)):
        n = os.cpu_count() or 1 if arg is None else arg
        if n < 1:
            raise ValueError(f"addprocs needs a positive number of workers, got {n}")
        return LocalManager(n, restrict=kwargs.pop("restrict", True))
    if isinstance(arg, (list, tuple)):
        from ..managers.ssh import SSHManager  # loaded only for an SSH cluster (its cost)
        return SSHManager(list(arg))
    raise TypeError(f"addprocs takes a number of workers, a list of machines or a "
                    f"ClusterManager, not {arg!r} ({type(arg).__name__})")


def _check_keywords(manager: ClusterManager, params: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """An unknown keyword, or an SSH-only one for local workers: ``TypeError`` naming it."""
    local = isinstance(manager, LocalManager)
    allowed = set(params) | set(_LOCAL_PARAMS) | {"max_parallel"} | set(manager.known_params())
    if not local:
        allowed |= set(_SSH_PARAMS)
    for key in kwargs:
        if local and key in _SSH_ONLY:
            raise TypeError(f"addprocs() of local workers got the SSH-only keyword argument "
                            f"{key!r}; it applies to addprocs(machines) only")
        if key not in allowed:
            raise TypeError(f"addprocs() got an unexpected keyword argument {key!r}")


def _fixed_by_first(params: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """``topology`` and ``lazy`` are those of the first ``addprocs`` while workers exist
    (Julia's rule); not given, they follow it; given otherwise, ``ValueError``."""
    if not isinstance(params["lazy"], bool):
        raise TypeError(f"lazy must be True or False, not {params['lazy']!r}")
    existing = PGRP.worker_ids()
    if not existing:
        return
    for key in ("topology", "lazy"):
        current = getattr(PGRP, key)
        if key in kwargs and kwargs[key] is not None and kwargs[key] != current:
            raise ValueError(f"addprocs({key}={kwargs[key]!r}): workers {existing} already run with "
                             f"{key}={current!r}, which the first addprocs fixed; remove them "
                             f"(rmprocs) before asking for {key}={kwargs[key]!r}")
        params[key] = current


def _params(manager: ClusterManager, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = default_addprocs_params(manager)
    _check_keywords(manager, params, kwargs)
    params.update({k: v for k, v in kwargs.items() if v is not None or k in ("dir",)})
    if params.get("dir") is None:
        params["dir"] = os.getcwd()
    params["exeflags"] = normalize_exeflags(params.get("exeflags"), params.get("exename"))
    params["env"] = normalize_env(params.get("env"))
    params["worker_timeout"] = worker_timeout(params.get("worker_timeout"))
    if "launch_timeout" in params and kwargs.get("launch_timeout") is None and \
            (kwargs.get("worker_timeout") is not None or os.environ.get("PYDIST_WORKER_TIMEOUT")):
        params["launch_timeout"] = params["worker_timeout"]
    if params["transport"] not in TRANSPORTS:
        raise ValueError(f"unknown transport {params['transport']!r}; choose one of {', '.join(TRANSPORTS)}")
    if params["topology"] not in TOPOLOGIES:
        raise ValueError(f"unknown topology {params['topology']!r}; choose one of {', '.join(TOPOLOGIES)}")
    _fixed_by_first(params, kwargs)
    manager.check_params(params)
    return params


def addprocs(arg: Any = None, n: int | None = None, **kwargs: Any) -> list[int]:
    """Start workers and return their ids: ``addprocs(n)`` local workers,
    ``addprocs(machines)`` over SSH, ``addprocs(manager)`` with any cluster manager;
    ``addprocs(manager, n, timeout=)`` waits for ``n`` workers of a manager whose workers
    join by themselves (``ElasticManager``)."""
    _only_master("add workers")
    if n is not None:
        return _wait_for(arg, n, kwargs)
    manager = _manager_for(arg, kwargs)
    params = _params(manager, kwargs)
    cluster_cookie()
    PGRP.topology, PGRP.lazy = params["topology"], params["lazy"]
    launched: list[WorkerConfig] = []
    ntfy = threading.Condition()
    outcome: dict[str, BaseException | None] = {}   # "error", and "done" once over

    def launch() -> None:
        try:
            manager.launch(params, launched, ntfy)
        except BaseException as e:  # reported once every launched worker is settled
            outcome["error"] = e
        finally:
            with ntfy:
                outcome.setdefault("done", None)
                ntfy.notify_all()

    threading.Thread(target=launch, name="pydist-launch", daemon=True).start()
    return _join_launched(manager, params, launched, ntfy, outcome)


def _wait_for(manager: Any, n: int, kwargs: dict[str, Any]) -> list[int]:
    """``addprocs(manager, n, timeout=)``: the manager's own wait for workers that dial in."""
    wait_for = getattr(manager, "wait_for", None)
    if not isinstance(manager, ClusterManager) or wait_for is None:
        raise TypeError(f"addprocs(x, n) needs a manager whose workers join by themselves "
                        f"(ElasticManager), not {type(manager).__name__}")
    timeout = kwargs.pop("timeout", None)
    if kwargs:
        raise TypeError(f"addprocs(manager, n) takes only timeout=, not {sorted(kwargs)}")
    pids: list[int] = wait_for(n, timeout)
    return pids


def _join_launched(manager: ClusterManager, params: dict[str, Any], launched: list[WorkerConfig],
                   ntfy: threading.Condition, outcome: dict[str, Any]) -> list[int]:
    """Give each launched config an id and join it, until the launch is over."""
    seen, setups, joined, failures = 0, [], [], []
    sequential = not params["lazy"] or params["topology"] == "custom"

    def setup(w: Worker, config: WorkerConfig) -> None:   # (config: w's own)
        try:
            join_worker(w, params)
            manager.manage(w.id, config, "register")
            joined.append(w.id)
        except BaseException as e:
            failures.append(f"worker {w.id}: {e}")
            _discard(w, f"failed to join ({e})")

    while True:
        with ntfy:
            while seen == len(launched) and "done" not in outcome:
                ntfy.wait(0.5)
            fresh, seen = launched[seen:], len(launched)
            finished = "done" in outcome and seen == len(launched)
        for config in fresh:
            config.transport = config.transport if config.transport != "auto" else params["transport"]
            with PGRP.lock:   # an elastic manager may add workers while another addprocs runs
                w = Worker(PGRP.next_pid, config, manager)
                PGRP.next_pid += 1
            PGRP.add_worker(w)
            th = threading.Thread(target=setup, args=(w, config), name=f"pydist-join-{w.id}", daemon=True)
            th.start()
            if sequential:
                th.join()
            setups.append(th)
        if finished:
            break
    for th in setups:
        th.join()
    pids = sorted(joined)
    if pids:
        for hook in list(on_workers_added):
            hook(pids)
    error = outcome.get("error")
    if error is not None or failures:
        problems = ([f"launch failed: {error}"] if error is not None else []) + failures
        exc = LaunchError("; ".join(problems) + (f" (workers {pids} did join)" if pids else ""))
        exc.pids = pids   # type: ignore[attr-defined]  # an extra for the caller: who did join
        raise exc from error
    return pids


def _discard(w: Worker, detail: str) -> None:
    """Forget a worker that never joined, and make sure its process is gone."""
    w.detail = detail
    PGRP.worker_lost(w, detail)
    proc = getattr(w.config, "process", None)
    if proc is not None and hasattr(proc, "kill"):
        try:
            proc.kill()
            proc.wait(5)
        except Exception:
            pass


# -- removal ------------------------------------------------------------------------------------
def _validate_pids(pids: Iterable[Any], what: str) -> list[int]:
    out = []
    for pid in pids:
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError(f"{what} takes worker ids (int), not {pid!r} ({type(pid).__name__})")
        if pid == 1:
            raise ValueError(f"{what}: process 1 is the master and cannot be {what}d"
                             if what != "rmprocs" else "rmprocs: process 1 is the master and cannot be removed")
        if pid not in PGRP.workers and pid not in PGRP.removed:
            raise ValueError(f"{what}: no worker with id {pid} exists in this cluster "
                             f"(workers: {PGRP.worker_ids()})")
        out.append(pid)
    return out


def _check_waitfor(waitfor: Any) -> None:
    if waitfor is None:
        return
    if isinstance(waitfor, bool) or not isinstance(waitfor, (int, float)):
        raise TypeError(f"rmprocs: waitfor must be a number of seconds or None, not {waitfor!r}")
    if not waitfor >= 0:
        raise ValueError(f"rmprocs: waitfor must not be negative, not {waitfor!r}")


def rmprocs(*pids: Any, waitfor: float | None = None) -> Future[None] | None:
    """Remove workers; wait up to ``waitfor`` seconds (``None``: until they are gone).

    ``waitfor=0`` returns at once a ``Future`` (owned here) that completes when the removal
    is done, as Julia returns a task.
    """
    _only_master("remove workers")
    _check_waitfor(waitfor)
    if len(pids) == 1 and isinstance(pids[0], (list, tuple)):
        pids = tuple(pids[0])
    targets, killers = [], []
    for pid in _validate_pids(pids, "rmprocs"):
        w = PGRP.workers.get(pid)
        if w is None or w.state == W_TERMINATED:
            continue
        w.detail = w.detail or "was removed by rmprocs"
        w.state = W_TERMINATING
        targets.append(w)
        t = threading.Thread(target=_kill, args=(w,), name=f"pydist-kill-{pid}", daemon=True)
        t.start()
        killers.append(t)
    if waitfor == 0:
        return _removal_future(killers)
    deadline = None if waitfor is None else time.monotonic() + waitfor
    for w in targets:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not w.gone.wait(left):
            alive = [t.id for t in targets if not t.gone.is_set()]
            raise TimeoutError(f"rmprocs: workers {alive} were still running after {waitfor} s")
    # The connection closes a moment before the process ends: wait (within the deadline) for
    # the managers to see the processes exit, so that a return means they are gone.
    for t in killers:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return None


def _removal_future(killers: list[threading.Thread]) -> Future[None]:
    """A Future set (to ``None``) once every removal thread has finished."""
    done: Future[None] = Future()
    cell = done.local_cell()

    def settle() -> None:
        for t in killers:
            t.join()
        cell.try_set(None)
    threading.Thread(target=settle, name="pydist-rmprocs", daemon=True).start()
    return done


def _kill(w: Worker) -> None:
    try:
        if w.manager is not None and w.config is not None:
            w.manager.kill(w.id, w.config)
        else:
            request_exit(w.id)
    finally:
        if w.transport is not None and not w.gone.wait(1.0):
            PGRP.worker_lost(w, w.detail)
        PGRP.worker_lost(w, w.detail)   # and so deregistered, through the hook below


def _deregister(pid: int) -> None:
    """A worker is gone (removed or dead): tell its manager (Julia's :deregister)."""
    w = PGRP.workers.get(pid)
    if w is None or w.manager is None or w.config is None:
        return
    for op in ("deregister", "finalize"):    # the record is forgotten next: finalize it too
        try:
            w.manager.manage(pid, w.config, op)
        except Exception as e:  # a manager's failure must not hide the death itself
            print(f"pydist: {w.manager!r} failed to {op} worker {pid}: {e}", file=sys.stderr)


PGRP.on_worker_lost.append(_deregister)


def _tell_others(pid: int) -> None:
    """On the master: tell every other worker that ``pid`` is gone, so that their owned
    values forget it as a client even where they never connected to it (Julia does too)."""
    if PGRP.myid != 1 or PGRP.role == "worker":
        return
    for other in PGRP.worker_ids():
        if other != pid:
            try:
                PGRP.send(other, NULL_HEADER, RemoteDoMsg(_process_gone, (pid,), {}))
            except (ProcessExitedException, ValueError, OSError):
                pass


PGRP.on_worker_lost.append(_tell_others)


@internal_op
def _process_gone(ctx: OpContext, pid: int) -> None:
    with PGRP.lock:   # looked up and recorded at once: join._peer_record checks under it
        w = PGRP.workers.get(pid)
        if w is None:
            PGRP.removed.setdefault(pid, "has exited (the master says)")
    if w is not None:
        PGRP.worker_lost(w, "has exited (the master says)")
    else:
        PGRP.drop_client(pid)


# -- interrupts --------------------------------------------------------------------------------
def interrupt(*pids: Any) -> None:
    """Raise ``KeyboardInterrupt`` in the call running on each worker (all, if none named)."""
    _only_master("interrupt workers")
    if len(pids) == 1 and isinstance(pids[0], (list, tuple)):
        pids = tuple(pids[0])
    targets = _validate_pids(pids, "interrupt") if pids else PGRP.worker_ids()
    for pid in targets:
        w = PGRP.workers.get(pid)
        if w is None or w.state != W_CONNECTED:
            raise ProcessExitedException(pid, PGRP.removed.get(pid, ""))
        if w.manager is not None and w.config is not None:
            w.manager.manage(pid, w.config, "interrupt")
        else:
            send_interrupt(pid)


