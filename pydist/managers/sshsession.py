"""One worker's ssh session: the ssh client that runs it, and everything tied to it.

The session's standard input carries the cookie, then stays open as the worker's
lifeline; its output carries the worker's contact line, then the worker's own output,
relayed with the worker's id. A tunnelled worker's port forward belongs to its session
too. ``_Session.finish`` ends all of it, one rung at a time, and runs once whichever way
the worker went: killed, lost, or its ssh gone.
"""
from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Protocol

from .. import transport as _transport
from ..cluster.group import PGRP
from ..cluster.peers import W_CONNECTED, WorkerConfig
from ..errors import LaunchError, TransportError
from ..net.address import format_tcp_url, parse_tcp_url
from .base import parse_contact_line
from .machines import Machine
from .sshcommand import _Options

_GRACE = 5.0               # for a worker asked to exit, before its session is closed
_LIFELINE_WAIT = 2.0       # for a worker whose session's input was closed, before SIGKILL


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- one worker's ssh session ---------------------------------------------------------------
class _Owner(Protocol):
    """What a session needs of the ``SSHManager`` that started it."""

    def _ssh_argv(self, m: Machine, opts: _Options, *options: str,
                  remote: str = "") -> list[str]: ...

    def _forget(self, session: _Session) -> None: ...


class _Session:
    """The ssh client of one worker, its tunnel (if any) and how it ends."""

    def __init__(self, manager: _Owner, m: Machine, opts: _Options,
                 proc: subprocess.Popen[bytes]) -> None:
        self.manager, self.machine, self.opts, self.proc = manager, m, opts, proc
        self.pid: int | None = None
        self.config: WorkerConfig | None = None       # its ospid is known once it joined
        self.tunnel: subprocess.Popen[bytes] | None = None   # the forwarding ssh (without multiplex)
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


_BY_PID: dict[int | None, _Session] = {}


def _on_worker_lost(pid: int) -> None:
    """A worker is gone (dead, removed, never joined): make sure its session ends too."""
    session = _BY_PID.get(pid)
    if session is not None:
        threading.Thread(target=session.finish, args=(_GRACE,), name="pydist-ssh-close",
                         daemon=True).start()


PGRP.on_worker_lost.append(_on_worker_lost)


# -- helpers ---------------------------------------------------------------------------------
def _run_ssh(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
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


def _send_cookie(proc: subprocess.Popen[bytes], cookie: str) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write((cookie + "\n").encode())
        proc.stdin.flush()
    except OSError:
        pass   # ssh already ended: its output says why


def _await_contact(proc: subprocess.Popen[bytes], m: Machine, deadline: float) -> str:
    """Read the session's output until the worker's contact line; ``LaunchError`` naming the
    host if ssh ends first or the deadline passes."""
    stdout = proc.stdout
    assert stdout is not None
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    seen: list[str] = []

    def read() -> None:
        for raw in iter(stdout.readline, b""):
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


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _close_stdin(proc: subprocess.Popen[bytes]) -> None:
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass


def _end(proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
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


def _drain(proc: subprocess.Popen[bytes]) -> str:
    try:
        return proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    except (OSError, ValueError):
        return ""

