"""SharedArray: one array in shared memory, mapped by local processes, sent by name.

What the receiver gets is a view of the very memory (writes are seen everywhere); the
memory is forgotten everywhere once no handle is left; /dev/shm holds nothing of it once
it is built; hostile names and sizes are refused.
"""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import psutil
import pytest
from testkit import shm_entries, subprocess_env, wait_until

import pydist as pd
from pydist.arrays import sharedmap
from pydist.errors import SerializationError
from pydist.shm import segment as seg
from pydist.shm.segment import SegmentError


def fill_with_id(S):
    S[..., pd.localindices(S)] = pd.myid()


def table_sizes(pids):
    return [sharedmap.table_size(), *[pd.remotecall_fetch(sharedmap.table_size, p) for p in pids]]


def keep(S):
    """Hold ``S`` in this process until ``drop``."""
    sys.modules["__main__"].__dict__["_kept"] = S


def drop():
    return sys.modules["__main__"].__dict__.pop("_kept") is not None


def describe(S):
    return type(S).__name__, float(S.sum()), pd.indexpids(S), pd.localindices(S)


def write_corner(S, value):
    S[(0,) * S.ndim] = value
    return S[1:]


def test_workers_fill_their_share_and_the_master_sees_it(cluster):
    S = pd.SharedArray((3, 1001), np.int64, init=fill_with_id)
    assert S.pids == cluster
    expected = np.zeros((3, 1001), np.int64)
    for i, p in enumerate(cluster):
        expected[:, i * 1001 // 2:(i + 1) * 1001 // 2] = p
    assert np.array_equal(S, expected)
    name, total, index, share = pd.remotecall_fetch(describe, cluster[1], S)
    assert (name, total, index, share) == ("SharedArray", float(expected.sum()), 1,
                                          slice(500, 1001))
    assert pd.indexpids(S) == -1 and pd.localindices(S) == slice(0, 0)


def test_the_receiver_writes_the_same_memory_and_views_travel_by_name(cluster):
    S = pd.SharedArray((4, 6))
    back = pd.remotecall_fetch(write_corner, cluster[0], S[1:], 7.0)
    assert S[1, 0] == 7.0                      # the worker wrote into our memory
    assert isinstance(back, pd.SharedArray) and back.shape == (2, 6)
    back[0, 1] = 5.0                           # the view it sent back is our memory too
    assert S[2, 1] == 5.0
    assert type(S + 1) is np.ndarray and type(pd.sdata(S)) is np.ndarray


def test_channels_pmap_and_executor_tasks_carry_it_by_name(cluster):
    S = pd.SharedArray(8, np.int32)
    chan = pd.RemoteChannel(lambda: pd.Channel(4), cluster[0])
    chan.put(S)
    pd.remotecall_fetch(lambda c: write_corner(c.take(), 3), cluster[1], chan)
    assert S[0] == 3
    pd.pmap(lambda i: S.__setitem__(i, i * 10), range(1, 8))
    assert list(S) == [3, 10, 20, 30, 40, 50, 60, 70]
    with pd.ProcessPoolExecutor(pool=pd.WorkerPool(cluster)) as ex:
        assert ex.submit(np.sum, S).result(timeout=30) == 283


def test_sending_to_a_process_without_a_share_names_it(cluster):
    S = pd.SharedArray(10, pids=[cluster[0]])
    with pytest.raises(Exception, match=f"to process {cluster[1]}: it is mapped only by "
                                        rf"processes \[1, {cluster[0]}\]"):
        pd.remotecall_fetch(len, cluster[1], S)
    assert pd.remotecall_fetch(len, cluster[0], S) == 10
    with pytest.raises(ValueError, match="process 99, which is not in this cluster"):
        pd.SharedArray(3, pids=[99])


def forgotten(before, pids):
    """No process maps more SharedArrays than it did ``before``."""
    return all(n <= b for n, b in zip(table_sizes(pids), before))


def refusal(S, pid):
    return f"cannot send SharedArray {S.segment} to process {pid}: it is mapped only by"


def test_pmap_items_and_shipped_closures_are_refused_at_the_sender(cluster):
    before = table_sizes(cluster)
    S = pd.SharedArray(10, pids=[cluster[0]])
    other = pd.WorkerPool([cluster[1]])
    with pytest.raises(SerializationError, match=refusal(S, cluster[1])):
        pd.pmap(len, [S, S[2:]], pool=other)
    with pytest.raises(SerializationError, match=refusal(S, cluster[1])):
        pd.pmap(lambda i: float(S[i]), range(3), pool=other)  # noqa: F821  (S is deleted below, after this call)
    assert pd.pmap(len, [S, S[2:]], pool=pd.WorkerPool([cluster[0]])) == [10, 8]
    del S
    gc.collect()
    assert wait_until(lambda: forgotten(before, cluster), 10), table_sizes(cluster)


def test_drop_in_tasks_and_initializers_are_refused_at_the_sender(cluster):
    # Their arguments are pickled ahead of the message; the check still runs before sending.
    before = table_sizes(cluster)
    S = pd.SharedArray(10, pids=[cluster[0]])
    with pd.ProcessPoolExecutor(pool=pd.WorkerPool([cluster[1]])) as ex:
        with pytest.raises(ValueError, match=refusal(S, cluster[1])):
            ex.submit(len, S).result(timeout=30)                  # alone, to an idle worker
        with pytest.raises(ValueError, match=refusal(S, cluster[1])):
            list(ex.map(len, [S] * 6, timeout=30))                # in batches
        assert ex.submit(len, [1, 2]).result(timeout=30) == 2      # the executor goes on
    with pd.ProcessPoolExecutor(pool=pd.WorkerPool([cluster[0]])) as ex:
        assert list(ex.map(len, [S] * 6, timeout=30)) == [10] * 6
    ex = pd.ProcessPoolExecutor(pool=pd.WorkerPool([cluster[1]]), initializer=len, initargs=(S,))
    try:
        with pytest.raises(BrokenProcessPool) as broken:
            ex.submit(len, [1]).result(timeout=30)
        assert isinstance(broken.value.__cause__, ValueError)
        assert refusal(S, cluster[1]) in str(broken.value.__cause__)
    finally:
        ex.shutdown()
    del S, ex, broken
    gc.collect()
    assert wait_until(lambda: forgotten(before, cluster), 10), table_sizes(cluster)


def first_plus(S, g):
    return float(S[0]) + g()


def test_a_message_pickled_twice_counts_each_array_once(cluster):
    # pickle fails at the lambda after counting S, cloudpickle pickles S again: the worker
    # gets one handle, so one count, and the array is freed once dropped.
    before = table_sizes(cluster)
    S = pd.SharedArray(10, pids=[cluster[0]])
    assert pd.remotecall_fetch(first_plus, cluster[0], S, lambda: 1.0) == 1.0
    del S
    gc.collect()
    assert wait_until(lambda: forgotten(before, cluster), 10), table_sizes(cluster)


def test_copy_of_and_the_helpers(cluster):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    S = pd.SharedArray.copy_of(a)
    assert isinstance(S, pd.SharedArray) and S.dtype == np.float32
    assert pd.remotecall_fetch(lambda x: x.tolist(), cluster[0], S) == a.tolist()
    assert pd.shared_ones((2, 2), np.uint8).sum() == 4
    assert not pd.shared_zeros(5).any()
    with pytest.raises(ValueError, match="shape must be"):
        pd.SharedArray((2, -1))
    with pytest.raises(TypeError, match="Python objects"):
        pd.SharedArray(3, object)


def test_dropped_everywhere_it_is_forgotten_everywhere(cluster, leak_oracle):
    S = pd.SharedArray((100,), init=fill_with_id)
    pd.remotecall_fetch(keep, cluster[0], S)
    before = table_sizes(cluster)
    del S
    gc.collect()
    assert table_sizes(cluster) == before     # a worker still holds it: nothing forgotten
    assert pd.remotecall_fetch(drop, cluster[0])
    assert wait_until(lambda: table_sizes(cluster) == [b - 1 for b in before], 10), \
        table_sizes(cluster)


def test_a_dying_worker_neither_frees_nor_spoils_it(fresh):
    a, b = fresh(2)
    S = pd.SharedArray((2, 1000), np.int64, init=fill_with_id, pids=[a, b])
    os.kill(pd.remotecall_fetch(os.getpid, a), signal.SIGKILL)
    assert wait_until(lambda: a not in pd.workers(), 10)
    assert pd.remotecall_fetch(lambda s: int(s.sum()), b, S) == 1000 * (a + b)
    pd.remotecall_fetch(fill_with_id, b, S)
    assert int(S[:, 500:].sum()) == 1000 * b
    del S
    gc.collect()
    assert wait_until(lambda: table_sizes([b]) == [0, 0], 10)


def test_hostile_names_owners_sizes_and_views_are_refused(cluster):
    ask = lambda *args: pd.remotecall_fetch(sharedmap.attach_here, cluster[0], *args)  # noqa: E731
    rrid = pd.RRID(1, 10**9)
    with pytest.raises(Exception, match="not a pydist object name"):
        ask("/etc-passwd", 8, 1, rrid, (cluster[0],))
    with pytest.raises(Exception, match="is gone"):
        ask(seg.new_name(), 8, 1, rrid, (cluster[0],))
    theirs = seg.Segment.create(1 << 16, [])
    try:
        with pytest.raises(Exception, match="promised"):          # a size that lies
            ask(theirs.name, 1 << 20, 1, rrid, (cluster[0],))
        os.chown("/dev/shm/" + theirs.name.lstrip("/"), 65534, 65534)
        with pytest.raises(Exception, match="owned by uid 65534"):
            ask(theirs.name, 1 << 16, 1, rrid, (cluster[0],))
    finally:
        theirs.unlink()
        theirs.close()
    assert pd.remotecall_fetch(sharedmap.table_size, cluster[0]) == 0
    S = pd.SharedArray(16, np.uint8)
    from pydist.arrays.sharedarray import _rebuild
    ref = S._ref.mapping
    with pytest.raises(ValueError, match="reaches outside|does not fit"):
        _rebuild(ref.name, 1, ref.rrid, ref.pids, 8, (16,), (1,), "|u1")
    with pytest.raises(ValueError, match="not mapped on process 1|no longer mapped"):
        _rebuild(seg.new_name(), 1, ref.rrid, ref.pids, 0, (1,), (1,), "|u1")
    assert isinstance(_rebuild(ref.name, 1, ref.rrid, ref.pids, 8, (8,), (1,), "|u1"),
                      pd.SharedArray)
    with pytest.raises(SegmentError):
        sharedmap.attach_here(seg.new_name(), 8, 1, rrid, (1,))


def test_larger_than_dev_shm_is_an_oserror_at_creation(cluster, leak_oracle):
    st = os.statvfs("/dev/shm")
    too_big = st.f_blocks * st.f_frsize + (1 << 30)
    with pytest.raises(OSError, match="cannot reserve"):
        pd.SharedArray(too_big, np.uint8)


def test_many_created_and_dropped_leave_memory_and_dev_shm_as_they_were(cluster, leak_oracle):
    rss = psutil.Process().memory_info().rss
    for i in range(2000):
        S = pd.SharedArray(256, init=fill_with_id if i % 100 == 0 else None)
        S[0] = i
    del S
    gc.collect()
    assert wait_until(lambda: table_sizes(cluster) == [0, 0, 0], 10), table_sizes(cluster)
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 20 << 20, f"the owner's RSS grew by {grown >> 20} MiB"


MASTER = textwrap.dedent("""
    import os, sys, numpy as np, pydist as pd
    w = pd.addprocs(2, transport=sys.argv[1])
    S = pd.SharedArray((1 << 20,), init=lambda S: S.__setitem__(pd.localindices(S), 1))
    T = pd.SharedArray.copy_of(np.arange(10))
    pd.remotecall_fetch(lambda s, t: sys.modules["__main__"].__dict__.update(s=s, t=t), w[0], S, T)
    print(*[pd.remotecall_fetch(os.getpid, p) for p in w], flush=True)
    sys.stdin.read()
""")


def test_kill_9_of_everyone_leaves_nothing_in_dev_shm(transport, leak_oracle):
    before = shm_entries()
    master = subprocess.Popen([sys.executable, "-c", MASTER, transport], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=subprocess_env(), text=True)
    try:
        line = master.stdout.readline()
        assert line, "the master script failed"
        pids = [master.pid, *map(int, line.split())]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):   # a worker may be gone with its master
                os.kill(pid, signal.SIGKILL)
    finally:
        master.kill()
        master.wait(30)
        master.stdin.close()
        master.stdout.close()
    assert wait_until(lambda: not any(psutil.pid_exists(p) and
                                      psutil.Process(p).status() != "zombie" for p in pids[1:]),
                      10)
    assert shm_entries() <= before


def fail_on_second_worker(S):
    if pd.indexpids(S) == 1:
        raise RuntimeError("this share cannot be filled")
    S[..., pd.localindices(S)] = 1


def test_a_failing_init_is_raised_and_the_array_forgotten(cluster, leak_oracle):
    with pytest.raises(pd.RemoteException, match="this share cannot be filled"):
        pd.SharedArray((2, 10), init=fail_on_second_worker)
    gc.collect()
    assert wait_until(lambda: table_sizes(cluster) == [0, 0, 0], 10), table_sizes(cluster)
