"""``LocalManager``: workers as fresh interpreters on this host.

Each worker is ``python -m pydist.worker --lifeline`` started in its own session (so a
Ctrl-C at the master's terminal reaches only the master), in the master's working
directory (or ``dir``) with the master's environment (plus ``env``). The cookie goes over
its standard input, which the master then keeps open as the worker's lifeline: when the
master dies, the pipe closes and the worker exits. The worker's stdout and stderr are
relayed to the master's (``pydist/output.py``): by default each line prefixed with the
worker's id, as Julia does; ``addprocs(..., output="raw")`` passes the bytes on as they are.
Where the request allows, the worker server (``forkclient.py``) forks the worker instead
of starting an interpreter; it is set up the same way and has the same pipes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import IO, Any

from ..cluster.group import cluster_cookie
from ..cluster.output import Relay, check_output
from ..cluster.peers import WorkerConfig
from ..errors import LaunchError, describe_exit
from .base import ClusterManager, parse_contact_line
from .forkclient import ForkedProcess, check_preload, fork_refusal, fork_worker
from .params import scrub

__all__ = ["LocalManager"]

LAUNCH_TIMEOUT = 60.0


class LocalManager(ClusterManager):
    """Starts ``np`` workers on this host; ``restrict=True`` keeps them on loopback."""

    def __init__(self, np: int, restrict: bool = True) -> None:
        if not isinstance(np, int) or isinstance(np, bool) or np < 1:
            raise ValueError(f"LocalManager needs a positive number of workers, got {np!r}")
        self.np = np
        self.restrict = restrict
        self._relays: dict[int, Relay] = {}   # id(config) -> the relay of its output

    def __repr__(self) -> str:
        return f"LocalManager(np={self.np}, restrict={self.restrict})"

    def known_params(self) -> tuple[str, ...]:
        return ("restrict", "preload", "output")

    def check_params(self, params: dict[str, Any]) -> None:
        if params.get("preload") is not None:
            check_preload(params["preload"], "addprocs(preload=...)")
        check_output(params.get("output", "prefix"))

    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: Any) -> None:
        """Start the processes, then announce each as its contact line arrives, in order."""
        cookie = cluster_cookie()
        procs = [self._spawn(params, cookie) for _ in range(self.np)]
        errors = []
        for proc in procs:
            try:
                addresses = _await_contact(proc, params.get("worker_timeout") or LAUNCH_TIMEOUT,
                                           cookie)
            except LaunchError as e:
                errors.append(str(e))
                _close_pipes(proc)
                continue
            config = WorkerConfig(exename=params["exename"], exeflags=tuple(params["exeflags"]),
                                  process=proc, ospid=proc.pid, host="127.0.0.1",
                                  addresses=addresses, transport=params["transport"],
                                  enable_threaded_blas=params["enable_threaded_blas"], io=proc.stdout)
            self._relay_output(config, params.get("output", "prefix"), cookie)
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify_all()
        if errors:
            raise LaunchError("; ".join(errors))

    def _spawn(self, params: dict[str, Any], cookie: str) -> subprocess.Popen[bytes] | ForkedProcess:
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in (params.get("env") or {}).items()})
        # Make sure the worker finds this very pydist even when it is not installed
        # (appended, so an installed copy on the default path still comes first).
        home = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if home not in paths:
            env["PYTHONPATH"] = os.pathsep.join([*paths, home])
        if not params.get("enable_threaded_blas"):
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env.setdefault(var, "1")
        cmd = [params["exename"], *params["exeflags"], "-m", "pydist.worker", "--lifeline",
               "--separate-stderr"]
        if not self.restrict:
            cmd += ["--bind", "0.0.0.0"]
        if params.get("transport") == "tcp":
            cmd += ["--transports", "tcp"]
        forked = self._fork(params, cmd, env)
        if forked is not None:
            _hand_cookie(forked.stdin, cookie)
            return forked
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=params["dir"], env=env,
                                    start_new_session=True)
        except OSError as e:
            raise LaunchError(f"could not start a local worker with {cmd[0]!r} in "
                              f"{params['dir']!r}: {e}") from e
        assert proc.stdin is not None
        _hand_cookie(proc.stdin, cookie)
        return proc

    @staticmethod
    def _fork(params: dict[str, Any], cmd: list[str], env: dict[str, str]) -> ForkedProcess | None:
        """The worker forked by the worker server (``forkclient``), or ``None`` where a
        fork cannot honour the request and a fresh interpreter must start."""
        if fork_refusal(params["exename"], params["exeflags"], env) is not None:
            return None
        argv = cmd[cmd.index("pydist.worker") + 1:]
        proc = fork_worker(params["dir"], env, argv, params.get("preload"))
        return None if isinstance(proc, str) else proc

    def _relay_output(self, config: WorkerConfig, output: Any, cookie: str) -> None:
        relay = self._relays[id(config)] = Relay(output, cookie)
        relay.start(config.io, config.process.stderr)

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        if op == "register":
            relay = self._relays.get(id(config))
            if relay is not None:
                relay.register(pid)
        elif op == "interrupt":
            if config.process is not None and config.process.poll() is None:
                config.process.send_signal(signal.SIGINT)
        elif op == "deregister":
            relay = self._relays.pop(id(config), None)
            if relay is not None:
                relay.forget()
            _close_lifeline(config)

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Ask the worker to exit, then SIGTERM and SIGKILL with deadlines; close its lifeline."""
        super().kill(pid, config)
        _close_lifeline(config)


