"""``SlurmManager`` on a real Slurm cluster: munged, slurmctld and two slurmd nodes in network
namespaces of their own (``slurmlab.py``). The pydist master runs on the lab's login node,
as a program of its own (a master inside ``salloc``, or one that is SIGKILLed, must be a
process of its own anyway); it prints one JSON line that the test reads."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import textwrap
import threading
import time

import pytest
from slurmlab import SlurmLab

import pydist as pd

HEADER = """\
import json, os, socket, subprocess, sys, time
import pydist as pd
from pydist.cluster.group import PGRP
def report(**kw):
    print("RESULT " + json.dumps(kw), flush=True)
def squeue():
    return subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout.split("\\n")[0:-1]
"""


@pytest.fixture(scope="module")
def lab():
    ok, reason = SlurmLab.available()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests: {reason}")
        pytest.skip(reason)
    with SlurmLab() as lab:
        print(f"Slurm lab up in {lab.bringup_seconds:.2f} s")
        yield lab


@pytest.fixture
def slurm(lab, tmp_path):
    """Run a master program on the lab's login node; every job cancelled afterwards."""
    def run(body: str, *, prefix: tuple[str, ...] = (), timeout: float = 120.0) -> dict:
        script = tmp_path / "master.py"
        script.write_text(HEADER + textwrap.dedent(body))
        done = lab.client([*prefix, lab.python, str(script)], timeout=timeout, check=False)
        results = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        assert done.returncode == 0 and results, \
            f"master exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return {**json.loads(results[-1]), "stdout": done.stdout}
    yield run
    lab.cancel_all()


def test_inside_an_allocation_one_worker_per_task(slurm, transport):
    out = slurm(f"""
        t = time.monotonic()
        pids = pd.addprocs(pd.SlurmManager(), transport={transport!r})
        secs = time.monotonic() - t
        same = [p for p in pd.procs(pids[0]) if p not in (1, pids[0])][0]
        def peer_kind(q):   # a call from one worker to another, and the transport it used
            from pydist.cluster.group import PGRP as here
            pd.remotecall_fetch(pd.myid, q)
            return type(here.workers[q].transport).__module__
        configs = {{p: [PGRP.workers[p].config.job_id, PGRP.workers[p].config.step_id,
                       PGRP.workers[p].config.node] for p in pids}}
        report(pids=pids, secs=secs, env=os.environ["SLURM_JOB_ID"],
               hosts={{p: pd.remotecall_fetch(socket.gethostname, p) for p in pids}},
               groups={{p: pd.procs(p) for p in pids}}, configs=configs,
               far=pd.remotecall_fetch(lambda q: pd.remotecall_fetch(pd.myid, q), pids[0], pids[-1]),
               near=pd.remotecall_fetch(peer_kind, pids[0], same))
        pd.rmprocs(pids, waitfor=30)
        """, prefix=("salloc", "-N2", "-n4"))
    print(f"addprocs(SlurmManager()) of 4 workers in salloc -N2 -n4: {out['secs']:.2f} s")
    pids = out["pids"]
    assert len(pids) == 4
    hosts = [out["hosts"][str(p)] for p in pids]
    assert sorted(hosts) == ["lab-a", "lab-a", "lab-b", "lab-b"]
    for p in pids:   # procs(pid) groups the workers of one node
        assert out["groups"][str(p)] == [q for q in pids if hosts[pids.index(q)] == out["hosts"][str(p)]]
        job, step, node = out["configs"][str(p)]
        assert (job, step, node) == (out["env"], "0", out["hosts"][str(p)])
    assert out["far"] == pids[-1]
    assert ("shm" if transport == "shm" else "tcp") in out["near"]


