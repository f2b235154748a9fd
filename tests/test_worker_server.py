"""The worker server: local workers are forks of one single-threaded, preloaded process,
set up as a fresh interpreter would be; requests a fork cannot honour start one."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from testkit import shm_entries, subprocess_env, wait_until

import pydist as pd
from pydist.managers.forkclient import worker_server_pid

STEP = 30.0


def _describe() -> dict:
    import os
    import sys
    return {"ppid": os.getppid(), "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
            "cwd": os.getcwd(), "path": list(sys.path), "env": dict(os.environ),
            "argv": list(sys.argv), "modules": sorted(sys.modules)}


@contextlib.contextmanager
def _workers(n: int, transport: str, **kwargs):
    pids = pd.addprocs(n, transport=transport, **kwargs)
    try:
        yield pids
    finally:
        pd.rmprocs(*pids, waitfor=STEP)


def test_a_forked_worker_starts_as_a_fresh_interpreter_would(transport, leak_oracle, tmp_path):
    with _workers(1, transport, dir=str(tmp_path), env={"PYDIST_TEST_MARKER": "here"}) as pids:
        seen = pd.remotecall_fetch(_describe, pids[0])
    assert seen["ppid"] == worker_server_pid() is not None       # forked by the server
    assert seen["pgid"] == seen["sid"] == seen["pid"]            # a session of its own
    assert seen["cwd"] == str(tmp_path)
    # The master's path, as joined (its order can differ: entries the worker already had
    # keep their place, and test collection reorders the master's own).
    assert set(sys.path) <= set(seen["path"])
    assert seen["env"]["PYDIST_TEST_MARKER"] == "here"
    assert seen["argv"][0].endswith(os.path.join("pydist", "worker.py"))
    assert "--lifeline" in seen["argv"]
    cookie = pd.cluster_cookie()
    assert cookie not in repr(seen["env"]) and cookie not in repr(seen["argv"])


def test_preloaded_modules_are_imported_before_the_fork(transport, leak_oracle):
    module = "xml.dom.minidom"            # nothing of pydist or a worker imports it
    with _workers(1, transport, preload=[module]) as pids:
        seen = pd.remotecall_fetch(_describe, pids[0])
    assert seen["ppid"] == worker_server_pid()
    assert module in seen["modules"]


def test_standard_modules_of_the_master_are_there_in_a_forked_worker(transport, leak_oracle):
    import colorsys  # noqa: F401  (nothing of pydist or a worker imports these two)
    import webbrowser  # noqa: F401
    with _workers(1, transport) as pids:
        seen = pd.remotecall_fetch(_describe, pids[0])
    assert seen["ppid"] == worker_server_pid()
    assert "colorsys" in seen["modules"]       # as in a fork of the master
    assert "webbrowser" not in seen["modules"]  # never: it may start a program


@pytest.mark.parametrize("preload, error", [("json", TypeError), ([3], ValueError),
                                            (["not a module"], ValueError)])
def test_a_bad_preload_is_refused_before_anything_starts(preload, error, leak_oracle):
    before = pd.workers()
    with pytest.raises(error, match="preload"):
        pd.addprocs(1, preload=preload)
    with pytest.raises(error, match="preload"):
        pd.set_worker_preload(preload)
    assert pd.workers() == before


def test_interpreter_flags_start_a_fresh_interpreter(transport, leak_oracle):
    with _workers(1, transport, exeflags=["-X", "utf8"]) as pids:
        seen = pd.remotecall_fetch(_describe, pids[0])
    assert seen["ppid"] == os.getpid()                           # started by the master itself
    assert seen["pgid"] == seen["pid"]


def test_recycled_workers_are_forked_too(transport, leak_oracle):
    with pd.Executor(1, max_tasks_per_child=1, transport=transport) as ex:
        parents = {ex.submit(os.getppid).result(timeout=STEP) for _ in range(3)}
        pids = {ex.submit(os.getpid).result(timeout=STEP) for _ in range(3)}
    assert parents == {worker_server_pid()}
    assert len(pids) == 3


PROGRAM = textwrap.dedent("""
    import sys
    import pydist as pd
    import helper

    def probe():
        import helper
        from pydist.managers import codecache
        return helper.VALUE, helper.__file__ in codecache._compiled

    if __name__ == "__main__":
        [p] = pd.addprocs(1, transport=sys.argv[1])
        print(*pd.remotecall_fetch(probe, p), flush=True)
        with open(helper.__file__, "w") as f:
            f.write("VALUE = 'changed'\\n")
        [q] = pd.addprocs(1, transport=sys.argv[1])
        print(*pd.remotecall_fetch(probe, q), flush=True)
        pd.rmprocs(p, q, waitfor=30)
""")


def test_the_programs_own_modules_are_compiled_once_for_its_workers(transport, tmp_path,
                                                                     leak_oracle):
    """Without bytecode caches, the server compiles the modules of the program's directory
    the master imported, and a forked worker imports them with that code -- unless the
    file has changed since (then it compiles it, and sees the change)."""
    (tmp_path / "helper.py").write_text("VALUE = 'original'\n")
    (tmp_path / "prog.py").write_text(PROGRAM)
    env = dict(subprocess_env(), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, str(tmp_path / "prog.py"), transport], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=4 * STEP)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["original True", "changed True"]
    assert not (tmp_path / "__pycache__").exists()


MASTER = textwrap.dedent("""
    import os, sys, time
    import pydist as pd
    from pydist.managers.forkclient import worker_server_pid
    pids = pd.addprocs(2, transport=sys.argv[1])
    workers = [pd.remotecall_fetch(os.getpid, p) for p in pids]
    parents = {pd.remotecall_fetch(os.getppid, p) for p in pids}
    print(worker_server_pid(), *parents, *workers, flush=True)
    time.sleep(60)
