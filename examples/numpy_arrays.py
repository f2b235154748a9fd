"""numpy arrays to and from workers: a large matrix placed on every worker once, then many
small calls that use it.

    python examples/numpy_arrays.py [--rows 4000] [--cols 500]

Arrays travel as pickle protocol-5 buffers: to a local worker they are copied once into
shared memory and once out, never through a pipe. Sending the matrix once per worker
(``everywhere``) instead of with every call is what makes the calls cheap.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

import pydist as pd

SMALL = os.environ.get("PYDIST_EXAMPLES_SMALL") == "1"

_matrix: np.ndarray | None = None      # each worker's copy, set by store


def store(matrix: np.ndarray) -> None:
    """Run on every worker: keep the matrix for later calls."""
    global _matrix
    _matrix = matrix


def project(vector: np.ndarray) -> np.ndarray:
    """The worker's matrix times ``vector``."""
    assert _matrix is not None, "store() did not run here"
    return _matrix @ vector


def normalise(block: np.ndarray) -> np.ndarray:
    """A block of rows scaled to unit length (a big array there and back)."""
    return block / np.linalg.norm(block, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400 if SMALL else 4000)
    parser.add_argument("--cols", type=int, default=50 if SMALL else 500)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((args.rows, args.cols))

    pids = pd.addprocs(2)
    try:
        pd.everywhere(store, matrix)                          # once per worker
        vectors = [rng.standard_normal(args.cols) for _ in range(20)]
        projected = pd.pmap(project, vectors)                 # small calls, big matrix there
        blocks = np.array_split(matrix, 8)
        normalised = np.vstack(pd.pmap(normalise, blocks))    # big arrays both ways
    finally:
        pd.rmprocs(*pids)

    assert all(np.allclose(p, matrix @ v) for p, v in zip(projected, vectors))
    assert np.allclose(np.linalg.norm(normalised, axis=1), 1.0)
    print(f"{len(vectors)} projections of a {matrix.shape} matrix "
          f"({matrix.nbytes / 2**20:.1f} MiB) and {len(blocks)} blocks normalised on {len(pids)} workers")


if __name__ == "__main__":
    main()
