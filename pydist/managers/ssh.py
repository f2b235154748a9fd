"""``SSHManager``: workers on other hosts, started over ssh, talking TCP.

One ssh session per worker runs, in the remote login shell (POSIX quoting)::

    cd -- <dir> && export <env...> && export PYTHONPATH=...<this pydist> \\
      && set -- $SSH_CONNECTION && exec <exename> <exeflags> -m pydist.worker \\
      --lifeline --transports tcp --lease <seconds> --bind <addr>

1. The cluster cookie goes over the session's standard input (never argv or the
   environment); that input then stays open as the worker's lifeline: when the master
   process ends, or its ssh client does, the worker reads end-of-file and exits.
2. The worker binds ``<addr>``: the ``bind_addr`` of the machine spec if given, else the
   address the ssh connection arrived at (the third word of ``$SSH_CONNECTION``), which
   is one the master can reach; with ``tunnel=True`` loopback, reached by the master
   through an ssh port forward. Never ``0.0.0.0``.
3. It prints its contact line; the master reads it within a deadline (the launch of each
   machine is bounded in time: a host that does not answer is a ``LaunchError`` naming it,
   while the other hosts' workers join), then relays the rest of the session's output,
   prefixed with the worker's id.
4. The master renews each worker's heartbeat lease (``pydist.lease``) so that a worker
   whose master vanished without closing its connections exits on its own.
5. ``kill`` asks the worker to exit, then closes the session's input (the lifeline), then
   SIGKILLs the worker on its host (over a new ssh command) if it still runs, and ends the
   ssh client; each rung has a deadline. A worker lost in any other way gets its session
   closed the same way, so nothing is left on the remote host.

``multiplex=True`` opens one ssh master connection per host (``ControlMaster``, with a
``ControlPersist`` so that it ends on its own once idle) and runs every session of that
host through it.
"""
from __future__ import annotations

import os
import queue
import re
import secrets
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

from .. import lease as _lease
from .. import transport as _transport
from ..cluster import PGRP, W_CONNECTED
from ..errors import LaunchError, TransportError
from ..net.address import format_tcp_url, parse_tcp_url
from .base import ClusterManager, WorkerConfig, parse_contact_line

__all__ = ["SSHManager", "Machine", "parse_machine", "LAUNCH_TIMEOUT", "CONNECT_TIMEOUT"]

LAUNCH_TIMEOUT = 60.0      # the whole launch of one machine: ssh, interpreter start, contact line
CONNECT_TIMEOUT = 15       # ssh's own ConnectTimeout (a silent host), unless sshflags set one
CONTROL_PERSIST = 10       # seconds an idle multiplexing master connection stays open
SHELLS = ("posix",)
_GRACE = 5.0               # for a worker asked to exit, before its session is closed
_LIFELINE_WAIT = 2.0       # for a worker whose session's input was closed, before SIGKILL
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# -- machine specs --------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """One parsed machine spec: ``[user@]host[:port] [bind_addr[:port]]`` and a count."""

    spec: str
    host: str
    user: str | None = None
    port: int | None = None
    bind_addr: str | None = None
    bind_port: int | None = None
    count: int | str = 1          # a number of workers, or "auto": the host's CPU count

    @property
    def name(self) -> str:
        """How messages name the host: the ssh part of the spec."""
        return self.spec.split()[0]

    def ssh_target(self) -> list[str]:
        """ssh's arguments that name the host (after every option)."""
        args = ["-p", str(self.port)] if self.port else []
        args += ["-l", self.user] if self.user else []
        return [*args, "--", self.host]


def _split_host_port(spec: str, text: str, what: str) -> tuple[str, int | None]:
    try:
        host, port = parse_tcp_url("tcp://" + text, listen=True)
    except ValueError as e:
        reason = str(e).split(": ", 1)[-1] if ": " in str(e) else str(e)
        raise ValueError(f"machine spec {spec!r}: {what} {text!r} does not parse ({reason}); "
                         f"expected '[user@]host[:port] [bind_addr[:port]]'") from None
    given = text.rpartition("]")[2] if text.startswith("[") else text
    if ":" in given:
        if port == 0:
            raise ValueError(f"machine spec {spec!r}: port 0 in {text!r} is not a port")
        return host, port
    if not text or text.startswith(":"):
        raise ValueError(f"machine spec {spec!r}: {what} {text!r} has no host")
    return host, None


