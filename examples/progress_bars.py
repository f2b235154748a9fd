"""Progress bars on long jobs (needs ``pip install 'pydist[progress]'``).

    python examples/progress_bars.py [--n 2000]

``pmap``, the drop-ins' maps and any set of futures can show a ``tqdm.auto`` bar: a widget
in Jupyter, a line of text in a terminal.
"""
from __future__ import annotations

import argparse
import os
import time

import pydist as pd

SMALL = os.environ.get("PYDIST_EXAMPLES_SMALL") == "1"


def work(x: int) -> int:
    """A task of about a millisecond."""
    time.sleep(0.001)
    return x * x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200 if SMALL else 2000)
    args = parser.parse_args()
    expected = [x * x for x in range(args.n)]

    pids = pd.addprocs(2)
    try:
        assert pd.pmap(work, range(args.n), progress=True) == expected
        futures = [pd.remotecall(work, pids[i % 2], i) for i in range(args.n // 10)]
        pd.progress(futures, desc="remotecalls")
        assert [f.fetch() for f in futures] == expected[: args.n // 10]
    finally:
        pd.rmprocs(*pids)

    with pd.Pool(2) as pool:
        assert pool.map(work, range(args.n), progress=True) == expected
        assert sorted(pool.imap_unordered(work, range(args.n), 8, progress=True)) == expected
    with pd.ProcessPoolExecutor(2) as ex:
        assert list(ex.map(work, range(args.n), chunksize=8, progress=True)) == expected
        pd.progress([ex.submit(work, i) for i in range(args.n // 10)], desc="submits")
    print("done")


if __name__ == "__main__":
    main()
