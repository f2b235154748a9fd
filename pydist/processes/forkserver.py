"""The worker server: a single-threaded interpreter that forks new local workers.

Starting a worker as a fresh interpreter costs an interpreter start and an ``import
pydist`` (about 0.1 s). A fork of the (threaded) master would be faster but unsafe: a
lock held by another thread at the fork stays held forever in the child. So each master
starts, on its first local launch, one helper interpreter that imports the worker side
of pydist (and the modules asked to preload) once, never starts a thread, and forks a
worker for each request. The story of one server:

1. The master runs ``python -m pydist.processes.forkserver FD`` in a session of its own,
   with the workers' environment; FD is its end of a Unix socket pair (``SOCK_SEQPACKET``:
   one message per request, file descriptors beside it).
2. The server imports what workers need and says ``("ready", pid)``.
3. A request ``("fork", cwd, environ, argv, preload, stdlib, sources)`` comes with three
   descriptors: the worker's standard input (the master holds the other end: cookie, then
   lifeline), standard output and standard error (the master reads them). The server
   imports any module of ``preload`` it has not imported yet (and of ``stdlib``, the
   standard modules the master has, skipping any that fails), compiles the program's own
   modules of ``sources`` that have no bytecode cache, for its children to import without
   compiling them (``managers/codecache.py``), forks, closes its copies of
   the descriptors and answers ``("forked", pid)`` (or ``("error", why)``: the master then
   starts a fresh interpreter).
4. The child becomes what ``python -m pydist.worker ARGV`` run in ``cwd`` with
   ``environ`` would be: a session of its own, the descriptors as 0, 1 and 2, that
   directory, that environment, ``sys.path[0]`` the directory, random generators seeded
   afresh; then ``worker_main(argv)``.
   It never returns into the server's loop.
5. The server reaps its children and reports each as ``("exit", pid, returncode)``
   (``subprocess``'s convention: minus the signal number when a signal ended it).
6. The end of the socket (the master is gone, or closed it) ends the server. It never
   kills a worker: each has its own lifeline to the master.

The messages are pickles; they cross only this private socket pair between a master and
the child it started, never a network, and carry no cookie.
"""
from __future__ import annotations

import gc
import importlib
import os
import pickle
import selectors
import signal
import socket
import sys
import threading
import traceback
import warnings
from typing import Any

from ..cluster.stopping import flush_and_exit
from ..managers import codecache
from .bootstrap import worker_main, worker_parser

__all__ = ["serve", "BASE_PRELOAD", "MAX_MESSAGE"]

# What ``python -m pydist.worker`` puts in ``sys.argv[0]``: the file of that command.
WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "worker.py")

MAX_MESSAGE = 1 << 20          # bytes of one request (an environment, a preload list)
# What every worker needs before its first call: imported once here, not once per worker,
# before the server says it is ready.
BASE_PRELOAD = ("pydist", "pydist.processes.bootstrap", "pydist.refs.remotecall",
                "pydist.refs.remoteref", "pydist.refs.generic", "pydist.dropin.worker_side",
                "pydist.shm.transport", "pydist.net.tcp", "cloudpickle", "encodings.idna", "runpy")
# What a worker needs only for some calls (a nested pmap, a channel, addprocs): imported
# once the server is ready and has had no request for LATER_AFTER seconds, one module a
# turn, so that a program's first workers neither wait for them nor share the CPUs with
# their import as they start. A worker forked before they are imported imports them on
# first use.
LATER_PRELOAD = ("pydist.refs.remotechannel", "pydist.refs.channel", "pydist.refs.macros",
                 "pydist.pools.workerpool", "pydist.pools.pmap", "pydist.pools.mapper",
                 "pydist.processes.lifecycle")
LATER_AFTER = 0.2


class _MasterGone(Exception):
    """The master's end of the socket is closed: nobody to serve any more."""


