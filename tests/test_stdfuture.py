"""pydist's futures as Python sees futures: ``concurrent.futures.wait``/``as_completed``
(mixed with standard futures) and ``await`` in asyncio, for the Julia API's ``Future`` and
the executor's futures, on both transports."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time

import pytest

import pydist as pd
from pydist.errors import RemoteException


def _sleep_then(seconds: float, value: object) -> object:
    time.sleep(seconds)
    return value


def _fail(msg: str) -> None:
    raise ValueError(msg)


def test_wait_and_as_completed_take_julia_futures(cluster):
    w1, w2 = cluster
    slow = pd.remotecall(_sleep_then, w1, 3.0, "slow")
    quick = pd.remotecall(_sleep_then, w2, 0.05, "quick")
    std: cf.Future = cf.Future()
    std.set_result("std")
    done, not_done = cf.wait([slow, quick, std], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert std in done and slow in not_done
    order = [f.result() for f in cf.as_completed([slow, quick, std], timeout=30)]
    assert sorted(order[:2]) == ["quick", "std"] and order[2] == "slow"
    done, not_done = cf.wait([slow, quick], timeout=30)
    assert done == {slow, quick} and not not_done


def test_wait_first_exception_on_julia_futures(cluster):
    w1, w2 = cluster
    slow = pd.remotecall(_sleep_then, w1, 5.0, None)
    bad = pd.remotecall(_fail, w2, "boom")
    done, not_done = cf.wait([slow, bad], timeout=30, return_when=cf.FIRST_EXCEPTION)
    assert done == {bad} and not_done == {slow}
    assert isinstance(bad.exception(), RemoteException)
    with pytest.raises(RemoteException, match="boom"):
        bad.result()
    slow.wait(30)


def test_local_future_and_done_callback(cluster):
    f = pd.Future()
    seen: list[object] = []
    f.add_done_callback(lambda fut: seen.append(fut.result()))
    assert not f.done() and not seen
    f.put(41)
    assert seen == [41] and f.done()
    assert [x.result() for x in cf.as_completed([f], timeout=5)] == [41]


def test_await_julia_future_and_executor_future(cluster):
    w1, _ = cluster

    async def main() -> list[object]:
        fut = pd.remotecall(_sleep_then, w1, 0.1, "julia")
        with pd.ProcessPoolExecutor(1) as ex:
            ef = ex.submit(_sleep_then, 0.1, "executor")
            values = await asyncio.wait_for(asyncio.gather(fut, ef), 60)
        bad = pd.remotecall(_fail, w1, "awaited")
        with pytest.raises(RemoteException, match="awaited"):
            await asyncio.wait_for(bad, 60)
        return values

    assert asyncio.run(main()) == ["julia", "executor"]


def test_executor_futures_with_wait_mixed(cluster):
    w1, _ = cluster
    with pd.ProcessPoolExecutor(1) as ex:
        ef = ex.submit(_sleep_then, 0.05, 1)
        jf = pd.remotecall(_sleep_then, w1, 0.05, 2)
        done, _ = cf.wait([ef, jf], timeout=60)
        assert done == {ef, jf}
        assert sorted(f.result() for f in cf.as_completed([ef, jf], timeout=60)) == [1, 2]
