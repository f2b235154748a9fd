"""Topologies: lazy and eager all-to-all, master-worker, custom; peer connections counted."""
from __future__ import annotations

import threading

import pytest

import pydist as pd


def peers_connected() -> list[int]:
    from pydist.cluster.group import PGRP
    from pydist.cluster.peers import W_CONNECTED
    return sorted(p for p, w in PGRP.workers.items() if p != 1 and w.state == W_CONNECTED)


def test_lazy_all_to_all_connects_on_first_use(fresh):
    a, b, c = fresh(3)
    assert pd.remotecall_fetch(peers_connected, c) == []
    assert pd.remotecall_fetch(lambda t: pd.remotecall_fetch(pd.myid, t), c, a) == a
    assert pd.remotecall_fetch(peers_connected, c) == [a]
    # the lower id asks the higher one (through the master) to dial it
    assert pd.remotecall_fetch(lambda t: pd.remotecall_fetch(pd.myid, t), a, b) == b
    assert pd.remotecall_fetch(peers_connected, a) == [b, c]


def test_eager_all_to_all_connects_at_join(transport):
    pids = pd.addprocs(3, transport=transport, lazy=False)
    try:
        for p in pids:
            assert pd.remotecall_fetch(peers_connected, p) == [q for q in pids if q != p]
    finally:
        pd.rmprocs(*pids, waitfor=30)


def test_master_worker_forbids_worker_to_worker(transport):
    pids = pd.addprocs(2, transport=transport, topology="master_worker")
    try:
        with pytest.raises(pd.RemoteException) as info:
            pd.remotecall_fetch(lambda t: pd.remotecall_fetch(pd.myid, t), pids[1], pids[0])
        assert "master_worker" in str(info.value)
        assert pd.remotecall_fetch(lambda: pd.remotecall_fetch(pd.myid, 1), pids[0]) == 1
    finally:
        pd.rmprocs(*pids, waitfor=30)


class ChainManager(pd.LocalManager):
    """Local workers connected in a chain: each to the one launched before it."""

    def launch(self, params, launched, launch_ntfy):
        mine: list = []
        super().launch(params, mine, threading.Condition())
        for i, config in enumerate(mine):
            config.ident = f"link{i}"
            config.connect_idents = [f"link{i - 1}"] if i else []
        with launch_ntfy:
            launched.extend(mine)
            launch_ntfy.notify_all()


def test_custom_topology_follows_connect_idents(transport):
    pids = pd.addprocs(ChainManager(3), transport=transport, topology="custom")
    try:
        a, b, c = pids
        assert pd.remotecall_fetch(peers_connected, a) == [b]
        assert pd.remotecall_fetch(peers_connected, b) == [a, c]
        assert pd.remotecall_fetch(peers_connected, c) == [b]
        assert pd.remotecall_fetch(lambda t: pd.remotecall_fetch(pd.myid, t), c, b) == b
        with pytest.raises(pd.RemoteException) as info:
            pd.remotecall_fetch(lambda t: pd.remotecall_fetch(pd.myid, t), c, a)
        assert "connect_idents" in str(info.value)
    finally:
        pd.rmprocs(*pids, waitfor=30)