def _close_lifeline(config: WorkerConfig) -> None:
    """Close the worker's stdin (its lifeline: the worker exits) and reap it if it is gone."""
    proc = config.process
    if proc is None:
        return
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except Exception:   # a broken pipe: the worker is gone already
        pass
    if proc.poll() is None:   # reap it whenever it ends, so it never lingers as a zombie
        threading.Thread(target=proc.wait, name="pydist-reaper", daemon=True).start()


def _await_contact(proc: subprocess.Popen[bytes] | ForkedProcess, timeout: float, cookie: str) -> tuple[str, ...]:
    """Read the worker's output until its contact line; LaunchError if it dies or stalls.
    The output is quoted with the cookie blanked out: an interpreter told to run its
    standard input as a program would print it."""
    stdout = proc.stdout
    assert stdout is not None
    seen: list[str] = []
    result: list[tuple[str, ...]] = []

    def read() -> None:
        for raw in iter(stdout.readline, b""):
            line = raw.decode(errors="replace")
            addresses = parse_contact_line(line)
            if addresses is not None:
                result.append(addresses)
                return
            seen.append(line)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if result:
        return result[0]
    tail = scrub("".join(seen[-20:]).strip(), cookie)
    if reader.is_alive():
        proc.kill()
        reader.join(2)      # it sees the end of the output now; its pipe is closed after
        raise LaunchError(f"local worker (pid {proc.pid}) printed no contact line within {timeout:.0f} s"
                          + (f"; its output:\n{tail}" if tail else ""))
    code = proc.wait(5)
    if proc.stderr is not None:   # it is gone: what it said on stderr is all there
        seen.append(proc.stderr.read().decode(errors="replace"))
    tail = scrub("".join(seen[-20:]).strip(), cookie)
    raise LaunchError(f"local worker (pid {proc.pid}) stopped before it was ready: it {describe_exit(code)}"
                      + (f"; its output:\n{tail}" if tail else ""))


def _close_pipes(proc: Any) -> None:
    """A worker that never joined: its pipes closed now, not once the error that names it
    (and holds this frame) is dropped."""
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def _hand_cookie(stdin: IO[bytes], cookie: str) -> None:
    """Write the cookie to a new worker's standard input.

    A worker that died at once (bad flags, a broken environment) has closed its end: the
    wait for its contact then reports the death with what it printed, so the broken pipe is
    not the error to show.
    """
    try:
        stdin.write((cookie + "\n").encode())
        stdin.flush()
    except (BrokenPipeError, ConnectionResetError):
        pass
