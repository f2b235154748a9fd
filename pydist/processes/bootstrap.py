"""Starting a worker process: ``init_worker``, ``start_worker`` and the ``pydist-worker``
command (Julia's ``julia --worker``).

A worker reads the cluster cookie from its standard input (never argv or the
environment), listens on its transports, prints one contact line::

    PYDIST_WORKER 1 tcp://127.0.0.1:40123 shm://@pydist-9f2c...

and then serves calls on its main thread until told to exit. It exits on its own when
its master is gone: end of its standard input (the lifeline), the master's connection
closing, or no master joining within ``JOIN_WAIT`` seconds.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import threading
import types
from typing import Any, TextIO

from .. import transport as _transport
from ..cluster.group import PGRP
from ..cluster.join import accept_loop, serve_incoming
from ..cluster.output import install_worker_streams
from ..cluster.runner import TaskRunner
from ..cluster.stopping import exit_worker
from ..managers.base import CONTACT_PREFIX
from ..managers.dialback import dial_master, read_cookie_file, route_to
from ..net.address import format_tcp_url
from ..shm.placement import allow_moves

__all__ = ["init_worker", "start_worker", "worker_main", "worker_parser", "process_messages"]

JOIN_WAIT = 60.0


def init_worker(cookie: str, manager: Any = None) -> None:
    """Make this process a worker of a cluster with ``cookie`` (not yet joined)."""
    if not isinstance(cookie, str):
        raise TypeError(f"the cluster cookie must be a str, not {type(cookie).__name__}")
    PGRP.role = "worker"
    PGRP.myid = 0          # until the master says otherwise
    PGRP.cookie = cookie
    PGRP.on_worker_lost.append(_on_lost)


def _on_lost(pid: int) -> None:
    if pid == 1:
        exit_worker(0)   # no master, no purpose: Julia's workers exit too


def _read_cookie() -> str:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("pydist-worker: expected the cluster cookie on standard input")
    return line.strip()


def _listen(bind: str, transports: tuple[str, ...], port: int = 0) -> list[Any]:
    listeners = []
    for scheme in transports:
        url = format_tcp_url(bind, port) if scheme == "tcp" else f"{scheme}://"
        try:
            listeners.append(_transport.listen(url))
        except Exception as e:
            if scheme == "tcp":
                raise
            print(f"pydist-worker: no {scheme} transport here ({e}); using tcp", file=sys.stderr)
    return listeners


def _watch_stdin() -> None:
    """The lifeline: the master holds our stdin open; its end means the master is gone."""
    try:
        while os.read(sys.stdin.fileno(), 4096):
            pass
    except OSError:
        pass
    exit_worker(0)


def _join_watchdog() -> None:
    """Exit if no master joins in time (it may have died before connecting)."""
    if not PGRP.workers.get(1) and not _joined.wait(JOIN_WAIT):
        print(f"pydist-worker: no master joined within {JOIN_WAIT:.0f} s; exiting", file=sys.stderr)
        exit_worker(1)


_joined = threading.Event()


def start_worker(out: TextIO = sys.stdout, cookie: str | None = None, *, close_stdin: bool = True,
                 stderr_to_stdout: bool = True, bind: str = "127.0.0.1",
                 transports: tuple[str, ...] = ("tcp", "shm"), lifeline: bool = False,
                 port: int = 0, lease: float = 0.0, connect: str | None = None) -> None:
    """Run this process as a worker until it is told to exit (never returns).

    ``lease`` > 0: exit when no heartbeat comes from the master for that many seconds
    (see ``cluster/lease.py``); ``port``: the TCP port to listen on (0: any free one);
    ``connect``: ``tcp://host:port`` of a master to dial (``managers.dialback``) instead of
    printing a contact line, listening for peers on the address that routes there.
    """
    init_worker(_read_cookie() if cookie is None else cookie)
    if connect is not None and bind == "127.0.0.1":
        bind = route_to(connect)
    if stderr_to_stdout and hasattr(out, "fileno"):
        os.dup2(out.fileno(), 2)
    try:
        out.reconfigure(line_buffering=True)  # type: ignore[attr-defined]  # a TextIO may lack it: caught
    except (AttributeError, ValueError):
        pass
    if hasattr(signal, "SIGUSR1"):   # `kill -USR1 <worker>` prints every thread's stack
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    runner = TaskRunner(main_thread=True)
    PGRP.set_runner(runner)
    runner.install_sigint()
    _allow_shm_moves()
    PGRP.on_joined = _joined.set   # before anyone can dial in: a quick master must not be missed
    PGRP.listeners = _listen(bind, transports, port)
    for listener in PGRP.listeners:
        threading.Thread(target=accept_loop, args=(listener,), name="pydist-accept",
                         daemon=True).start()
    addresses = " ".join(listener.address for listener in PGRP.listeners)
    if connect is None:
        print(f"{CONTACT_PREFIX} 1 {addresses}", file=out, flush=True)
    else:
        _dial_master(connect, addresses.split())
    if out is sys.stdout:
        install_worker_streams()   # counted from here on, as the master's relay counts
    if lifeline:
        threading.Thread(target=_watch_stdin, name="pydist-lifeline", daemon=True).start()
    elif close_stdin:
        sys.stdin.close()
    threading.Thread(target=_join_watchdog, name="pydist-join-watchdog", daemon=True).start()
    if lease > 0:
        from ..cluster.lease import watch  # its cost only where a lease is kept (remote workers)
        watch(lease, _joined, exit_worker)
    runner.run_main_loop(_master_inbox)
    exit_worker(0)


def _dial_master(url: str, addresses: list[str]) -> None:
    """Dial the master and serve the connection as if it had dialed us; exit on failure."""
    try:
        t = dial_master(url, PGRP.cookie or "", tuple(addresses))
    except Exception as e:
        print(f"pydist-worker: could not join the master at {url}: {e}", file=sys.stderr)
        exit_worker(1)
    threading.Thread(target=serve_incoming, args=(t,), name="pydist-master", daemon=True).start()


def _allow_shm_moves() -> None:
    """Let the shared-memory transport move this worker's waiting threads off the vCPU its
    peer runs on (``pydist/shm/placement.py``); a master is never moved."""
    allow_moves()


def _master_inbox() -> Any:
    master = PGRP.workers.get(1)
    return None if master is None else master.inbox


def process_messages(reader: Any, writer: Any = None, incoming: bool = True) -> None:
    """Serve the cluster protocol over an already-open transport (for custom managers)."""
    if not isinstance(reader, _transport.Transport) or writer not in (None, reader):
        raise TypeError("process_messages takes one pydist Transport (reader and writer alike)")
    if not incoming:
        raise ValueError("process_messages(incoming=False): the master dials through "
                         "ClusterManager.connect instead")
    threading.Thread(target=serve_incoming, args=(reader,), daemon=True).start()


_parser: list[argparse.ArgumentParser] = []     # built once (the worker server builds it
                                                 # before it forks, so no child pays for it)


def worker_parser() -> argparse.ArgumentParser:
    """The ``pydist-worker`` command's argument parser (building one costs a millisecond or
    two: help formatting, message lookups; parsing with it is cheap)."""
    if _parser:
        return _parser[0]
    parser = argparse.ArgumentParser(prog="pydist-worker",
                                     description="Run a pydist worker; the cookie comes on stdin.")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--transports", default="tcp,shm", help="comma-separated: tcp, shm")
    parser.add_argument("--lifeline", action="store_true",
                        help="exit when standard input closes (the master holds it open)")
    parser.add_argument("--port", type=int, default=0,
                        help="TCP port to listen on (default 0: any free port)")
    parser.add_argument("--separate-stderr", action="store_true",
                        help="keep stderr apart from stdout (by default it joins stdout)")
    parser.add_argument("--lease", type=float, default=0.0, metavar="SECONDS",
                        help="exit when the master sends no heartbeat for SECONDS (0: never)")
    parser.add_argument("--connect", metavar="HOST:PORT",
                        help="dial the master at HOST:PORT instead of waiting to be dialed")
    parser.add_argument("--cookie-file", metavar="PATH",
                        help="read the cookie from PATH (mode 0600) instead of standard input")
    _parser.append(parser)
    return parser


def worker_main(argv: list[str] | None = None) -> None:
    """The ``pydist-worker`` command."""
    args = worker_parser().parse_args(argv)
    cookie = read_cookie_file(args.cookie_file) if args.cookie_file else None
    # User code shipped here lands in an empty __main__ (Julia's Main), not in this command's.
    sys.modules["__main__"] = types.ModuleType("__main__")
    start_worker(sys.stdout, cookie, bind=args.bind, lifeline=args.lifeline, port=args.port,
                 stderr_to_stdout=not args.separate_stderr,
                 lease=args.lease, transports=tuple(s for s in args.transports.split(",") if s),
                 connect=f"tcp://{args.connect}" if args.connect else None)
