"""Julia's call shapes beside the Pythonic ones."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from testkit import subprocess_env, wait_until

import pydist as pd


def test_remote_with_the_pool_first(cluster):
    pool = pd.WorkerPool(cluster)
    f = pd.remote(pool, pd.myid)
    assert f() in cluster


def test_pmap_with_the_pool_between(cluster):
    pool = pd.WorkerPool(cluster[:1])
    assert pd.pmap(lambda x: (x * 2, pd.myid()), pool, [1, 2, 3]) == [(2, cluster[0]), (4, cluster[0]),
                                                                      (6, cluster[0])]
    assert pd.pmap(lambda x, y: x + y, pool, [1, 2], [10, 20]) == [11, 22]


def test_remotecall_eval(cluster):
    a, b = cluster
    assert pd.remotecall_eval([a, b], "pydist_eval_mark = __import__('pydist').myid() * 10") is None
    assert pd.remotecall_eval(a, "pydist_eval_mark") == a * 10
    assert pd.remotecall_eval(b, "pydist_eval_mark + 1") == b * 10 + 1
    with pytest.raises(pd.RemoteException, match="ZeroDivisionError"):
        pd.remotecall_eval([a], "1/0")
    with pytest.raises(TypeError, match="code"):
        pd.remotecall_eval(a, lambda: 1)
    with pytest.raises(TypeError, match="procs"):
        pd.remotecall_eval(["2"], "1")


def test_worker_state(cluster):
    assert pd.worker_state(cluster[0]) == pd.WorkerState.W_CONNECTED == "connected"
    assert [s.name for s in pd.WorkerState] == ["W_CREATED", "W_CONNECTED", "W_TERMINATING",
                                               "W_TERMINATED"]
    with pytest.raises(TypeError, match="pid"):
        pd.worker_state("2")


def test_rmprocs_waitfor_zero_returns_a_future(fresh):
    (p,) = fresh(1)
    ospid = pd.remotecall_fetch(os.getpid, p)
    done = pd.rmprocs(p, waitfor=0)
    assert isinstance(done, pd.Future)
    assert done.fetch(timeout=30) is None
    assert p not in pd.workers()
    assert pd.worker_state(p) == pd.WorkerState.W_TERMINATED
    assert wait_until(lambda: not os.path.exists(f"/proc/{ospid}") or
                      open(f"/proc/{ospid}/stat").read().split()[2] == "Z", 10)


@pytest.mark.parametrize("waitfor", ["1", -1, True])
def test_rmprocs_bad_waitfor(cluster, waitfor):
    with pytest.raises((TypeError, ValueError), match="waitfor"):
        pd.rmprocs(cluster[0], waitfor=waitfor)
    assert cluster[0] in pd.workers()


class HostPortManager(pd.ClusterManager):
    """A Julia-style manager: it starts a worker and tells only its host and port."""

    def launch(self, params, launched, launch_ntfy) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "pydist.worker", "--lifeline", "--transports", "tcp"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True)
        proc.stdin.write(f"{pd.cluster_cookie()}\n".encode())
        proc.stdin.flush()
        words = proc.stdout.readline().decode().split()
        url = next(w for w in words if w.startswith("tcp://"))
        host, _, port = url.removeprefix("tcp://").rpartition(":")
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        with launch_ntfy:
            launched.append(pd.WorkerConfig(process=proc, host=host, port=int(port)))
            launch_ntfy.notify_all()

    def kill(self, pid, config) -> None:
        super().kill(pid, config)
        config.process.stdin.close()
        config.process.wait(10)


def test_a_manager_that_gives_host_and_port(leak_oracle):
    (w,) = pd.addprocs(HostPortManager())
    try:
        assert pd.remotecall_fetch(pd.myid, w) == w
    finally:
        pd.rmprocs(w, waitfor=30)


def test_a_config_without_any_address_says_what_is_missing(leak_oracle):
    class Nowhere(pd.ClusterManager):
        def launch(self, params, launched, launch_ntfy):
            with launch_ntfy:
                launched.append(pd.WorkerConfig())
                launch_ntfy.notify_all()
    with pytest.raises(pd.LaunchError, match="host and port") as info:
        pd.addprocs(Nowhere())
    assert "transport=" not in str(info.value)