def parse_machine(entry: Any) -> Machine:
    """Parse a machine: a spec string, ``(spec, count)`` or ``(spec, "auto")``."""
    count: Any = 1
    if isinstance(entry, tuple):
        if len(entry) != 2:
            raise ValueError(f"a machine is a spec or a (spec, count) pair, not {entry!r}")
        entry, count = entry
        if count != "auto" and (not isinstance(count, int) or isinstance(count, bool)
                                or count < 1):
            raise ValueError(f"machine {entry!r}: the count must be a positive int or "
                             f"'auto', not {count!r}")
    if not isinstance(entry, str):
        raise TypeError(f"a machine spec must be a str like 'user@host:22', not "
                        f"{type(entry).__name__} ({entry!r})")
    words = entry.split()
    if not 1 <= len(words) <= 2:
        raise ValueError(f"machine spec {entry!r} does not parse: expected "
                         f"'[user@]host[:port] [bind_addr[:port]]'")
    user, at, hostport = words[0].rpartition("@")
    if at and not _USER.match(user):
        raise ValueError(f"machine spec {entry!r}: {user!r} is not a valid user name")
    host, port = _split_host_port(entry, hostport, "host")
    bind_addr = bind_port = None
    if len(words) == 2:
        bind_addr, bind_port = _split_host_port(entry, words[1], "bind address")
    return Machine(entry.strip(), host, user or None, port, bind_addr, bind_port, count)


# -- what one addprocs call asks for ------------------------------------------------------
@dataclass(frozen=True)
class _Options:
    sshflags: tuple[str, ...]
    exename: str
    exeflags: tuple[str, ...]
    dir: str
    env: tuple[tuple[str, str], ...]
    tunnel: bool
    multiplex: bool
    max_parallel: int
    lease: float
    launch_timeout: float
    threaded_blas: bool

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "_Options":
        shell = params.get("shell", "posix")
        if shell not in SHELLS:
            raise ValueError(f"shell={shell!r} is not supported; remote commands are quoted "
                             f"for {', '.join(SHELLS)} shells")
        if params.get("transport", "auto") == "shm":
            raise ValueError("transport='shm' cannot reach workers on other hosts; "
                             "SSH workers use 'tcp' (or say 'auto')")
        flags = params.get("sshflags") or ()
        flags = tuple(shlex.split(flags)) if isinstance(flags, str) else tuple(map(str, flags))
        max_parallel = params.get("max_parallel")
        max_parallel = 10 if max_parallel is None else max_parallel
        if not isinstance(max_parallel, int) or isinstance(max_parallel, bool) or max_parallel < 1:
            raise ValueError(f"max_parallel must be a positive int, not {max_parallel!r}")
        timeout = params.get("launch_timeout", LAUNCH_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"launch_timeout must be a positive number of seconds, "
                             f"not {timeout!r}")
        exename = params.get("exename") or sys.executable
        if not isinstance(exename, str):
            raise TypeError(f"exename must be the path of the remote interpreter (a str), "
                            f"not {type(exename).__name__}")
        return cls(flags, exename, tuple(map(str, params.get("exeflags") or ())),
                   str(params.get("dir") or os.getcwd()), _check_env(params.get("env")),
                   bool(params.get("tunnel")), bool(params.get("multiplex")), max_parallel,
                   _lease.check_lease(params.get("lease", _lease.DEFAULT_LEASE)), float(timeout),
                   bool(params.get("enable_threaded_blas")))


