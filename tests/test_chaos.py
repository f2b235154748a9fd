"""A short, seeded run of the randomized fault soak (``bench/chaos.py``): random operations
while workers are killed, stopped and removed; every operation gets its right value or the
right exception, and nothing is left behind."""
from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("seed", [20261206])
def test_a_short_chaos_run_keeps_every_promise(transport, leak_oracle, seed):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)   # before any worker starts: they import ``chaos`` by name
    import chaos
    out = chaos.soak(seed=seed, ops=10**9, seconds=5.0, workers=3, clients=2, chaos_every=0.25,
                     transport=transport, quiet=True)
    assert out["violations"] == [], f"seed {seed}: {out}"
    assert out["ops"] > 100 and sum(out["events"].values()) >= 2, out
