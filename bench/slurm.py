"""How long a Slurm launch takes, on the lab cluster of ``tests/slurmlab.py`` (root needed).

    python bench/slurm.py [--passes N]

Prints the lab's bring-up and teardown, and for 2 workers (``nodes=2, ntasks_per_node=1``)
and 4 (``nodes=2, ntasks_per_node=2``) the median and range over passes of
``addprocs(SlurmManager(...))`` (srun, the tasks' interpreters, the dial-back and the join)
and of ``rmprocs`` until ``squeue`` is empty. Most of a launch is the workers' interpreters
starting on a 2-vCPU machine shared with everything else, so the figures move with load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from slurmlab import SlurmLab  # noqa: E402

MASTER = """
import json, subprocess, sys, time
import pydist as pd
out = {}
for label, opts in (("2 workers", dict(nodes=2, ntasks_per_node=1)),
                    ("4 workers", dict(nodes=2, ntasks_per_node=2))):
    adds, removes = [], []
    for _ in range(int(sys.argv[1])):
        t = time.monotonic()
        pids = pd.addprocs(pd.SlurmManager(**opts))
        adds.append(time.monotonic() - t)
        t = time.monotonic()
        pd.rmprocs(pids)
        while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
            time.sleep(0.02)
        removes.append(time.monotonic() - t)
    out[label] = {"addprocs": adds, "rmprocs": removes}
print("RESULT " + json.dumps(out))
"""


def _line(name: str, values: list[float]) -> str:
    return (f"  {name:<10} median {statistics.median(values):6.2f} s   "
            f"range {min(values):.2f}-{max(values):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    ok, reason = SlurmLab.available()
    if not ok:
        raise SystemExit(reason)
    lab = SlurmLab()
    lab.start()
    try:
        print(f"lab bring-up: {lab.bringup_seconds:.2f} s")
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False, dir=lab.tmp) as f:
            f.write(textwrap.dedent(MASTER))
        done = lab.client([lab.python, f.name, str(args.passes)], timeout=600, check=False)
        lines = [x[7:] for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"the master failed:\n{done.stdout}\n{done.stderr}")
        for label, figures in json.loads(lines[0]).items():
            print(f"{label} ({args.passes} passes):")
            print(_line("addprocs", figures["addprocs"]))
            print(_line("rmprocs", figures["rmprocs"]) + "  (until squeue is empty)")
    finally:
        t = time.monotonic()
        lab.close()
        print(f"lab teardown: {time.monotonic() - t:.2f} s")


if __name__ == "__main__":
    main()
