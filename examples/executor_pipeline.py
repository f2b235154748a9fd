"""A two-stage pipeline on pydist.ProcessPoolExecutor: each result of the first stage is
fed to the second as soon as it is ready (concurrent.futures.as_completed).

    python examples/executor_pipeline.py [--documents 400]

Stage 1 "downloads" (generates) a document, stage 2 counts its words; both run on the
workers, and the master never waits for a whole stage to finish.
"""
from __future__ import annotations

import argparse
import os
import random
from collections import Counter
from concurrent.futures import as_completed

from pydist import ProcessPoolExecutor

SMALL = os.environ.get("PYDIST_EXAMPLES_SMALL") == "1"


def fetch_document(i: int) -> str:
    """Stage 1: produce document ``i`` (a stand-in for I/O or parsing)."""
    rng = random.Random(i)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(200))


def count_words(text: str) -> Counter:
    """Stage 2: the word counts of one document."""
    return Counter(text.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=40 if SMALL else 400)
    args = parser.parse_args()

    totals: Counter = Counter()
    with ProcessPoolExecutor(max_workers=2) as ex:
        stage1 = [ex.submit(fetch_document, i) for i in range(args.documents)]
        stage2 = [ex.submit(count_words, f.result()) for f in as_completed(stage1)]
        for f in as_completed(stage2):
            totals += f.result()
        # The same work with map, results in input order.
        lengths = list(ex.map(len, map(fetch_document, range(5)), chunksize=2))
    assert sum(totals.values()) == 200 * args.documents
    print(f"{args.documents} documents: {dict(totals.most_common())}; first lengths {lengths}")


if __name__ == "__main__":
    main()
