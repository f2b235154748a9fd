"""The figures of the start path, for ``bench/bench.py`` (measurement ``startpath``):

- ``import``:  ``import pydist`` against ``import concurrent.futures, multiprocessing``,
               each in a fresh interpreter, in turn (seconds of the import itself).
- ``recycle``: ``ProcessPoolExecutor(2, max_tasks_per_child=1)`` over no-op tasks: pydist
               against the standard library with ``mp_context`` forkserver.
- ``future``:  ``fetch(remotecall(noop, w))`` against ``remotecall_fetch(noop, w)`` on one
               worker, and both alternating between two workers, beside
               ``ProcessPoolExecutor(2)`` and pydist's ``submit().result()`` (µs per call).
- ``firstbig``: after ``addprocs(1)``, the first 64 MiB array round trip against the tenth.
- ``cold``:    a program's first start: a fresh interpreter imports, starts 2 workers and
               gets a first result (for pydist that includes starting the worker server,
               which later starts in the same program reuse), each way in turn.

Each pass measures every row in turn; the report gives medians over passes and the
ratios the targets name.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from workloads import echo, noop

__all__ = ["run_pass", "report_lines", "targets"]

IMPORT_CODE = "import time; t = time.perf_counter(); import {}; print(time.perf_counter() - t)"
BIG = 64 << 20


def _import_seconds(modules: str) -> float:
    out = subprocess.run([sys.executable, "-c", IMPORT_CODE.format(modules)], capture_output=True,
                         text=True, timeout=60, check=True)
    return float(out.stdout.split()[-1])


def measure_import(reps: int) -> dict[str, float]:
    """Medians over ``reps`` fresh interpreters of each import, taken in turn."""
    ours, theirs = [], []
    for _ in range(reps):
        ours.append(_import_seconds("pydist"))
        theirs.append(_import_seconds("concurrent.futures, multiprocessing"))
    return {"pydist": statistics.median(ours), "stdlib": statistics.median(theirs)}


# A program's first start, each way: the child prints the seconds from before its import to
# the first result.
COLD_CODE = {
    "pydist addprocs(2)": "import pydist as p; w = p.addprocs(2); p.remotecall_fetch(abs, w[0], -1)",
    "pydist.ProcessPoolExecutor(2)": "import pydist as p; e = p.ProcessPoolExecutor(2); e.submit(abs, -1).result()",
    "multiprocessing.Pool(2)": "import multiprocessing as m; p = m.Pool(2); p.apply(abs, (-1,))",
    "ProcessPoolExecutor(2)":
        "import concurrent.futures as c; e = c.ProcessPoolExecutor(2); e.submit(abs, -1).result()",
}


def _cold_seconds(code: str) -> float:
    timed = f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", timed], capture_output=True, text=True,
                         timeout=120, check=True)
    return float(out.stdout.split()[-1])


def measure_cold(reps: int) -> dict[str, float]:
    """Medians over ``reps`` fresh interpreters of each way's first start, taken in turn."""
    times: dict[str, list[float]] = {row: [] for row in COLD_CODE}
    for _ in range(reps):
        for row, code in COLD_CODE.items():
            times[row].append(_cold_seconds(code))
    return {row: statistics.median(v) for row, v in times.items()}


def _recycle_seconds(make: Callable[[], Any], n: int) -> float:
    ex = make()
    try:
        t0 = time.perf_counter()
        for f in [ex.submit(noop) for _ in range(n)]:
            f.result(timeout=120)
        return time.perf_counter() - t0
    finally:
        ex.shutdown(wait=True)


def measure_recycle(n: int) -> dict[str, float]:
    """Seconds for ``n`` no-op tasks, each in a worker of its own (max_tasks_per_child=1)."""
    import pydist
    out = {"pydist": _recycle_seconds(lambda: pydist.ProcessPoolExecutor(2, max_tasks_per_child=1), n)}
    for method in ("forkserver",):
        ctx = multiprocessing.get_context(method)
        out[method] = _recycle_seconds(
            lambda ctx=ctx: cf.ProcessPoolExecutor(2, mp_context=ctx, max_tasks_per_child=1), n)
    return out