""")


def test_forked_workers_and_their_server_die_with_the_master(transport, tmp_path, leak_oracle):
    script = tmp_path / "master.py"
    script.write_text(MASTER)
    shm_before = shm_entries()
    master = subprocess.Popen([sys.executable, str(script), transport], stdout=subprocess.PIPE,
                              text=True, start_new_session=True, env=subprocess_env())
    try:
        line = master.stdout.readline().split()
        assert line, "the master printed nothing"
        server, parent, *workers = (int(w) for w in line)
        assert parent == server and len(workers) == 2, f"not forked by the server: {line}"
        os.kill(master.pid, signal.SIGKILL)
        master.wait(STEP)
        gone = wait_until(lambda: not any(_alive(p) for p in (server, *workers)), 2.0, 0.005)
        assert gone, f"outlived their master: {[p for p in (server, *workers) if _alive(p)]}"
        assert wait_until(lambda: shm_entries() <= shm_before, 5), \
            f"/dev/shm left: {sorted(shm_entries() - shm_before)}"
    finally:
        if master.poll() is None:
            master.kill()
            master.wait(STEP)
        master.stdout.close()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_worker_killed_by_a_signal_says_so(transport, leak_oracle):
    pids = pd.addprocs(1, transport=transport)
    ospid = pd.remotecall_fetch(os.getpid, pids[0])
    os.kill(ospid, signal.SIGKILL)
    with pytest.raises(pd.ProcessExitedException, match="SIGKILL"):
        deadline = time.monotonic() + STEP
        while time.monotonic() < deadline:
            pd.remotecall_fetch(os.getpid, pids[0])
            time.sleep(0.01)
    assert pids[0] not in pd.workers()


def _draws() -> tuple:
    import random

    import numpy as np
    return random.random(), float(np.random.random())


def test_forked_workers_draw_different_random_numbers(transport, leak_oracle):
    with _workers(2, transport, preload=["numpy.random"]) as pids:
        draws = [pd.remotecall_fetch(_draws, p) for p in pids]
        parents = {pd.remotecall_fetch(os.getppid, p) for p in pids}
    assert parents == {worker_server_pid()}
    assert draws[0][0] != draws[1][0] and draws[0][1] != draws[1][1], draws


def test_the_server_ends_quietly_when_the_master_is_gone_before_its_reply(leak_oracle):
    # The master may exit while the server still has something to tell it (a fork's reply,
    # a child's exit): the server ends as when the socket closes, and prints nothing.
    import pickle
    import socket
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = subprocess.Popen([sys.executable, "-m", "pydist.processes.forkserver",
                               str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=subprocess_env(), text=True)
    theirs.close()
    try:
        ours.settimeout(STEP)
        assert pickle.loads(ours.recv(1 << 16))[0] == "ready"
        pipes = [os.pipe() for _ in range(3)]
        request = ("fork", os.getcwd(), dict(os.environ), ["--no-such-option"], [], [], [])
        socket.send_fds(ours, [pickle.dumps(request)], [pipes[0][0], pipes[1][1], pipes[2][1]])
        ours.close()                   # gone before the reply and before the child's exit
        _, err = server.communicate(timeout=STEP)
        assert (server.returncode, err) == (0, ""), err
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=STEP)
        for r, w in pipes:
            os.close(r)
            os.close(w)


LATER = textwrap.dedent("""
    import sys, time
    import pydist as pd
    from pydist.processes.forkserver import LATER_PRELOAD

    def modules():
        return sorted(sys.modules)

    def use():
        import pydist as pd                # a worker's own pmap, channel and cluster calls
        ch = pd.RemoteChannel()
        ch.put(3)
        return sum(pd.pmap(abs, [-1, -2])) + ch.take() + (1 in pd.procs())

    first = pd.addprocs(1, transport=sys.argv[1])
    print(pd.remotecall_fetch(use, first[0]), flush=True)
    deadline = time.monotonic() + 30
    while True:                            # once idle, the server imports the rest itself
        time.sleep(0.5)
        late = pd.addprocs(1, transport=sys.argv[1])
        missing = [m for m in LATER_PRELOAD if m not in pd.remotecall_fetch(modules, late[0])]
        pd.rmprocs(*late)
        if not missing or time.monotonic() > deadline:
            break
    print(missing, flush=True)
""")


def test_modules_the_server_imports_once_idle_serve_workers_forked_before_and_after(
        transport, tmp_path, leak_oracle):
    """The server says it is ready before it imports what only some calls need; a worker
    forked at once imports that on first use, and one forked later finds it imported."""
    script = tmp_path / "later.py"
    script.write_text(LATER)
    done = subprocess.run([sys.executable, str(script), transport], capture_output=True,
                          text=True, timeout=4 * STEP, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["7", "[]"], done.stdout + done.stderr
