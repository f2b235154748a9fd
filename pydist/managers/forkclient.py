"""The master's side of the worker server (``processes/forkserver.py``): which launches fork, the
one server per master, and ``ForkedProcess``, a forked worker seen as a ``Popen``.

A local worker is forked by the server when the request asks for nothing a fork cannot
give: the master's own interpreter (``exename`` is ``sys.executable``), no ``exeflags``,
and the same interpreter-level environment (``PYTHON*``, ``LD_*``, ``*_NUM_THREADS``) as
the server was started with. Anything else -- another interpreter, flags such as ``-X``,
``-O`` or ``-W``, a changed ``PYTHONPATH`` or thread count -- starts a fresh interpreter
as before, and so does any request the server cannot answer. ``PYDIST_WORKER_SERVER=0``
in the master's environment turns the server off.

The server is started on the first request that may fork, and lives until the master
exits (the end of its socket is its lifeline). A child of a forked master does not share
it: it starts its own.
"""
from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from .codecache import uncached_sources

__all__ = ["ForkedProcess", "fork_worker", "fork_refusal", "set_worker_preload",
           "worker_preload", "check_preload", "worker_server_pid"]

START_TIMEOUT = 60.0          # seconds for the server to import what it preloads
REPLY_TIMEOUT = 30.0          # seconds for one fork
REPLY_SIZE = 4096             # bytes of the largest message from the server
AUTO_PRELOAD = ("numpy",)     # preloaded in the server once the master imported them
# Modules of the standard library the master has imported are imported by the server too
# (each once, when a request first names it; one that fails is skipped): a worker that
# runs the master's main script (the drop-ins' do) or a function needing them then finds
# them there, as a fork of the master would. Never these: they act on a terminal or start
# a program, or are large and of no use to a worker.
_NOT_PRELOADED = frozenset({"this", "antigravity", "readline", "rlcompleter", "curses",
                            "tkinter", "turtle", "turtledemo", "idlelib", "test", "webbrowser"})
_FIXED_PREFIXES = ("PYTHON", "LD_")
_FIXED_SUFFIXES = ("_NUM_THREADS",)
_preload: list[str] = []


def check_preload(preload: Any, what: str = "preload") -> list[str]:
    """``preload`` as a list of module names; TypeError/ValueError naming the bad value."""
    if isinstance(preload, str) or not isinstance(preload, (list, tuple)):
        raise TypeError(f"{what} must be a list of module names, not {preload!r}")
    for name in preload:
        if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
            raise ValueError(f"{what}: {name!r} is not a module name")
    return list(preload)


def set_worker_preload(module_names: Any) -> None:
    """Modules the worker server imports before it forks workers (like
    ``multiprocessing.set_forkserver_preload``): every worker forked afterwards starts with
    them imported. A module that fails to import makes the launch start fresh interpreters."""
    _preload[:] = check_preload(module_names, "set_worker_preload")


def worker_preload() -> list[str]:
    """The modules ``set_worker_preload`` named."""
    return list(_preload)


def _fixed(env: dict[str, str]) -> dict[str, str]:
    """The variables an interpreter reads as it starts (a fork cannot change them)."""
    return {k: v for k, v in env.items()
            if k.startswith(_FIXED_PREFIXES) or k.endswith(_FIXED_SUFFIXES)}


def fork_refusal(exename: str, exeflags: Sequence[str], env: dict[str, str]) -> str | None:
    """Why a worker with this interpreter, flags and environment cannot be forked
    (``None``: it can)."""
    if os.environ.get("PYDIST_WORKER_SERVER", "1") in ("0", "off", "no"):
        return "the worker server is turned off (PYDIST_WORKER_SERVER)"
    if not hasattr(os, "fork") or not hasattr(socket, "send_fds"):
        return "this platform cannot pass descriptors to a forking server"
    if exeflags:
        return f"exeflags {list(exeflags)} change the interpreter"
    if exename != sys.executable and os.path.realpath(exename) != os.path.realpath(sys.executable):
        return f"exename {exename!r} is not this interpreter"
    server = _current
    if server is not None and server.alive() and _fixed(env) != server.fixed:
        return "the environment changes interpreter settings the server was started with"
    return None


