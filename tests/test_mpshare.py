"""multiprocessing's objects handed to the drop-ins' local workers, in ``initargs`` and in
task arguments, as multiprocessing hands them to the processes it starts; and a failing
initializer logged on the worker as the standard library logs it. Both transports."""
from __future__ import annotations

import concurrent.futures as cf
import gc
import logging
import logging.handlers
import multiprocessing
from multiprocessing import resource_sharer, resource_tracker, shared_memory

import psutil
import pytest

import pydist as pd

_shared: dict[str, object] = {}


@pytest.fixture(autouse=True)
def sharer_stopped():
    """multiprocessing's resource sharer (a thread of this process) is stopped afterwards."""
    yield
    resource_sharer.stop(timeout=5)


@pytest.fixture(scope="module", autouse=True)
def tracker_stopped():
    """multiprocessing's resource tracker (a process the named semaphores start) too."""
    yield
    # The module's semaphores, dead but maybe in cycles, are unlinked by their finalizers
    # first: a stopped tracker unlinks every name still registered, and a finalizer that ran
    # later would find its name gone.
    gc.collect()
    resource_tracker._resource_tracker._stop()


def _init_shared(lock, counter) -> None:
    _shared["lock"], _shared["counter"] = lock, counter


def _count(i: int) -> int:
    lock, counter = _shared["lock"], _shared["counter"]
    for _ in range(50):
        with lock:                      # type: ignore[attr-defined]
            counter.value += 1          # type: ignore[attr-defined]
    return i


@pytest.mark.parametrize("ctx", ["default", "spawn"])
def test_classic_pool_initializer_counts_right(transport, ctx):
    """``Pool(initializer=init, initargs=(lock, counter))``: every increment counted, with
    the default context's objects (unnamed semaphores under fork) and spawn's."""
    mp = multiprocessing if ctx == "default" else multiprocessing.get_context("spawn")
    lock, counter = mp.Lock(), mp.Value("i", 0)
    with pd.Pool(2, initializer=_init_shared, initargs=(lock, counter), transport=transport) as p:
        assert sum(p.map(_count, range(20), chunksize=1)) == sum(range(20))
    assert counter.value == 20 * 50
    with lock:                          # the lock still works here afterwards
        counter.value += 1
    assert counter.value == 20 * 50 + 1


def _use_all(objs: dict, name: str) -> str:
    with objs["rlock"]:
        with objs["rlock"]:
            objs["array"][0] += 1
    objs["sem"].release()
    with objs["cond"]:
        objs["cond"].notify_all()
    objs["queue"].put("q")
    objs["simple"].put("s")
    objs["joinable"].put("j")
    shm = shared_memory.SharedMemory(name=name)
    shm.buf[0] = 42
    shm.close()
    objs["managed"].append("m")
    objs["event"].set()
    return "done"


def test_objects_in_task_arguments(transport):
    spawn = multiprocessing.get_context("spawn")
    manager = spawn.Manager()
    shm = shared_memory.SharedMemory(create=True, size=16)
    objs = {"rlock": multiprocessing.RLock(), "sem": multiprocessing.Semaphore(0),
            "event": multiprocessing.Event(), "cond": multiprocessing.Condition(),
            "array": multiprocessing.Array("i", 3), "queue": multiprocessing.Queue(),
            "simple": multiprocessing.SimpleQueue(), "joinable": multiprocessing.JoinableQueue(),
            "managed": manager.list()}
    try:
        with pd.ProcessPoolExecutor(1, transport=transport) as ex:
            assert ex.submit(_use_all, objs, shm.name).result(timeout=60) == "done"
        assert objs["event"].wait(10)
        assert objs["sem"].acquire(timeout=10)
        assert objs["array"][:] == [1, 0, 0]
        assert objs["queue"].get(timeout=10) == "q"
        assert objs["simple"].get() == "s"
        assert objs["joinable"].get(timeout=10) == "j"
        assert shm.buf[0] == 42
        assert list(objs["managed"]) == ["m"]
    finally:
        shm.close()
        shm.unlink()
        manager.shutdown()
        for q in (objs["queue"], objs["joinable"]):
            q.close()
            q.join_thread()
        objs["simple"].close()


def _touch(shm: shared_memory.SharedMemory) -> int:
    shm.buf[0] = 7
    return shm.size


def test_shared_memory_outlives_the_workers_that_attached_it(transport):
    """A worker given a SharedMemory shares the master's resource tracker (as a spawned
    child does), so its exit does not unlink the segment."""
    shm = shared_memory.SharedMemory(create=True, size=16)
    try:
        with pd.ProcessPoolExecutor(1, transport=transport) as ex:
            assert ex.submit(_touch, shm).result(timeout=60) >= 16
            # A tracker of the worker's own would be its child: wait for it to finish too.
            helpers = [c for p in ex._processes for c in psutil.Process(p).children()]
        psutil.wait_procs(helpers, timeout=30)
        again = shared_memory.SharedMemory(name=shm.name)    # still there
        assert again.buf[0] == 7
        again.close()
    finally:
        shm.close()
        shm.unlink()


def _init_fail(log_queue) -> None:
    logger = logging.getLogger("concurrent.futures")
    logger.addHandler(logging.handlers.QueueHandler(log_queue))
    logger.setLevel("CRITICAL")
    logger.propagate = False
    raise ValueError("error in initializer")


def _nothing() -> None:
    return None


def test_failing_initializer_is_logged_on_the_worker(transport):
    """Logged to ``concurrent.futures`` at CRITICAL with its traceback, and the executor
    breaks (what CPython's ``FailingInitializerMixin.test_initializer`` checks)."""
    log_queue = multiprocessing.get_context("spawn").Queue()
    try:
        ex = pd.ProcessPoolExecutor(2, initializer=_init_fail, initargs=(log_queue,),
                                    transport=transport)
        with pytest.raises(cf.BrokenExecutor):
            ex.submit(_nothing).result(timeout=60)
        with pytest.raises(cf.BrokenExecutor):
            ex.submit(_nothing)
        ex.shutdown(wait=True)
        record = log_queue.get(timeout=10)
        assert record.levelno == logging.CRITICAL and record.name == "concurrent.futures"
        message = record.getMessage()
        assert "Exception in initializer:" in message
        assert "Traceback" in message and "ValueError: error in initializer" in message
    finally:
        log_queue.close()
        log_queue.join_thread()


def test_unshareable_lock_says_what_to_do(transport):
    """A fork-made lock held at the time cannot be re-based: the task fails saying so."""
    lock = multiprocessing.Lock()
    with lock, pd.ProcessPoolExecutor(1, transport=transport) as ex:
        with pytest.raises(Exception, match="only while nobody holds it"):
            ex.submit(_init_shared, lock, None).result(timeout=60)