def _check_env(env: Any) -> tuple[tuple[str, str], ...]:
    items = list(env.items()) if isinstance(env, dict) else list(env or ())
    out = []
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(f"env must be a dict or (name, value) pairs, not {env!r}")
        name, value = str(item[0]), str(item[1])
        if not _ENV_NAME.match(name):
            raise ValueError(f"env: {name!r} is not a valid environment variable name")
        if "\0" in value:
            raise ValueError(f"env: the value of {name} contains a NUL character")
        out.append((name, value))
    return tuple(out)


def _pydist_root() -> str | None:
    """Where this pydist can be imported from, unless it is installed in site-packages."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return None if os.path.basename(root) in ("site-packages", "dist-packages") else root


def _remote_command(m: Machine, index: int, opts: _Options) -> str:
    """The command line the remote login shell runs for worker ``index`` of ``m``."""
    q = shlex.quote
    steps = [f"cd -- {q(opts.dir)}"]
    steps += [f"export {name}={q(value)}" for name, value in opts.env]
    root = _pydist_root()
    if root is not None:
        steps.append(f'export PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}"{q(root)}')
    if not opts.threaded_blas:
        steps += [f'export {var}="${{{var}:-1}}"' for var in _BLAS_VARS]
    argv = [opts.exename, *opts.exeflags, "-m", "pydist.worker", "--lifeline",
            "--transports", "tcp"]
    if opts.lease > 0:
        argv += ["--lease", repr(opts.lease)]
    if m.bind_port and not opts.tunnel:
        argv += ["--port", str(m.bind_port + index)]
    if opts.tunnel:
        bind = "127.0.0.1"
    elif m.bind_addr:
        bind = q(m.bind_addr)
    else:
        steps.append("set -- $SSH_CONNECTION")
        bind = '"${3:?SSH_CONNECTION is not set: put a bind address in the machine spec}"'
    return " && ".join(steps) + " && exec " + " ".join(map(q, argv)) + " --bind " + bind


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- one worker's ssh session ---------------------------------------------------------------
class _Session:
    """The ssh client of one worker, its tunnel (if any) and how it ends."""

    def __init__(self, manager: "SSHManager", m: Machine, opts: _Options,
                 proc: subprocess.Popen) -> None:
        self.manager, self.machine, self.opts, self.proc = manager, m, opts, proc
        self.pid: int | None = None
        self.config: WorkerConfig | None = None       # its ospid is known once it joined
        self.tunnel: subprocess.Popen | None = None   # the forwarding ssh (without multiplex)
        self.forward = ""                              # its -L spec
        self.tunnel_url = ""                           # where the master dials, with a tunnel
        self.remote_url = ""
        self._finished = threading.Event()
        self._lock = threading.Lock()

    def finish(self, grace: float = 0.0) -> None:
        """Close the session: wait ``grace`` s for it to end on its own, then close its
        standard input (the lifeline), then SIGKILL a worker deaf to that on its host, then
        SIGTERM and SIGKILL the ssh client; each rung with its deadline (idempotent)."""
        with self._lock:
            if self._finished.is_set():
                return
            self._finished.set()
        _wait(self.proc, grace)
        _close_stdin(self.proc)
        if _wait(self.proc, _LIFELINE_WAIT) is None:
            self._kill_remote()
        _end(self.proc)
        self.close_tunnel()
        self.manager._forget(self)
        _BY_PID.pop(self.pid, None)

    def _kill_remote(self) -> None:
        """The last rung for a worker that ignores its lifeline (stuck in C code holding
        the GIL): SIGKILL it on its host, if that pid still runs a pydist worker."""
        ospid = self.config.ospid if self.config is not None else None
        if not ospid:
            return
        check = f"ps -p {int(ospid)} -o command= | grep -q pydist.worker && kill -9 {int(ospid)}"
        _run_ssh(self.manager._ssh_argv(self.machine, self.opts, remote=check), 20.0)
        _wait(self.proc, _LIFELINE_WAIT)

    def open_tunnel(self) -> None:
        """Forward a local port to the worker's loopback listener."""
        remote_port = parse_tcp_url(self.remote_url).port
        local_port = _free_local_port()
        self.forward = f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}"
        self.tunnel_url = format_tcp_url("127.0.0.1", local_port)
        m, mgr = self.machine, self.manager
        if self.opts.multiplex:
            done = _run_ssh(mgr._ssh_argv(m, self.opts, "-O", "forward", "-L", self.forward),
                            20.0)
            if done.returncode != 0:
                raise LaunchError(f"SSH host {m.name}: could not forward a port to the worker: "
                                  f"{done.stdout.strip()}")
            return
        argv = mgr._ssh_argv(m, self.opts, "-o", "ExitOnForwardFailure=yes", "-L", self.forward,
                             remote="exec cat >/dev/null")
        self.tunnel = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, start_new_session=True)

    def close_tunnel(self) -> None:
        if self.tunnel is not None:
            _close_stdin(self.tunnel)
            _end(self.tunnel, 2.0)
        elif self.forward and self.opts.multiplex:
            _run_ssh(self.manager._ssh_argv(self.machine, self.opts, "-O", "cancel", "-L",
                                            self.forward), 10.0)

    def dial_tunnel(self, deadline: float) -> Any:
        """Connect through the tunnel, waiting for ssh to start forwarding."""
        attempts = 0
        while True:
            try:
                return _transport.connect(self.tunnel_url, 5.0)
            except TransportError as e:
                problem = str(e)
            if self.tunnel is not None and self.tunnel.poll() is not None:
                out = _drain(self.tunnel)
                attempts += 1
                if attempts >= 3 or "forward" not in out.lower():
                    raise LaunchError(f"SSH host {self.machine.name}: the ssh tunnel to the "
                                      f"worker ended: {out.strip() or problem}")
                self.open_tunnel()   # the local port was taken meanwhile: another one
            if time.monotonic() > deadline:
                raise LaunchError(f"SSH host {self.machine.name}: no connection through the "
                                  f"ssh tunnel: {problem}")
            time.sleep(0.05)