class ForkedProcess:
    """A worker forked by the server, with the parts of ``subprocess.Popen`` pydist uses:
    ``pid``, ``stdin`` (the lifeline), ``stdout``, ``stderr``, ``poll``, ``wait``, ``send_signal``,
    ``terminate``, ``kill`` and ``returncode`` (the server reports the exit)."""

    def __init__(self, pid: int, args: list[str], stdin: Any, stdout: Any, stderr: Any) -> None:
        self.pid, self.args, self.stdin, self.stdout, self.stderr = pid, args, stdin, stdout, stderr
        self.returncode: int | None = None
        self._done = threading.Event()

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode}>"

    def _ended(self, returncode: int) -> None:
        self.returncode = returncode
        self._done.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            assert timeout is not None   # (without one, the wait lasts until the end)
            raise subprocess.TimeoutExpired(self.args, timeout)
        returncode = self.returncode
        assert returncode is not None   # (_ended sets it before the event)
        return returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:     # never signal a pid that may have been reused
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Server:
    """One running worker server: its process, socket, and the workers it forked."""

    def __init__(self, env: dict[str, str], cwd: str, preload: list[str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fixed = _fixed(env)
        self.owner = os.getpid()
        self.sock = ours
        self.lock = threading.Lock()              # one request at a time
        self.replies: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.children: dict[int, ForkedProcess] = {}
        self.exits: dict[int, int] = {}           # exits reported before their fork's reply
        self.stdlib: set[str] = set()             # standard modules it was asked to import
        self.looked_at: set[str] = set()          # modules offered to it to compile (codecache)
        self.gone = False
        cmd = [sys.executable, "-m", "pydist.processes.forkserver", str(theirs.fileno()), *preload]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), cwd=cwd, env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            theirs.close()
        threading.Thread(target=self._read, name="pydist-worker-server", daemon=True).start()
        reply = self._reply(START_TIMEOUT)
        if reply[0] != "ready":
            raise OSError(f"the worker server did not start: {reply}")

    def alive(self) -> bool:
        return not self.gone and self.owner == os.getpid()

    def _read(self) -> None:
        """Route the server's messages: exits to their processes, the rest to ``replies``."""
        while True:
            try:
                data = self.sock.recv(REPLY_SIZE)
            except OSError:
                data = b""
            if not data:
                break
            msg = pickle.loads(data)
            if msg[0] == "exit":
                self._exited(msg[1], msg[2])
            else:
                self.replies.put(msg)
        self.gone = True
        self.replies.put(("error", "the worker server ended"))
        self.proc.wait()
        for proc in list(self.children.values()):   # no one can tell how these end now
            threading.Thread(target=_watch_orphan, args=(proc,), daemon=True).start()

    def _exited(self, pid: int, returncode: int) -> None:
        with _registry_lock:
            proc = self.children.pop(pid, None)
            if proc is None:
                self.exits[pid] = returncode
        if proc is not None:
            proc._ended(returncode)

    def _reply(self, timeout: float) -> tuple[Any, ...]:
        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:
            return ("error", f"the worker server did not answer within {timeout:.0f} s")

    def fork(self, cwd: str, env: dict[str, str], argv: list[str],
             preload: list[str]) -> ForkedProcess | str:
        """Fork a worker; its process, or why the server could not."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            with self.lock:
                stdlib = _stdlib_imported(self.stdlib)
                self.stdlib.update(stdlib)
                sources = uncached_sources(self.looked_at)
                msg = pickle.dumps(("fork", cwd, env, argv, preload, stdlib, sources))
                socket.send_fds(self.sock, [msg], [in_r, out_w, err_w])
                reply = self._reply(REPLY_TIMEOUT)
        except OSError as e:
            reply = ("error", f"the worker server is unreachable ({e})")
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        if reply[0] != "forked":
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            return str(reply[1])
        pid = reply[1]
        proc = ForkedProcess(pid, [sys.executable, "-m", "pydist.worker", *argv],
                             os.fdopen(in_w, "wb"), os.fdopen(out_r, "rb"), os.fdopen(err_r, "rb"))
        with _registry_lock:
            early = self.exits.pop(pid, None)
            if early is None:
                self.children[pid] = proc
        if early is not None:
            proc._ended(early)
        return proc

    def forget(self) -> None:
        """In a forked child of the master: drop the inherited socket without a word."""
        self.gone = True
        try:
            self.sock.detach()
        except OSError:
            pass


def _watch_orphan(proc: ForkedProcess) -> None:
    """The server died before this worker: poll for the worker's end (its status is lost)."""
    while proc.returncode is None:
        try:
            os.kill(proc.pid, 0)
        except ProcessLookupError:
            proc._ended(255)
            return
        time.sleep(0.05)


_registry_lock = threading.Lock()
_start_lock = threading.Lock()
_current: _Server | None = None


def _server(env: dict[str, str], cwd: str) -> _Server:
    global _current
    with _start_lock:
        if _current is None or not _current.alive():
            _current = _Server(env, cwd, worker_preload())
        return _current


def fork_worker(cwd: str, env: dict[str, str], argv: list[str],
                preload: list[str] | None = None) -> ForkedProcess | str:
    """A worker forked by this master's server (started now if need be), running
    ``pydist.worker`` with ``argv`` in ``cwd`` with ``env``; or why it could not be."""
    try:
        server = _server(env, cwd)
    except OSError as e:
        return f"the worker server could not start ({e})"
    if _fixed(env) != server.fixed:
        return "the environment changes interpreter settings the server was started with"
    return server.fork(cwd, env, argv, [*worker_preload(), *(preload or ()), *_master_has()])


def _master_has() -> list[str]:
    """Modules of ``AUTO_PRELOAD`` this master has imported: it will likely send their
    objects, and a worker would otherwise import them as the first one arrives."""
    return [name for name in AUTO_PRELOAD if name in sys.modules]


def _stdlib_imported(known: set[str]) -> list[str]:
    """Public modules of the standard library imported here and not in ``known``."""
    stdlib: frozenset[str] = getattr(sys, "stdlib_module_names", frozenset())
    out = []
    for name in list(sys.modules):
        top = name.partition(".")[0]
        if (name not in known and top in stdlib and top not in _NOT_PRELOADED
                and not any(part.startswith("_") for part in name.split("."))):
            out.append(name)
    return out


def worker_server_pid() -> int | None:
    """The process id of this master's worker server, if one runs (tools that list a
    master's processes tell it from the workers with this)."""
    server = _current
    return server.proc.pid if server is not None and server.alive() else None


def _after_fork_in_child() -> None:
    global _current
    if _current is not None:
        _current.forget()
        _current = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
