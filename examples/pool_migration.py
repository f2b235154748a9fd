"""A multiprocessing.Pool program moved to pydist by changing one import.

    python examples/pool_migration.py [--lines 200000]

Each worker loads a "model" once, in the pool's ``initializer`` (here a vocabulary built
from a seed: in real code, weights read from a file), and every task uses it. The
initializer and the task are in ``_wordmodel.py``, beside this script (see there why).
"""
from __future__ import annotations

import argparse
import os
import random

from _wordmodel import known_words, load_vocabulary  # the code the workers run

from pydist import Pool  # was: from multiprocessing import Pool

SMALL = os.environ.get("PYDIST_EXAMPLES_SMALL") == "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2_000 if SMALL else 200_000)
    args = parser.parse_args()
    rng = random.Random(1)
    lines = [" ".join("".join(rng.choice("abcdefghij") for _ in range(3)) for _ in range(8))
             for _ in range(args.lines)]

    with Pool(2, initializer=load_vocabulary, initargs=(42, 300)) as pool:
        counts = pool.map(known_words, lines)                       # in order
        first = next(pool.imap(known_words, lines[:10], chunksize=5))
        async_result = pool.apply_async(known_words, (lines[0],))
        assert async_result.get(timeout=30) == counts[0] == first
    load_vocabulary(42, 300)                                        # the same, serially
    assert counts == [known_words(line) for line in lines]
    print(f"{sum(counts):,} known words in {len(lines):,} lines")


if __name__ == "__main__":
    main()