def _per_call_us(call: Callable[[int], Any], calls: int) -> float:
    for i in range(min(200, calls)):
        call(i)
    times = []
    clock = time.perf_counter_ns
    for i in range(calls):
        t0 = clock()
        call(i)
        times.append(clock() - t0)
    return statistics.median(times) / 1e3


def measure_future(calls: int) -> dict[str, float]:
    """Median µs of one blocking no-op by each path (a cluster of 2, then the executors)."""
    import pydist
    w = pydist.addprocs(2)
    try:
        out = {
            "remotecall_fetch": _per_call_us(lambda i: pydist.remotecall_fetch(noop, w[0]), calls),
            "fetch(remotecall)": _per_call_us(lambda i: pydist.fetch(pydist.remotecall(noop, w[0])), calls),
            "remotecall_fetch, alternating": _per_call_us(
                lambda i: pydist.remotecall_fetch(noop, w[i & 1]), calls),
            "fetch(remotecall), alternating": _per_call_us(
                lambda i: pydist.fetch(pydist.remotecall(noop, w[i & 1])), calls),
        }
    finally:
        pydist.rmprocs(*w, waitfor=20)
    for label, make in (("pydist.ProcessPoolExecutor(2)", lambda: pydist.ProcessPoolExecutor(2)),
                        ("ProcessPoolExecutor(2)", lambda: cf.ProcessPoolExecutor(2))):
        ex = make()
        try:
            out[label] = _per_call_us(lambda i, ex=ex: ex.submit(noop).result(), calls)
        finally:
            ex.shutdown(wait=True)
    return out


