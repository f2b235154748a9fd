"""The macros as functions: spawnat, spawn, fetchfrom, everywhere, distributed."""
from __future__ import annotations

import operator
import sys
import time

import pytest

import pydist as pd
from pydist.refs.macros import splitrange


def test_spawnat_and_fetchfrom(cluster):
    a, b = cluster
    assert pd.spawnat(a, pd.myid).fetch(timeout=10) == a
    assert pd.fetchfrom(b, pd.myid) == b
    assert pd.fetchfrom(b, lambda x, y=0: x + y, 1, y=2) == 3
    with pytest.raises(TypeError, match="ANY"):
        pd.spawnat("anywhere", pd.myid)


def test_any_goes_round_robin(cluster):
    seen = [pd.spawn(pd.myid).fetch(timeout=10) for _ in range(6)]
    assert set(seen) == set(cluster)
    assert all(x != y for x, y in zip(seen, seen[1:]))
    assert pd.fetchfrom(pd.ANY, pd.myid) in cluster


def test_everywhere_string_defines_globals_in_main(cluster):
    pd.everywhere("x_from_everywhere = 7")
    main = sys.modules["__main__"]
    assert main.x_from_everywhere == 7
    for p in cluster:
        assert pd.remotecall_fetch(lambda: sys.modules["__main__"].x_from_everywhere, p) == 7


def test_everywhere_import(cluster):
    pd.everywhere("import math as m_everywhere")
    assert pd.remotecall_fetch(lambda: sys.modules["__main__"].m_everywhere.sqrt(16), cluster[0]) == 4


def test_everywhere_callable_and_procs(cluster):
    a, b = cluster
    box = pd.RemoteChannel(lambda: pd.Channel(10))
    pd.everywhere(lambda ch, tag: ch.put((pd.myid(), tag)), box, "t")
    assert sorted(box.take(timeout=10) for _ in range(3)) == [(1, "t"), (a, "t"), (b, "t")]
    pd.everywhere(lambda ch: ch.put(pd.myid()), box, procs=[b])
    assert box.take(timeout=10) == b and not box.isready()


def test_everywhere_as_decorator(cluster):
    @pd.everywhere
    def triple_everywhere(x):
        return 3 * x
    assert triple_everywhere(2) == 6
    for p in cluster:
        assert pd.remotecall_fetch(lambda: sys.modules["__main__"].triple_everywhere(5), p) == 15

    @pd.everywhere(procs=[cluster[0]])
    def only_on_a():
        return "a"
    assert pd.remotecall_fetch(lambda: hasattr(sys.modules["__main__"], "only_on_a"), cluster[0])
    assert not pd.remotecall_fetch(lambda: hasattr(sys.modules["__main__"], "only_on_a"), cluster[1])


def test_everywhere_failures_come_together(cluster):
    with pytest.raises(ExceptionGroup) as info:
        pd.everywhere("1 / 0")
    assert len(info.value.exceptions) == 3
    assert all(isinstance(e, pd.RemoteException) for e in info.value.exceptions)
    assert sorted(e.pid for e in info.value.exceptions) == [1, *cluster]
    with pytest.raises(TypeError):
        pd.everywhere(42)


@pytest.mark.parametrize("n, parts, sizes", [
    (10, 3, [4, 3, 3]), (2, 4, [1, 1]), (0, 2, [0]), (9, 3, [3, 3, 3]), (1_000_001, 2, [500_001, 500_000]),
])
def test_splitrange(n, parts, sizes):
    chunks = splitrange(n, parts)
    assert [len(r) for r in chunks] == sizes
    assert [x for r in chunks for x in r] == list(range(n))


def test_distributed_with_a_reducer(cluster):
    assert pd.distributed(lambda x: x, range(1_000_001), reducer=operator.add) == sum(range(1_000_001))
    assert pd.distributed(lambda s: s.upper(), list("abcde"), reducer=operator.add) == "ABCDE"
    assert pd.distributed(lambda x: [x], range(7), reducer=operator.add) == list(range(7))


def test_distributed_without_a_reducer_returns_a_future(cluster):
    box = pd.RemoteChannel(lambda: pd.Channel(100))
    t0 = time.monotonic()
    done = pd.distributed(lambda x, ch=box: (time.sleep(0.05), ch.put(x)), range(8))
    assert isinstance(done, pd.Future) and time.monotonic() - t0 < 0.3
    assert done.fetch(timeout=30) is None
    assert sorted(box.take(timeout=5) for _ in range(8)) == list(range(8))


def test_distributed_failure_reaches_the_future(cluster):
    done = pd.distributed(lambda x: 1 / (x - 3), range(6))
    with pytest.raises(pd.RemoteException):
        done.fetch(timeout=30)