class _Server:
    """The server's loop: requests on ``sock``, child exits through a SIGCHLD wake-up pipe."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.children: set[int] = set()
        self.later = list(LATER_PRELOAD)   # imported while idle, one a turn

    def run(self) -> None:
        """Serve until the master closes its end, or is found gone by a reply."""
        signal.signal(signal.SIGCHLD, _ignore)     # a Python handler, so the wake-up fd fires
        signal.set_wakeup_fd(self.wake_w)
        try:
            self.send(("ready", os.getpid()))
            while True:
                events = self.selector.select(LATER_AFTER if self.later else None)
                if not events and self.later:
                    _preload([self.later.pop(0)])
                for key, _ in events:
                    if key.fileobj is self.sock:
                        if not self.serve_one():
                            return
                    else:
                        _drain(self.wake_r)
                self.reap()
        except _MasterGone:
            return

    def send(self, msg: tuple[Any, ...]) -> None:
        try:
            self.sock.send(pickle.dumps(msg))
        except OSError as e:    # the master ended (its children's exits come after it)
            raise _MasterGone from e

    def serve_one(self) -> bool:
        """Answer one request; ``False`` at the end of the socket."""
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 3)
        except OSError:
            return False
        if not data:
            return False
        try:
            msg = pickle.loads(data)
            if msg[0] != "fork" or len(fds) != 3:
                raise ValueError(f"unexpected request {msg[0]!r} with {len(fds)} descriptors")
            _, cwd, environ, argv, preload, stdlib, sources = msg
            _import_quietly(stdlib)
            codecache.compile_sources(sources)
            self.send(("forked", self.fork(cwd, environ, argv, preload, fds)))
        except _MasterGone:
            raise
        except Exception as e:
            self.send(("error", f"{type(e).__name__}: {e}"))
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def fork(self, cwd: str, environ: dict[str, str], argv: list[str], preload: list[str],
             fds: list[int]) -> int:
        for name in preload:
            if name not in sys.modules:
                importlib.import_module(name)
        if _threads() > 1:
            # A module started a thread: forking now could copy a held lock.
            raise RuntimeError("the worker server has threads (a preloaded module started one)")
        # What is imported now stays out of the collector's way in the children: a child
        # that collects would otherwise touch, and so copy, every page of it.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            self.become_worker(cwd, environ, argv, fds)   # never returns
        self.children.add(pid)
        return pid

    def become_worker(self, cwd: str, environ: dict[str, str], argv: list[str],
                      fds: list[int]) -> None:
        code = 1
        try:
            self.shed_server()
            os.setsid()
            stdin, out, err = fds
            os.dup2(stdin, 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            for fd in fds:
                os.close(fd)
            os.chdir(cwd)
            _set_environ(environ)
            sys.path[0] = os.getcwd()     # what ``python -m`` puts first
            _reseed()
            sys.argv = [WORKER_SCRIPT, *argv]
            worker_main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            flush_and_exit(code)

    def shed_server(self) -> None:
        """Drop everything of the server in a fresh child: its signals, socket and pipes."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.selector.close()
        self.sock.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def reap(self) -> None:
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 255 << 8
            if done:
                self.children.discard(pid)
                self.send(("exit", pid, os.waitstatus_to_exitcode(status)))


def _set_environ(environ: dict[str, str]) -> None:
    """Make ``os.environ`` exactly ``environ``, changing only the variables that differ
    (it is mostly the server's own: setting every variable afresh costs a child about a
    millisecond)."""
    current = os.environ
    for key in [k for k in current if k not in environ]:
        del current[key]
    for key, value in environ.items():
        if current.get(key) != value:
            current[key] = value


def _reseed() -> None:
    """Give a forked worker random streams of its own, as a fresh interpreter has
    (``random`` reseeds itself after a fork; numpy's global generator does not)."""
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed()


def _threads() -> int:
    """Threads of this process, native ones included where the OS lists them."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _ignore(signum: int, frame: Any) -> None:
    """SIGCHLD only needs to wake the loop (through the wake-up fd)."""


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _import_quietly(names: list[str]) -> None:
    """Import the standard modules the master has (see forkclient.py), without a word: one
    that fails to import is skipped (it only saves a worker the import), and deprecation
    warnings were the master's to show."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name not in sys.modules:
                try:
                    importlib.import_module(name)
                except Exception:
                    pass


def _preload(names: list[str]) -> None:
    """Import ``names``; one that fails is reported on stderr and skipped."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            print(f"pydist worker server: could not preload {name!r}: {e}", file=sys.stderr)


def serve(fd: int, preload: tuple[str, ...] = ()) -> None:
    """Run the server on the socket ``fd`` until the master closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # only the end of the socket stops it
    sock = socket.socket(fileno=fd)
    _preload([*BASE_PRELOAD, *preload])
    worker_parser()     # built once here, not in every child
    codecache.install()
    _Server(sock).run()


if __name__ == "__main__":
    serve(int(sys.argv[1]), tuple(sys.argv[2:]))
