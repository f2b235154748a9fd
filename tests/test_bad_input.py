"""Bad input to every public function: a clear TypeError/ValueError naming the parameter and
the value, before anything starts; never an AttributeError from the internals, never a dead
worker."""
from __future__ import annotations

import itertools
import threading

import pytest

import pydist as pd
from pydist.cluster.values import unwrap
from pydist.cluster.waiting import call_on_owner
from pydist.refs.remotechannel import _chan_take

BAD_PIDS = ["2", 2.0, None, True]

BY_PID = {
    "remotecall": lambda p: pd.remotecall(pd.myid, p),
    "remotecall_fetch": lambda p: pd.remotecall_fetch(pd.myid, p),
    "remotecall_wait": lambda p: pd.remotecall_wait(pd.myid, p),
    "remote_do": lambda p: pd.remote_do(pd.myid, p),
    "Future": lambda p: pd.Future(p if p is not None else "x"),
    "RemoteChannel": lambda p: pd.RemoteChannel(pid=p if p is not None else "x"),
    "spawnat": lambda p: pd.spawnat(p, pd.myid),
    "fetchfrom": lambda p: pd.fetchfrom(p, pd.myid),
    "procs": lambda p: pd.procs(p if p is not None else "x"),
    "rmprocs": lambda p: pd.rmprocs(p),
    "interrupt": lambda p: pd.interrupt(p),
    "WorkerPool": lambda p: pd.WorkerPool([p]),
    "push": lambda p: pd.WorkerPool().push(p),
    "worker_state": lambda p: pd.worker_state(p),
    "everywhere": lambda p: pd.everywhere("1", procs=[p]),
    "remotecall_eval": lambda p: pd.remotecall_eval([p], "1"),
}


@pytest.mark.parametrize("name", sorted(BY_PID))
def test_a_pid_that_is_not_an_int(cluster, name):
    for bad in BAD_PIDS:
        shown = repr(bad if bad is not None or name not in ("Future", "RemoteChannel", "procs") else "x")
        with pytest.raises(TypeError) as info:
            BY_PID[name](bad)
        assert shown in str(info.value), (name, bad, str(info.value))
    assert pd.workers() == cluster


@pytest.mark.parametrize("call", [
    lambda f, rc: f.fetch(timeout="1"), lambda f, rc: f.wait(timeout=-1),
    lambda f, rc: rc.take(timeout="1"), lambda f, rc: rc.put(1, timeout=float("nan")),
    lambda f, rc: pd.fetch(rc, timeout=[1]), lambda f, rc: pd.Channel(2).take(timeout="1"),
])
def test_a_bad_timeout_is_refused_here_and_the_owner_lives_on(cluster, call):
    w = cluster[0]
    f, rc = pd.remotecall(pd.myid, w), pd.RemoteChannel(w)
    with pytest.raises((TypeError, ValueError), match="timeout"):
        call(f, rc)
    assert f.fetch(timeout=30) == w


def test_a_failing_internal_operation_is_answered_not_fatal(cluster):
    w = cluster[1]
    rc = pd.RemoteChannel(w)
    with pytest.raises(TypeError, match="timeout"):
        unwrap(call_on_owner(_chan_take, w, rc.rrid, "1", timeout=30))   # past the caller's checks
    rc.put(3)
    assert rc.take(timeout=30) == 3


def flaky_once(x, seen=set()):   # noqa: B006 -- per-worker memory of what failed once
    if x not in seen:
        seen.add(x)
        raise ValueError(f"first try of {x}")
    return x


def test_retry_delays_are_read_lazily(cluster):
    pool = pd.WorkerPool(cluster[:1])
    endless = itertools.repeat(0.0)
    assert pd.pmap(flaky_once, range(5), pool=pool, retry_delays=endless) == list(range(5))
    backoff = (0.001 * 2 ** i for i in itertools.count())     # an endless generator
    assert pd.pmap(flaky_once, range(5, 8), pool=pool, retry_delays=backoff) == [5, 6, 7]


@pytest.mark.parametrize("delays, error", [(5, TypeError), (["a"], TypeError), ([1, -1], ValueError),
                                           ("0.1", TypeError)])
def test_bad_retry_delays(cluster, delays, error):
    with pytest.raises(error, match="retry_delays"):
        pd.pmap(abs, [1], retry_delays=delays)


def test_an_unpicklable_argument_is_named(cluster):
    w = cluster[0]
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"argument 2 \(_thread\.lock\)"):
        pd.remotecall_fetch(lambda a, b: 1, w, 1, lock)
    with pytest.raises(TypeError, match=r"keyword argument 'key' \(_thread\.lock\)"):
        pd.remotecall(lambda a, key=None: 1, w, 1, key=lock)
    with pytest.raises(TypeError, match=r"argument 1 \(_thread\.lock\)"):
        pd.remote_do(print, w, lock)
    assert pd.remotecall_fetch(pd.myid, w) == w


@pytest.mark.parametrize("call, match", [
    (lambda: pd.pmap(abs, 5), "argument 2 must be iterable"),
    (lambda: pd.distributed(abs, 5), "iterable"),
    (lambda: pd.CachingPool(5), "list of worker ids"),
    (lambda: pd.addprocs("2"), "'2'"),
])
def test_other_bad_arguments(call, match):
    with pytest.raises(TypeError, match=match):
        call()
