"""The ``pydist`` command (also ``python -m pydist``).

``pydist info``: what this machine offers pydist -- version, the transports that work here
(each tried with a real connection), free space in ``/dev/shm``, CPUs, and an install check
that starts one worker and calls it. ``pydist bench``: a few seconds of side-by-side timings
against the standard library's pools on this machine, as a table. ``pydist worker``: a
worker process, exactly as the ``pydist-worker`` command.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib.metadata
import multiprocessing
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pydist as pd

from . import transport as _transport
from .processes.bootstrap import worker_main

__all__ = ["main", "info", "bench"]

SHM_DIR = "/dev/shm"
DEPENDENCIES = ("cloudpickle", "posix_ipc", "tqdm")


# -- info -------------------------------------------------------------------------------------------
def _try_transport(scheme: str) -> str:
    """``"ok"`` if a frame goes both ways over ``scheme`` here, else why not."""
    try:
        url = f"{scheme}://" + ("127.0.0.1:0" if scheme == "tcp" else "")
        with contextlib.closing(_transport.listen(url)) as lst:
            accepted: list[_transport.Transport] = []
            t = threading.Thread(target=lambda: accepted.append(lst.accept()), daemon=True)
            t.start()
            client = _transport.connect(lst.address, 5.0)
            t.join(5.0)
            if not accepted:
                client.close()
                return "no answer within 5 s"
            server = accepted[0]
            client.send_frame([b"ping"])
            ok = bytes(server.recv_frame()) == b"ping"
            client.close()
            server.close()
            return "ok" if ok else "a frame came back changed"
    except Exception as e:   # any failure here is the answer, not a crash of `info`
        return f"unusable: {type(e).__name__}: {e}"


def _shm_free() -> str:
    try:
        usage = shutil.disk_usage(SHM_DIR)
    except OSError as e:
        return f"not available ({e.strerror})"
    return f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB"


def _cpus() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{usable} usable ({os.cpu_count()} on the machine)"


def _dependency(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed" + (" (optional: pip install 'pydist[progress]')" if name == "tqdm" else "")


def _install_check() -> str:
    """Start one worker, call it, remove it: the whole path a user's first call takes."""
    t0 = time.perf_counter()
    try:
        pids = pd.addprocs(1)
        try:
            assert pd.remotecall_fetch(pd.myid, pids[0]) == pids[0]
        finally:
            pd.rmprocs(*pids)
    except Exception as e:
        return f"FAILED: {type(e).__name__}: {e}"
    return f"ok (a worker started, answered and exited in {time.perf_counter() - t0:.2f} s)"


def info(check: bool = True) -> list[tuple[str, str]]:
    """The facts ``pydist info`` prints, as (name, value) rows."""
    rows = [("pydist", f"{pd.__version__} at {os.path.dirname(pd.__file__)}"),
            ("python", f"{platform.python_version()} ({sys.executable})"),
            ("platform", platform.platform())]
    rows += [(f"transport {s}", _try_transport(s)) for s in _transport.schemes()]
    rows += [(SHM_DIR, _shm_free()), ("CPUs", _cpus())]
    rows += [(f"dependency {d}", _dependency(d)) for d in DEPENDENCIES]
    if check:
        rows.append(("install check", _install_check()))
    return rows


def _print_rows(rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# -- bench ------------------------------------------------------------------------------------------
def _noop(x: int) -> int:
    return x


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _bench_pair(nworkers: int, n: int, make_pool: Callable[[int], Any],
                make_executor: Callable[[int], Any]) -> dict[str, float]:
    """Seconds for each case, with the pool classes given."""
    out: dict[str, float] = {}
    out["start a pool and run one task"] = _timed(lambda: _start_and_one(make_pool, nworkers))
    with make_pool(nworkers) as pool:
        pool.map(_noop, range(nworkers * 4))                       # workers warm
        out[f"Pool.map, {n:,} tiny items"] = _timed(lambda: pool.map(_noop, range(n)))
        out[f"Pool.apply_async, {n // 50:,} tasks"] = _timed(
            lambda: [r.get() for r in [pool.apply_async(_noop, (i,)) for i in range(n // 50)]])
    with make_executor(nworkers) as ex:
        list(ex.map(_noop, range(nworkers * 4)))
        out[f"Executor.submit, {n // 50:,} tasks"] = _timed(
            lambda: [f.result() for f in [ex.submit(_noop, i) for i in range(n // 50)]])
        out[f"Executor.map, {n // 50:,} items"] = _timed(lambda: list(ex.map(_noop, range(n // 50))))
    return out


def _start_and_one(make_pool: Callable[[int], Any], nworkers: int) -> None:
    with make_pool(nworkers) as pool:
        pool.apply(_noop, (1,))


def bench(nworkers: int = 2, n: int = 100_000) -> list[tuple[str, float, float]]:
    """(case, standard library seconds, pydist seconds) for each case of ``pydist bench``."""
    ctx = multiprocessing.get_context("forkserver" if sys.platform != "win32" else "spawn")
    std = _bench_pair(nworkers, n, lambda k: ctx.Pool(k),
                      lambda k: cf.ProcessPoolExecutor(k, mp_context=ctx))
    mine = _bench_pair(nworkers, n, lambda k: pd.Pool(k), lambda k: pd.ProcessPoolExecutor(k))
    return [(case, std[case], mine[case]) for case in std]


def _print_bench(rows: list[tuple[str, float, float]], nworkers: int) -> None:
    print(f"{nworkers} workers on {_cpus()} CPUs; standard library with the forkserver context\n")
    width = max(len(c) for c, _, _ in rows)
    print(f"{'case':<{width}}  {'stdlib':>9}  {'pydist':>9}  {'speedup':>7}")
    print(f"{'-' * width}  {'-' * 9}  {'-' * 9}  {'-' * 7}")
    for case, s, p in rows:
        print(f"{case:<{width}}  {s * 1e3:7.0f}ms  {p * 1e3:7.0f}ms  {s / p:6.1f}x")
    print("\nOne quick run on a possibly busy machine; bench/bench.py measures properly.")


# -- the command ------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pydist", description="pydist: Julia's Distributed for Python.")
    parser.add_argument("--version", action="version", version=f"pydist {pd.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="version, transports usable here, /dev/shm, CPUs, install check")
    p_info.add_argument("--no-check", action="store_true", help="skip starting a worker")
    p_bench = sub.add_parser("bench", help="a quick side-by-side with the standard library's pools")
    p_bench.add_argument("--workers", type=_positive, default=2, help="worker processes (default 2)")
    p_bench.add_argument("-n", type=_positive, default=100_000,
                         help="tiny items mapped (default 100000; a fiftieth of it as tasks)")
    sub.add_parser("worker", add_help=False,
                   help="run a worker (as pydist-worker; see pydist worker --help)")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pydist`` command with ``argv`` (default: the process's); the exit status."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["worker"]:
        worker_main(args_in[1:])      # its own options, parsed by pydist-worker's parser
        return 0
    args = _parser().parse_args(args_in)
    if args.command == "info":
        rows = info(check=not args.no_check)
        _print_rows(rows)
        return 1 if any(v.startswith(("FAILED", "unusable")) for _, v in rows) else 0
    rows_b = bench(args.workers, args.n)
    _print_bench(rows_b, args.workers)
    return 0