def measure_firstbig(transport: str) -> dict[str, float]:
    """Seconds of the 1st and the 10th 64 MiB round trip to a worker just added."""
    import pydist
    a = np.arange(BIG // 8, dtype=np.int64)
    w = pydist.addprocs(1, transport=transport)
    try:
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            r = pydist.remotecall_fetch(echo, w[0], a)
            times.append(time.perf_counter() - t0)
            assert r.shape == a.shape and r[-1] == a[-1]
            del r
    finally:
        pydist.rmprocs(*w, waitfor=20)
    return {"first": times[0], "tenth": times[-1]}


def run_pass(quick: bool, add: Callable[[str, str, Any], None], log: Callable[[str], None]) -> None:
    """One pass of every start-path measurement; ``add(measurement, row, value)``."""
    log("start path: import")
    for row, v in measure_import(3 if quick else 5).items():
        add("sp_import", row, v)
    log("start path: a program's first start")
    for row, v in measure_cold(3 if quick else 5).items():
        add("sp_cold", row, v)
    log("start path: recycling")
    for row, v in measure_recycle(100 if quick else 1000).items():
        add("sp_recycle", row, v)
    log("start path: the Future path")
    for row, v in measure_future(500 if quick else 3000).items():
        add("sp_future", row, v)
    log("start path: the first 64 MiB")
    for transport in ("shm", "tcp"):
        for row, v in measure_firstbig(transport).items():
            add("sp_firstbig", f"{transport} {row}", v)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def report_lines(median: Callable[[str, str], float | None]) -> list[str]:
    """The tables, from ``median(measurement, row)``."""
    lines = ["", "import in a fresh interpreter, seconds (lower is better)"]
    std = median("sp_import", "stdlib")
    for row, label in (("pydist", "import pydist"),
                       ("stdlib", "import concurrent.futures, multiprocessing")):
        v = median("sp_import", row)
        lines.append(f"{label:<48}{_fmt(v, '.4f'):>10}{_fmt(_ratio(v, std), '.2f'):>8}×")
    lines += ["", "a program's first start: import, 2 workers, first result, in a fresh interpreter, "
                  "seconds (pydist: the worker server starts too)"]
    pool = median("sp_cold", "multiprocessing.Pool(2)")
    for row in COLD_CODE:
        v = median("sp_cold", row)
        lines.append(f"{row:<48}{_fmt(v, '.3f'):>10}{_fmt(_ratio(v, pool), '.2f'):>8}× Pool")
    lines += ["", "ProcessPoolExecutor(2, max_tasks_per_child=1), no-op tasks, seconds (lower is better)"]
    fs = median("sp_recycle", "forkserver")
    for row in ("pydist", "forkserver"):
        v = median("sp_recycle", row)
        label = "pydist.ProcessPoolExecutor" if row == "pydist" else f"ProcessPoolExecutor, {row}"
        lines.append(f"{label:<48}{_fmt(v, '.3f'):>10}{_fmt(_ratio(v, fs), '.2f'):>8}× forkserver")
    lines += ["", "a blocking no-op by each path, µs per call (lower is better)"]
    ppe = median("sp_future", "ProcessPoolExecutor(2)")
    for row in ("remotecall_fetch", "fetch(remotecall)", "remotecall_fetch, alternating",
                "fetch(remotecall), alternating", "pydist.ProcessPoolExecutor(2)",
                "ProcessPoolExecutor(2)"):
        v = median("sp_future", row)
        lines.append(f"{row:<48}{_fmt(v, '.1f'):>10}{_fmt(_ratio(v, ppe), '.2f'):>8}× PPE")
    lines += ["", "64 MiB round trip after addprocs(1), seconds: the first and the tenth"]
    for t in ("shm", "tcp"):
        first, tenth = median("sp_firstbig", f"{t} first"), median("sp_firstbig", f"{t} tenth")
        lines.append(f"pydist {t:<41}{_fmt(first, '.4f'):>10}{_fmt(tenth, '.4f'):>10}"
                     f"{_fmt(_ratio(first, tenth), '.2f'):>8}×")
    return lines


def targets(median: Callable[[str, str], float | None],
            startup: Callable[[str], float | None]) -> list[dict[str, Any]]:
    """The start path's targets, as ``bench.py`` lists them."""
    future = lambda row: median("sp_future", row)          # noqa: E731
    out = [
        {"what": f"start 2 workers + first result, {k} ≤ 3 × multiprocessing.Pool(2), fork",
         "ratio": _ratio(startup(k), startup("mp-pool")), "limit": 3, "le": True}
        for k in ("pydist-shm", "pydist-tcp", "pydist-ppe", "pydist-pool")]
    out += [
        {"what": "start 2 workers + first result, pydist shm, absolute seconds ≤ 0.03",
         "ratio": startup("pydist-shm"), "limit": 0.03, "le": True, "seconds": True},
        {"what": "max_tasks_per_child=1 over no-ops ≤ 0.5 × stdlib with forkserver",
         "ratio": _ratio(median("sp_recycle", "pydist"), median("sp_recycle", "forkserver")),
         "limit": 0.5, "le": True},
        {"what": "import pydist ≤ 1.5 × import concurrent.futures, multiprocessing",
         "ratio": _ratio(median("sp_import", "pydist"), median("sp_import", "stdlib")),
         "limit": 1.5, "le": True},
        {"what": "fetch(remotecall(noop, w)) ≤ 1.25 × remotecall_fetch(noop, w)",
         "ratio": _ratio(future("fetch(remotecall)"), future("remotecall_fetch")),
         "limit": 1.25, "le": True},
        {"what": "fetch(remotecall) alternating between 2 workers ≤ 0.5 × PPE(2) submit().result()",
         "ratio": _ratio(future("fetch(remotecall), alternating"), future("ProcessPoolExecutor(2)")),
         "limit": 0.5, "le": True},
        {"what": "first 64 MiB round trip after addprocs(1) ≤ 3 × the tenth (shm)",
         "ratio": _ratio(median("sp_firstbig", "shm first"), median("sp_firstbig", "shm tenth")),
         "limit": 3, "le": True},
    ]
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)