class _Master:
    """A host's multiplexing master connection: who holds it, and the options it was
    opened with (``None`` while it is not open)."""

    def __init__(self) -> None:
        self.holds = 0
        self.opts: _Options | None = None
        self.opening = threading.Lock()


_BY_PID: dict[int | None, _Session] = {}


def _on_worker_lost(pid: int) -> None:
    """A worker is gone (dead, removed, never joined): make sure its session ends too."""
    session = _BY_PID.get(pid)
    if session is not None:
        threading.Thread(target=session.finish, args=(_GRACE,), name="pydist-ssh-close",
                         daemon=True).start()


PGRP.on_worker_lost.append(_on_worker_lost)


# -- the manager ---------------------------------------------------------------------------
class SSHManager(ClusterManager):
    """Starts workers on other hosts over ssh (Julia's ``SSHManager``).

    ``machines``: spec strings ``"[user@]host[:port] [bind_addr[:port]]"``, or
    ``(spec, count)`` / ``(spec, "auto")`` pairs. Parameters come from ``addprocs``:
    ``sshflags``, ``exename``, ``exeflags``, ``dir``, ``env``, ``tunnel``, ``multiplex``,
    ``max_parallel`` (ssh launches at a time per machine), ``shell``, ``lease`` (seconds;
    0: none) and ``launch_timeout`` (seconds per machine).
    """

    def __init__(self, machines: Iterable[Any]) -> None:
        if isinstance(machines, (str, bytes)):
            raise TypeError("SSHManager takes a list of machine specs, not a single string; "
                            f"write [{machines!r}]")
        self.machines = [parse_machine(m) for m in machines]
        if not self.machines:
            raise ValueError("SSHManager needs at least one machine")
        self._lock = threading.Lock()
        self._sessions: dict[int, _Session] = {}   # id(config) -> session
        tmp = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
        self._control_prefix = os.path.join(tmp, f"pydist-ssh-{secrets.token_hex(8)}-")
        self._masters: dict[tuple, _Master] = {}   # (user, host, port) -> its master

    def __repr__(self) -> str:
        machines = [m.spec if m.count == 1 else (m.spec, m.count) for m in self.machines]
        return f"SSHManager({machines!r})"

    def default_params(self) -> dict[str, Any]:
        return {"tunnel": False, "multiplex": False, "sshflags": (), "shell": "posix",
                "max_parallel": 10, "lease": _lease.DEFAULT_LEASE,
                "launch_timeout": LAUNCH_TIMEOUT}

    def known_params(self) -> tuple[str, ...]:
        return ("lease", "launch_timeout")

    def check_params(self, params: dict[str, Any]) -> None:
        _Options.from_params(params)

    # -- launching --------------------------------------------------------------------
    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: Any) -> None:
        """Launch every machine at once; each is bounded by ``launch_timeout``."""
        from ..control import cluster_cookie
        opts = _Options.from_params(params)
        cookie = cluster_cookie()
        errors: list[str] = []
        jobs = [threading.Thread(target=self._launch_machine,
                                 args=(m, opts, cookie, launched, launch_ntfy, errors),
                                 name="pydist-ssh-launch", daemon=True) for m in self.machines]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join()
        if errors:
            raise LaunchError("; ".join(errors))

    def _launch_machine(self, m: Machine, opts: _Options, cookie: str,
                        launched: list[WorkerConfig], ntfy: Any, errors: list[str]) -> None:
        deadline = time.monotonic() + opts.launch_timeout
        try:
            if opts.multiplex:
                self._open_master(m, opts, deadline)
            count = self._cpu_count(m, opts, deadline) if m.count == "auto" else int(m.count)
        except Exception as e:
            errors.append(str(e) if isinstance(e, LaunchError) else f"SSH host {m.name}: {e!r}")
            return
        gate = threading.Semaphore(opts.max_parallel)
        starts = [threading.Thread(target=self._launch_worker,
                                   args=(m, i, count, opts, cookie, deadline, gate, launched,
                                         ntfy, errors), daemon=True) for i in range(count)]
        for th in starts:
            th.start()
        for th in starts:
            th.join()
        if opts.multiplex:
            self._release_master(m)   # the launch's own hold on the master connection

    def _launch_worker(self, m: Machine, index: int, count: int, opts: _Options, cookie: str,
                       deadline: float, gate: threading.Semaphore,
                       launched: list[WorkerConfig], ntfy: Any, errors: list[str]) -> None:
        with gate:
            if time.monotonic() > deadline:
                errors.append(f"SSH host {m.name}: no time left to start worker {index + 1} "
                              f"of {count} within {opts.launch_timeout:g} s")
                return
            if opts.multiplex:
                self._hold_master(m)
            argv = self._ssh_argv(m, opts, remote=_remote_command(m, index, opts))
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                if opts.multiplex:
                    self._release_master(m)
                errors.append(f"SSH host {m.name}: cannot run ssh: {e}")
                return
            session = _Session(self, m, opts, proc)
            try:
                _send_cookie(proc, cookie)
                session.remote_url = _await_contact(proc, m, deadline)
                if opts.tunnel:
                    session.open_tunnel()
            except Exception as e:   # LaunchError, or an OSError starting the tunnel
                session.finish()
                errors.append(str(e) if isinstance(e, LaunchError) else f"SSH host {m.name}: {e!r}")
                return
        config = WorkerConfig(
            exename=opts.exename, exeflags=opts.exeflags, host=m.host, port=m.port,
            sshflags=opts.sshflags, max_parallel=opts.max_parallel,
            connect_at=session.tunnel_url or session.remote_url, environ=dict(opts.env),
            ident=(m.spec, index), enable_threaded_blas=opts.threaded_blas, count=count,
            bind_addr=parse_tcp_url(session.remote_url).host, tunnel=opts.tunnel,
            multiplex=opts.multiplex, transport="tcp", addresses=(session.remote_url,),
            io=proc.stdout)
        session.config = config
        with self._lock:
            self._sessions[id(config)] = session
        threading.Thread(target=_relay, args=(session,), name="pydist-ssh-output",
                         daemon=True).start()
        with ntfy:
            launched.append(config)
            ntfy.notify_all()

    def _cpu_count(self, m: Machine, opts: _Options, deadline: float) -> int:
        """The remote host's CPU count, asked with its interpreter (for ``"auto"``)."""
        code = "import os; print(os.cpu_count() or 1)"
        cmd = " ".join(map(shlex.quote, [opts.exename, "-c", code]))
        done = _run_ssh(self._ssh_argv(m, opts, remote=cmd), max(1.0, deadline - time.monotonic()))
        out = done.stdout.strip()
        if done.returncode != 0 or not out.splitlines() or not out.splitlines()[-1].isdigit():
            raise LaunchError(f"SSH host {m.name}: could not ask its CPU count for 'auto' "
                              f"(ssh exit status {done.returncode}): {out or 'no output'}")
        return max(1, int(out.splitlines()[-1]))

    # -- ssh command lines -------------------------------------------------------------
    def _ssh_argv(self, m: Machine, opts: _Options, *options: str, remote: str = "") -> list[str]:
        """ssh with the user's flags first (ssh keeps the first value of an option), then
        pydist's defaults, the multiplexing socket, ``options`` and the host."""
        argv = ["ssh", *opts.sshflags, "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
                "-o", "BatchMode=yes", "-o", "ServerAliveInterval=15",
                "-o", "ServerAliveCountMax=3"]
        if opts.multiplex:
            argv += ["-o", f"ControlPath={self._control_path()}"]
            if "-O" not in options and "ControlMaster=yes" not in options:
                argv += ["-o", "ControlMaster=no"]
        argv += [*options, *m.ssh_target()]
        return argv + ([remote] if remote else [])

    def _control_path(self) -> str:
        """The control sockets: straight in /tmp (a short path, as sockets need, and no
        directory to leave behind when the master dies), under a random name; ssh creates
        each socket with mode 0600 and refuses a path that already exists."""
        return self._control_prefix + "%C"

    # -- multiplexing: one master connection per host ------------------------------------
    def _master(self, m: Machine) -> "_Master":
        with self._lock:
            return self._masters.setdefault((m.user, m.host, m.port), _Master())

    def _open_master(self, m: Machine, opts: _Options, deadline: float) -> None:
        """Open (or reuse) the host's master connection; the caller then holds it once."""
        master = self._master(m)
        with master.opening:
            self._hold_master(m)
            if master.opts is not None:
                return
            argv = self._ssh_argv(m, opts, "-o", "ControlMaster=yes", "-o",
                                  f"ControlPersist={CONTROL_PERSIST}", "-N", "-f")
            done = _run_ssh(argv, max(1.0, deadline - time.monotonic()))
            if done.returncode != 0:
                self._release_master(m)
                raise LaunchError(f"SSH host {m.name}: could not open the multiplexing "
                                  f"connection (ssh exit status {done.returncode}): "
                                  f"{done.stdout.strip() or 'no output'}")
            master.opts = opts

    def _hold_master(self, m: Machine) -> None:
        master = self._master(m)
        with self._lock:
            master.holds += 1

    def _release_master(self, m: Machine) -> None:
        """Drop one hold on the host's master connection; the last one closes it."""
        with self._lock:
            master = self._masters.get((m.user, m.host, m.port))
            if master is None or master.holds <= 0:
                return
            master.holds -= 1
            if master.holds > 0 or master.opts is None:
                return
            opts, master.opts = master.opts, None
        _run_ssh(self._ssh_argv(m, opts, "-O", "exit"), 10.0)

    # -- the cluster's callbacks ---------------------------------------------------------
    def _session(self, config: WorkerConfig) -> _Session | None:
        with self._lock:
            return self._sessions.get(id(config))

    def _forget(self, session: _Session) -> None:
        """A session has ended: drop it and its hold on the host's master connection."""
        with self._lock:
            for key in [k for k, s in self._sessions.items() if s is session]:
                del self._sessions[key]
        self._release_master(session.machine)

    def connect(self, pid: int, config: WorkerConfig) -> Any:
        session = self._session(config)
        if session is not None:
            session.pid = pid
            _BY_PID[pid] = session
            if session.tunnel_url:
                config.transport = "tcp"
                return session.dial_tunnel(time.monotonic() + 30.0)
        return super().connect(pid, config)

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        session = self._session(config)
        if op == "register" and session is not None:
            _lease.renew(pid, session.opts.lease)
        elif op == "deregister":
            _lease.forget(pid)
        super().manage(pid, config, op)

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Ask the worker to exit; then close its ssh session (the lifeline) and end ssh."""
        from ..control import request_exit
        _lease.forget(pid)
        request_exit(pid)
        session = self._session(config)
        if session is not None:
            session.finish(_GRACE)


# -- helpers ---------------------------------------------------------------------------------
def _run_ssh(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a short ssh command; its output merged; a timeout is exit status -1."""
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return subprocess.CompletedProcess(argv, -1, out + f"\n(no answer within {timeout:.0f} s)")
    except OSError as e:
        return subprocess.CompletedProcess(argv, -1, f"cannot run ssh: {e}")


