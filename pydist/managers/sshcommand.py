"""What one ``addprocs`` call over ssh asks for, and the command line it runs remotely.

``_Options`` checks and holds the ``addprocs`` parameters of an ``SSHManager`` launch;
``_remote_command`` turns them and a machine into the line the remote login shell runs
to start one worker (POSIX quoting; see ``ssh.py`` for what each step is for).
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from typing import Any

from ..cluster import lease as _lease
from .machines import Machine

LAUNCH_TIMEOUT = 60.0      # the whole launch of one machine: ssh, interpreter start, contact line
SHELLS = ("posix",)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


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
    def from_params(cls, params: dict[str, Any]) -> _Options:
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
