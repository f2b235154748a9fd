"""Plots of a recorded benchmark run (``bench/bench.py --json``), as PNG files.

    python bench/bench.py --plot docs/assets/bench                 # measure, then plot
    python bench/bench.py --from-json run.json --plot docs/assets/bench   # plot a recorded run

Needs matplotlib (``pip install -e '.[bench]'``). Every figure names the machine, the
Python and the date of the run it shows, and the load average around it.
"""
from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import Any

__all__ = ["plot_run"]

COLOURS = {"mp-pool": "#9e9e9e", "ppe": "#616161", "loky": "#bdbdbd", "pydist-shm": "#1565c0",
           "pydist-shm:lambda": "#64b5f6", "pydist-tcp": "#2e7d32", "pydist-tcp:lambda": "#81c784",
           "pydist-ppe": "#6a1b9a", "pydist-pool": "#ad1457"}


def _label(run: dict, key: str) -> str:
    base, _, variant = key.partition(":")
    label = run["backends"].get(base, {}).get("label", base)
    return f"{label}, a {variant}" if variant else label


def _median(run: dict, measurement: str, row: str, field: str | None = None) -> float | None:
    cell = run["results"].get(measurement, {}).get(row)
    if not cell or not cell["passes"]:
        return None
    return statistics.median(p[field] if field else p for p in cell["passes"])


def machine(run: dict) -> str:
    """One line naming where and when the run was made."""
    env = run["environment"]
    cpu = env.get("cpu_model") or "CPU model not recorded"
    load = f"load {env['loadavg_start'][0]:.1f} → {env.get('loadavg_end', ['?'])[0]:.1f}"
    return (f"{env['cpus']} vCPUs ({cpu}), {env['platform']}, Python {env['python']}, "
            f"{env['date'][:10]}, {load}" + (" (--quick)" if env.get("quick") else ""))


def _fmt(v: float) -> str:
    for factor, suffix in ((1e6, " M"), (1e3, " k")):
        if v >= factor:
            return f"{v / factor:.3g}{suffix}"
    return f"{v:.3g}"


def _bars(plt: Any, run: dict, rows: list[tuple[str, float]], title: str, unit: str,
          path: str, log: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.6))
    labels = [_label(run, k) for k, _ in rows]
    values = [v for _, v in rows]
    ax.barh(labels, values, color=[COLOURS.get(k, "#777") for k, _ in rows])
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    if values:                       # room for the figures written after the bars
        ax.set_xlim(right=max(values) * (4 if log else 1.18))
    for y, v in enumerate(values):
        ax.annotate(f" {_fmt(v)}", (v, y), va="center", fontsize=8)
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=11)
    fig.text(0.01, 0.005, machine(run), fontsize=6.5, color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rows(run: dict, measurement: str, field: str | None = None) -> list[tuple[str, float]]:
    out = []
    for row in run["results"].get(measurement, {}):
        v = _median(run, measurement, row, field)
        if v is not None:
            out.append((row, v))
    return out


def _arrays(plt: Any, run: dict, path: str) -> str:
    sizes = [s for s in (1, 16, 128) if f"arrays_{s}" in run["results"]]
    rows = list(run["results"].get(f"arrays_{sizes[0]}", {})) if sizes else []
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        values = [_median(run, f"arrays_{s}", row) or 0 for s in sizes]
        xs = [j + i * width for j in range(len(sizes))]
        ax.bar(xs, values, width, label=_label(run, row), color=COLOURS.get(row, "#777"))
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(sizes))])
    ax.set_xticklabels([f"{s} MiB" for s in sizes])
    ax.set_ylabel("GB/s of payload, both ways (higher is better)")
    ax.set_title("numpy array round trip to a worker and back", fontsize=11)
    ax.legend(fontsize=7, ncol=2)
    fig.text(0.01, 0.005, machine(run), fontsize=6.5, color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run: dict, outdir: str) -> list[str]:
    """Write one PNG per measurement of ``run`` (the ``--json`` dictionary) to ``outdir``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(outdir, exist_ok=True)
    at: Callable[[str], str] = lambda name: os.path.join(outdir, name)   # noqa: E731
    made = []
    if "noop" in run["results"]:
        made.append(_bars(plt, run, _rows(run, "noop", "median_us"),
                          "no-op round trip, median (lower is better)", "µs", at("noop.png")))
    if "tasks_cs1" in run["results"]:
        n = next(iter(run["results"]["tasks_cs1"].values())).get("n", 0)
        made.append(_bars(plt, run, _rows(run, "tasks_cs1"),
                          f"map of x*x over {n:,} ints, chunksize 1 (pmap: its own batches)",
                          "tasks/s, log scale (higher is better)", at("map.png"), log=True))
    if "startup" in run["results"]:
        made.append(_bars(plt, run, _rows(run, "startup", "start"),
                          "start 2 workers + first result (lower is better)", "seconds",
                          at("startup.png")))
    if any(k.startswith("arrays_") for k in run["results"]):
        made.append(_arrays(plt, run, at("arrays.png")))
    return made