def test_from_outside_a_job_of_that_size_released_by_rmprocs(slurm):
    out = slurm("""
        m = pd.SlurmManager(nodes=2, ntasks_per_node=1)
        t = time.monotonic()
        pids = pd.addprocs(m)
        secs = time.monotonic() - t
        cookie = pd.cluster_cookie()
        def seen(c):   # where a worker could find the cookie: its command line, its environment
            cmdline = open("/proc/self/cmdline", "rb").read().decode()
            return c in cmdline or any(c in v for v in os.environ.values())
        leaked = [pd.remotecall_fetch(seen, p, cookie) for p in pids]
        hosts = sorted(pd.remotecall_fetch(socket.gethostname, p) for p in pids)
        pd.remotecall_fetch(print, pids[1], "a line from a task", flush=True)
        during = squeue()
        t = time.monotonic()
        pd.rmprocs(pids, waitfor=30)
        while squeue() and time.monotonic() - t < 10:
            time.sleep(0.05)
        report(pids=pids, secs=secs, hosts=hosts, during=during, after=squeue(),
               released=time.monotonic() - t, leaked=leaked, workers=pd.workers())
        """)
    print(f"addprocs(SlurmManager(nodes=2, ntasks_per_node=1)): {out['secs']:.2f} s; "
          f"squeue empty {out['released']:.2f} s after rmprocs began")
    assert len(out["pids"]) == 2 and out["hosts"] == ["lab-a", "lab-b"]
    assert len(out["during"]) == 1 and "RUNNING" in out["during"][0]
    assert out["after"] == [] and out["released"] < 10
    assert out["leaked"] == [False, False]
    assert f"From worker {out['pids'][1]}:\ta line from a task" in out["stdout"]
    assert out["workers"] == [1]


def test_scancel_during_a_call_raises_process_exited(slurm):
    out = slurm("""
        t = time.monotonic()
        pids = pd.addprocs(pd.SlurmManager(nodes=2, ntasks_per_node=2))
        secs = time.monotonic() - t
        job = PGRP.workers[pids[0]].config.job_id
        calls = [pd.remotecall(time.sleep, p, 120) for p in pids]
        time.sleep(0.5)
        t = time.monotonic()
        subprocess.run(["scancel", job], check=True)
        errors = []
        for f in calls:
            try:
                f.wait(timeout=30)
                errors.append("returned")
            except pd.ProcessExitedException as e:
                errors.append(type(e).__name__)
        took = time.monotonic() - t
        while squeue() and time.monotonic() - t < 20:
            time.sleep(0.05)
        report(secs=secs, took=took, errors=errors, workers=pd.workers(), after=squeue())
        """)
    print(f"addprocs(SlurmManager(nodes=2, ntasks_per_node=2)): {out['secs']:.2f} s; "
          f"scancel -> ProcessExitedException in {out['took']:.2f} s")
    assert out["errors"] == ["ProcessExitedException"] * 4
    assert out["took"] < 10
    assert out["workers"] == [1] and out["after"] == []