def _send_cookie(proc: subprocess.Popen, cookie: str) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write((cookie + "\n").encode())
        proc.stdin.flush()
    except OSError:
        pass   # ssh already ended: its output says why


def _await_contact(proc: subprocess.Popen, m: Machine, deadline: float) -> str:
    """Read the session's output until the worker's contact line; ``LaunchError`` naming the
    host if ssh ends first or the deadline passes."""
    assert proc.stdout is not None
    lines: queue.SimpleQueue = queue.SimpleQueue()
    seen: list[str] = []

    def read() -> None:
        for raw in iter(proc.stdout.readline, b""):   # type: ignore[union-attr]
            line = raw.decode(errors="replace")
            lines.put(line)
            if parse_contact_line(line) is not None:
                return
        lines.put(None)
    threading.Thread(target=read, name="pydist-ssh-contact", daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            _end(proc, 0.0)
            tail = "".join(seen[-20:]).strip()
            raise LaunchError(f"SSH host {m.name}: no worker was ready within the launch "
                              f"timeout" + (f"; its output:\n{tail}" if tail else
                                            " (the host did not answer)")) from None
        if line is None:
            code = _wait(proc, 5.0)
            tail = "".join(seen[-20:]).strip()
            raise LaunchError(f"SSH host {m.name}: ssh exited with status {code} before the "
                              f"worker was ready" + (f": {tail}" if tail else ""))
        addresses = parse_contact_line(line)
        if addresses is not None:
            tcp = [a for a in addresses if a.startswith("tcp://")]
            if not tcp:
                raise LaunchError(f"SSH host {m.name}: the worker offers no tcp address "
                                  f"({list(addresses)})")
            return tcp[0]
        seen.append(line)


def _relay(session: _Session) -> None:
    """Copy the worker's output to ours, each line prefixed with its id; when the session
    ends, make sure the cluster knows the worker is gone (even if its TCP connection
    lingers, as it can when the network between the hosts fails)."""
    stream = session.proc.stdout
    assert stream is not None
    for raw in iter(stream.readline, b""):
        try:
            sys.stdout.write(f"      From worker {session.pid or '?'}:\t"
                             f"{raw.decode(errors='replace')}")
            sys.stdout.flush()
        except (ValueError, OSError):
            pass
    code = _wait(session.proc, 30.0)
    w = PGRP.workers.get(session.pid) if session.pid is not None else None
    if w is not None and w.state == W_CONNECTED and not w.gone.wait(3.0):
        PGRP.worker_lost(w, f"on {session.machine.name} lost its ssh session "
                            f"(ssh exit status {code})")
    session.finish()


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _close_stdin(proc: subprocess.Popen) -> None:
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass


def _end(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM ``proc`` after ``grace`` s, SIGKILL 2 s later; reap it."""
    if _wait(proc, grace) is not None:
        return
    for stop in (proc.terminate, proc.kill):
        try:
            stop()
        except OSError:
            return
        if _wait(proc, 2.0) is not None:
            return


def _drain(proc: subprocess.Popen) -> str:
    try:
        return proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    except (OSError, ValueError):
        return ""

