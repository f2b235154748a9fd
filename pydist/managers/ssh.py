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
4. The master renews each worker's heartbeat lease (``cluster/lease.py``) so that a worker
   whose master vanished without closing its connections exits on its own.
5. ``kill`` asks the worker to exit, then closes the session's input (the lifeline), then
   SIGKILLs the worker on its host (over a new ssh command) if it still runs, and ends the
   ssh client; each rung has a deadline. A worker lost in any other way gets its session
   closed the same way, so nothing is left on the remote host.

``multiplex=True`` opens one ssh master connection per host (``ControlMaster``, with a
``ControlPersist`` so that it ends on its own once idle) and runs every session of that
host through it.

The parts live beside this module: machine specs in ``machines.py``, the launch's options
and the remote command line in ``sshcommand.py``, and one worker's ssh session (cookie,
contact line, output relay, tunnel, the rungs of ``kill``) in ``sshsession.py``.
"""
from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import Any

from ..cluster import lease as _lease
from ..cluster.group import cluster_cookie
from ..cluster.peers import WorkerConfig
from ..cluster.stopping import request_exit
from ..errors import LaunchError
from ..net.address import parse_tcp_url
from .base import ClusterManager
from .machines import Machine, parse_machine
from .sshcommand import LAUNCH_TIMEOUT, _Options, _remote_command
from .sshsession import _BY_PID, _GRACE, _await_contact, _relay, _run_ssh, _send_cookie, _Session

__all__ = ["SSHManager", "Machine", "parse_machine", "LAUNCH_TIMEOUT", "CONNECT_TIMEOUT"]

CONNECT_TIMEOUT = 15       # ssh's own ConnectTimeout (a silent host), unless sshflags set one
CONTROL_PERSIST = 10       # seconds an idle multiplexing master connection stays open


class _Master:
    """A host's multiplexing master connection: who holds it, and the options it was
    opened with (``None`` while it is not open)."""

    def __init__(self) -> None:
        self.holds = 0
        self.opts: _Options | None = None
        self.opening = threading.Lock()


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
        self._masters: dict[tuple[str | None, str, int | None], _Master] = {}   # (user, host, port) -> its master

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
    def _master(self, m: Machine) -> _Master:
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
        _lease.forget(pid)
        request_exit(pid)
        session = self._session(config)
        if session is not None:
            session.finish(_GRACE)