def test_master_sigkill_leaves_no_job(lab, tmp_path):
    script = tmp_path / "master.py"
    script.write_text(HEADER + textwrap.dedent("""
        pids = pd.addprocs(pd.SlurmManager(nodes=2, ntasks_per_node=1))
        report(pids=pids, jobs=squeue())
        time.sleep(600)
        """))
    master = lab.popen([lab.python, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = master.stdout.readline()
        assert line.startswith("RESULT "), line
        assert len(lab.jobs()) == 1
        master.send_signal(signal.SIGKILL)
        master.wait(10)
        t = time.monotonic()
        while lab.jobs() and time.monotonic() - t < 60:
            time.sleep(0.2)
        print(f"master SIGKILL -> no job left after {time.monotonic() - t:.2f} s")
        assert lab.jobs() == []
        assert _workers_in(lab) == []
    finally:
        if master.poll() is None:
            master.kill()
            master.wait(10)
        lab.cancel_all()


def test_a_master_that_stops_answering_loses_its_job_within_the_lease(lab, tmp_path):
    script = tmp_path / "master.py"
    script.write_text(HEADER + textwrap.dedent("""
        pids = pd.addprocs(pd.SlurmManager(nodes=2, ntasks_per_node=1, lease=3))
        report(pids=pids)
        time.sleep(600)
        """))
    master = lab.popen([lab.python, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert master.stdout.readline().startswith("RESULT ")
        master.send_signal(signal.SIGSTOP)   # its connections stay open; only the lease tells
        t = time.monotonic()
        while lab.jobs() and time.monotonic() - t < 30:
            time.sleep(0.2)
        print(f"master stopped -> no job left after {time.monotonic() - t:.2f} s (lease 3 s)")
        assert lab.jobs() == []
        assert _workers_in(lab) == []
    finally:
        master.kill()
        master.send_signal(signal.SIGCONT)
        master.wait(10)
        lab.cancel_all()


def test_master_sigkill_while_its_job_pends_withdraws_the_job(lab, tmp_path):
    blocker = lab.client(["sbatch", "--parsable", "-N2", "--exclusive", "--output=/dev/null",
                          "--wrap", "sleep 300"]).stdout.strip()
    script = tmp_path / "master.py"
    script.write_text(HEADER + "pd.addprocs(pd.SlurmManager(nodes=1))\n")
    master = lab.popen([lab.python, str(script)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    try:
        t = time.monotonic()
        while len(lab.jobs()) < 2:   # the blocker, and the master's job, pending
            assert time.monotonic() - t < 30 and master.poll() is None, lab.jobs()
            time.sleep(0.1)
        mine = [j for j in lab.jobs() if not j.startswith(f"{blocker} ")]
        assert len(mine) == 1 and "PENDING" in mine[0], mine
        master.send_signal(signal.SIGKILL)
        master.wait(10)
        t = time.monotonic()
        while any(not j.startswith(f"{blocker} ") for j in lab.jobs()) and time.monotonic() - t < 60:
            time.sleep(0.2)
        print(f"master SIGKILL while pending -> its job withdrawn after {time.monotonic() - t:.2f} s")
        assert [j.split()[0] for j in lab.jobs()] == [blocker]
    finally:
        if master.poll() is None:
            master.kill()
            master.wait(10)
        lab.cancel_all()


def _workers_in(lab: SlurmLab) -> list[str]:
    """pydist workers still running on the lab's nodes (waits up to 10 s for them to go)."""
    t = time.monotonic()
    while True:
        left = [cmd for pid in _pids_in_nodes(lab) if "pydist.worker" in (cmd := _cmdline(pid))]
        if not left or time.monotonic() - t > 10:
            return left
        time.sleep(0.1)


def _pids_in_nodes(lab: SlurmLab) -> list[int]:
    from slurmlab import _processes_in_netns
    return [p for _, _, ns in lab.nodes for p in _processes_in_netns(ns)]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_an_sbatch_script_whose_program_is_the_master(lab, tmp_path):
    script = tmp_path / "master.py"
    script.write_text(HEADER + textwrap.dedent("""
        pids = pd.addprocs(pd.SlurmManager())
        report(pids=pids, master=socket.gethostname(), job=os.environ["SLURM_JOB_ID"],
               hosts=sorted(pd.remotecall_fetch(socket.gethostname, p) for p in pids))
        pd.rmprocs(pids, waitfor=30)
        """))
    out = tmp_path / "job.out"
    batch = tmp_path / "job.sh"
    batch.write_text(f"#!/bin/sh\n#SBATCH --nodes=2 --ntasks-per-node=1\n"
                     f"exec {lab.python} {script}\n")
    done = lab.client(["sbatch", "--parsable", "-W", f"--output={out}", str(batch)],
                      timeout=120, check=False)
    text = out.read_text() if out.exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + text
    result = json.loads([x for x in text.splitlines() if x.startswith("RESULT ")][0][7:])
    assert result["job"] == done.stdout.strip()
    assert result["master"] == "lab-a" and result["hosts"] == ["lab-a", "lab-b"]
    assert lab.jobs() == []


def test_a_node_whose_worker_cannot_start_is_named(slurm, lab, tmp_path):
    wrapper = tmp_path / "python-but-not-on-b"
    wrapper.write_text(f'#!/bin/sh\n[ "$(hostname)" = lab-b ] && exit 3\nexec {lab.python} "$@"\n')
    wrapper.chmod(0o755)
    out = slurm(f"""
        t = time.monotonic()
        try:
            pd.addprocs(pd.SlurmManager(nodes=2, ntasks_per_node=1), exename={str(wrapper)!r})
            msg = "no error"
        except pd.LaunchError as e:
            msg = str(e)
        t2 = time.monotonic()
        while squeue() and time.monotonic() - t2 < 10:
            time.sleep(0.05)
        report(msg=msg, secs=t2 - t, workers=pd.workers(), jobs=squeue())
        """)
    assert "workers failed to start on lab-b (Exited with exit code 3)" in out["msg"], out["msg"]
    assert "workers joined" in out["msg"] and "task 1: Exited with exit code 3" in out["msg"]
    assert out["secs"] < 30
    assert out["workers"] == [1] and out["jobs"] == []


def test_a_job_that_cannot_run_is_a_launch_error(slurm):
    out = slurm("""
        t = time.monotonic()
        try:
            pd.addprocs(pd.SlurmManager(nodes=5))
            msg = "no error"
        except pd.LaunchError as e:
            msg = str(e)
        report(msg=msg, secs=time.monotonic() - t, workers=pd.workers(), jobs=squeue())
        """)
    assert "the job cannot run (PartitionConfig)" in out["msg"], out["msg"]
    assert "srun said: srun: Requested partition configuration not available" in out["msg"]
    assert "squeue:" in out["msg"]
    assert out["workers"] == [1] and out["jobs"] == []


def test_a_pending_job_is_shown_then_joins(lab, slurm, tmp_path):
    blocker = lab.client(["sbatch", "--parsable", "-N2", "--exclusive", "--output=/dev/null",
                          "--wrap", "sleep 300"])
    job = blocker.stdout.strip()
    t = time.monotonic()
    while not any(j.startswith(f"{job} RUNNING") for j in lab.jobs()):   # it holds both nodes
        assert time.monotonic() - t < 30, lab.jobs()
        time.sleep(0.1)
    script = tmp_path / "pending.py"
    script.write_text(HEADER + textwrap.dedent("""
        pids = pd.addprocs(pd.SlurmManager(nodes=1))
        report(pids=pids, host=pd.remotecall_fetch(socket.gethostname, pids[0]))
        pd.rmprocs(pids, waitfor=30)
        """))
    master = lab.popen([lab.python, str(script)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    lines: queue.SimpleQueue = queue.SimpleQueue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in master.stderr], daemon=True)
    reader.start()
    try:
        seen = []
        while not any("is pending (" in x for x in seen):
            seen.append(lines.get(timeout=30))   # Empty: no word of the pending job in 30 s
        assert f"Slurm job {int(job) + 1} is pending (Resources)" in seen[-1], seen
        lab.client(["scancel", job])
        out = master.communicate(timeout=60)[0]
        reader.join(10)
        assert master.returncode == 0, seen
        result = json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][0][7:])
        assert len(result["pids"]) == 1 and result["host"] in ("lab-a", "lab-b")
    finally:
        if master.poll() is None:
            master.kill()
            master.wait(10)


def test_bad_options_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="input"):
        pd.SlurmManager(input="none")
    with pytest.raises(ValueError, match="srun option name"):
        pd.SlurmManager(**{"ntasks-per-node": 2})
    with pytest.raises(ValueError, match="nodes="):
        pd.SlurmManager(nodes="2\n--uid=0")
    with pytest.raises(ValueError, match="master"):
        pd.SlurmManager(master="")
    with pytest.raises(ValueError, match="unspecified"):
        pd.SlurmManager(master="0.0.0.0:9000")


def test_no_allocation_and_no_size_is_a_launch_error(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(pd.LaunchError, match="not inside a Slurm allocation"):
        pd.addprocs(pd.SlurmManager())
    assert pd.workers() == [1]

