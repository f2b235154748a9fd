"""``ElasticManager``: workers started anywhere, by anyone, join the master as they come.

The master listens (``ElasticManager(addr, port)``); ``em.worker_command()`` is the command
line to run wherever a worker should run (a Kubernetes job, a PBS or HTCondor script, a
shell on another host)::

    python -m pydist.worker --connect 10.1.2.3:9009 --lease 30 [--cookie-file PATH]

The cookie comes on the worker's standard input, or from a file only its owner can read
(``em.write_cookie_file(path)``); never on a command line or in the environment. Each worker
dials in (``managers/dialback.py``: the hello first, so a wrong cookie is refused before anything is
read from it), and joins at once, in the background, through ``addprocs(em)``: it shows in
``workers()`` as it comes. ``addprocs(em, n, timeout=)`` waits until ``n`` workers have
joined that no earlier such call returned, and returns their ids.

Workers keep a heartbeat lease (``cluster/lease.py``), so a worker whose master vanished exits
within the lease even if its connection stays open.
"""
from __future__ import annotations

import shlex
import sys
import threading
import time
from collections import deque
from typing import Any

from ..cluster import lease as _lease
from ..cluster.group import PGRP, cluster_cookie
from ..cluster.peers import W_CONNECTED, WorkerConfig
from ..cluster.stopping import request_exit
from ..errors import LaunchError
from ..managers.base import ClusterManager
from ..managers.dialback import Arrival, DialIn, write_cookie_file
from .lifecycle import addprocs

__all__ = ["ElasticManager"]


class ElasticManager(ClusterManager):
    """Listens at ``addr:port`` for workers that dial in (ClusterManagers.jl's ``ElasticManager``).

    ``cookie``: sets the cluster cookie (else the cluster's own is used); ``topology``:
    as for ``addprocs``; ``lease``: seconds a worker lives without hearing from the master.
    """

    def __init__(self, addr: str = "127.0.0.1", port: int = 9009, cookie: str | None = None,
                 *, topology: str = "all_to_all", lease: float = _lease.DEFAULT_LEASE) -> None:
        if not isinstance(addr, str) or not addr:
            raise ValueError(f"ElasticManager: addr must be an address to listen on, not {addr!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"ElasticManager: port must be 0..65535, not {port!r}")
        self.lease = _lease.check_lease(lease)
        self.topology = topology
        self._cookie = cluster_cookie(cookie)
        self._cond = threading.Condition()
        self._pending: deque[Arrival] = deque()
        self._joined: list[int] = []       # ids joined through this manager, oldest first
        self._claimed: set[int] = set()    # ids an addprocs(em, n) call has returned
        self._arrivals: dict[int, Arrival] = {}   # id(config) -> its connection, until joined
        self._closed = False
        self._dialin = DialIn(addr, port, self._cookie, self._arrive, "elastic")
        self.address = self._dialin.address
        threading.Thread(target=self._joiner, name="pydist-elastic", daemon=True).start()

    def __repr__(self) -> str:
        return f"ElasticManager({self.address!r})"

    def worker_command(self, cookie_file: str | None = None, exename: str | None = None) -> str:
        """The command line that starts a worker which joins this master; it reads the
        cookie from its standard input, or from ``cookie_file`` (see ``write_cookie_file``)."""
        argv = [exename or sys.executable, "-m", "pydist.worker", "--connect", self.address,
                "--lease", f"{self.lease:g}"]
        if cookie_file is not None:
            argv += ["--cookie-file", cookie_file]
        return shlex.join(argv)

    def write_cookie_file(self, path: str) -> None:
        """Write the cluster cookie to a new file ``path`` (mode 0600) for ``--cookie-file``."""
        write_cookie_file(path, self._cookie)

    def close(self) -> None:
        """Stop listening (workers that joined stay). Idempotent."""
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        self._dialin.close()
        for a in pending:
            a.transport.abort()

    # -- joining ----------------------------------------------------------------------
    def _arrive(self, arrival: Arrival) -> None:
        with self._cond:
            if self._closed:
                arrival.transport.abort()
                return
            self._pending.append(arrival)
            self._cond.notify_all()

    def _joiner(self) -> None:
        """Join arrivals in the background, a batch per ``addprocs(self)`` call."""
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                pids = addprocs(self, topology=self.topology)
            except LaunchError as e:
                print(f"pydist: an elastic worker did not join: {e}", file=sys.stderr)
                pids = list(getattr(e, "pids", []))
            except Exception as e:   # never let one bad arrival stop the joining
                print(f"pydist: joining elastic workers failed: {e!r}", file=sys.stderr)
                continue
            with self._cond:
                self._joined.extend(pids)
                self._cond.notify_all()

    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: Any) -> None:
        """Hand every pending arrival to ``addprocs`` (called by the background joiner)."""
        while True:
            with self._cond:
                if not self._pending:
                    return
                arrival = self._pending.popleft()
            info = arrival.info
            config = WorkerConfig(host=info.get("host"), transport="tcp",
                                  addresses=arrival.addresses,
                                  ospid=int(info["pid"]) if info.get("pid", "").isdigit() else None,
                                  userdata=dict(info))
            self._arrivals[id(config)] = arrival
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify_all()

    def wait_for(self, n: int, timeout: float | None = None) -> list[int]:
        """``addprocs(em, n, timeout=)``: the ids of ``n`` workers joined through this manager
        that no earlier call returned, waiting up to ``timeout`` seconds for them."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"addprocs(ElasticManager, n): n must be a positive int, not {n!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                fresh = [p for p in self._joined if p not in self._claimed and _alive(p)]
                if len(fresh) >= n:
                    self._claimed.update(fresh[:n])
                    return sorted(fresh[:n])
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise LaunchError(
                        f"ElasticManager at {self.address}: {len(fresh)} of {n} workers joined "
                        f"within {timeout:g} s (workers {sorted(fresh)}); start more with: "
                        f"{self.worker_command()}")
                self._cond.wait(left if left is None else min(left, 1.0))

    # -- the cluster's callbacks ----------------------------------------------------------
    def connect(self, pid: int, config: WorkerConfig) -> Any:
        arrival = self._arrivals.pop(id(config), None)
        if arrival is None:
            raise LaunchError(f"worker {pid}: no connection from it is waiting")
        return arrival.transport

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        if op == "register":
            _lease.renew(pid, self.lease)
        elif op == "deregister":
            _lease.forget(pid)
        super().manage(pid, config, op)

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Ask the worker to exit; if it lingers, ``rmprocs`` closes its connection, which
        makes it exit too."""
        _lease.forget(pid)
        request_exit(pid)


def _alive(pid: int) -> bool:
    w = PGRP.workers.get(pid)
    return w is not None and w.state == W_CONNECTED
