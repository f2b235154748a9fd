"""Julia's semantics that are easy to get subtly wrong: owner-side bookkeeping that never
waits behind user code, and remote types the master cannot import."""
from __future__ import annotations

import os
import tempfile
import threading
import time

import pytest

import pydist as pd


def _spin_until(path: str) -> str:
    """Busy a worker's call (not in a blocking section) until ``path`` exists."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "released"


def test_a_remote_channel_is_made_at_once_on_a_busy_worker(cluster):
    w = cluster[0]
    got: list = []

    def make():
        rc = pd.RemoteChannel(pid=w)
        got.append(time.monotonic())
        return rc
    with tempfile.TemporaryDirectory() as d:
        flag = os.path.join(d, "go")
        busy = pd.remotecall(_spin_until, w, flag)
        th = threading.Thread(target=make, daemon=True)
        th.start()
        th.join(20)
        made_while_busy = bool(got)
        open(flag, "w").close()
        assert busy.fetch(timeout=60) == "released"
        th.join(60)
    assert made_while_busy


def test_julia_shape_remote_channel_of_a_pid(cluster):
    w = cluster[1]
    rc = pd.RemoteChannel(w)
    assert rc.where == w
    rc.put(5)
    assert rc.take(timeout=30) == 5
