"""interrupt(): the running call gets KeyboardInterrupt, the worker lives on."""
from __future__ import annotations

import time

import pytest

import pydist as pd


def test_interrupt_a_sleeping_call_within_a_second(cluster):
    a, _ = cluster
    sleeper = pd.remotecall(time.sleep, a, 30)
    time.sleep(0.3)
    t0 = time.monotonic()
    pd.interrupt(a)
    with pytest.raises(pd.RemoteException) as info:
        sleeper.fetch(timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert isinstance(info.value.captured.ex, KeyboardInterrupt)
    assert pd.remotecall_fetch(pd.myid, a) == a


def test_interrupt_a_busy_python_loop(cluster):
    _, b = cluster

    def spin():
        while True:
            pass
    spinner = pd.remotecall(spin, b)
    time.sleep(0.3)
    pd.interrupt(b)
    with pytest.raises(pd.RemoteException) as info:
        spinner.fetch(timeout=5)
    assert isinstance(info.value.captured.ex, KeyboardInterrupt)
    assert pd.remotecall_fetch(pd.myid, b) == b


def test_interrupt_a_call_blocked_on_a_reference(cluster):
    a, _ = cluster
    gate = pd.Future()
    waiting = pd.remotecall(lambda g: g.fetch(), a, gate)
    time.sleep(0.3)
    pd.interrupt(a)
    with pytest.raises(pd.RemoteException) as info:
        waiting.fetch(timeout=5)
    assert isinstance(info.value.captured.ex, KeyboardInterrupt)
    gate.put(1)
    assert pd.remotecall_fetch(lambda g: g.fetch(), a, gate) == 1


def test_interrupt_an_idle_worker_does_nothing(cluster):
    a, b = cluster
    pd.interrupt(a)
    pd.interrupt()                 # every worker
    time.sleep(0.2)
    assert pd.remotecall_fetch(pd.myid, a) == a
    assert pd.remotecall_fetch(pd.myid, b) == b


def test_interrupt_a_dead_worker(fresh):
    (p,) = fresh(1)
    pd.rmprocs(p, waitfor=10)
    with pytest.raises(pd.ProcessExitedException):
        pd.interrupt(p)
