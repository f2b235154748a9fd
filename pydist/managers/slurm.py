"""``SlurmManager``: workers as the tasks of a Slurm job step, dialing back to the master.

Two ways to use it (SlurmClusterManager.jl and ClusterManagers.jl's ``addprocs_slurm``)::

    # inside an allocation (salloc, sbatch): one worker per task of the allocation
    addprocs(SlurmManager())
    # from a login node: request a job of that size and wait for it
    addprocs(SlurmManager(nodes=2, ntasks_per_node=4, partition="debug", time="1:00:00"))

How one ``addprocs`` goes:

1. The master listens on the address that routes to the allocation's (or the partition's)
   first node, or on ``master=`` (``dialback.DialIn``).
2. One ``srun`` starts every worker: ``srun --label --input=all [options] python -m
   pydist.worker --connect HOST:PORT --lifeline --lease L``. Options are the keyword
   arguments, ``_`` becoming ``-`` (``ntasks_per_node=4`` -> ``--ntasks-per-node=4``; ``True``
   a bare flag). Outside an allocation srun requests the job; inside, it runs a step of it.
3. srun's standard input carries the cookie to every task (never argv or the environment)
   and stays open as their lifeline (``slurmjob.SrunJob``).
4. While the job pends, its state and reason are shown (once per change); a reason that
   no wait resolves, or srun ending first, is a ``LaunchError`` with srun's, squeue's and
   sacct's words.
5. Each task dials the master, proves the cookie, names its job, step, task and node, and
   joins; the launch is over when the step's every task has (``SLURM_NTASKS``).
6. A worker that ends (``rmprocs``, ``scancel``, the job's time limit) fails every waiter
   with ``ProcessExitedException`` (its connection ends; srun's end is watched too).
   When the last worker of a step is gone, srun is ended and with it the job it made.
7. The master's death ends the connections, srun's input and the heartbeats: every worker
   exits, srun with them, and the job ends; srun's guard (``slurmjob.py``) SIGTERMs it
   at once, which also withdraws a job that still pends.
"""
from __future__ import annotations

import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..cluster import lease as _lease
from ..cluster.group import PGRP, cluster_cookie
from ..cluster.peers import W_CONNECTED, WorkerConfig
from ..cluster.stopping import request_exit
from ..errors import LaunchError
from ..net.address import format_tcp_url, parse_tcp_url
from .base import ClusterManager
from .dialback import Arrival, DialIn, route_to
from .slurmjob import HOPELESS_REASONS, SrunJob, slurm_query

__all__ = ["SlurmManager", "SlurmWorkerConfig"]

RUNNING_TIMEOUT = 120.0   # seconds for every task to dial in once the job runs
_RESERVED = {"input": "pydist sends the cookie over it", "output": "pydist relays it",
             "error": "pydist relays it", "label": "pydist sets it", "pty": "pydist needs pipes",
             "chdir": "use addprocs(dir=...)"}
_OPTION = re.compile(r"[a-z][a-z0-9_]*\Z")


@dataclass
class SlurmWorkerConfig(WorkerConfig):
    """A ``WorkerConfig`` that knows its Slurm job, step, task and node."""

    job_id: str | None = None
    step_id: str | None = None
    task_id: int | None = None
    node: str | None = None


class SlurmManager(ClusterManager):
    """Starts workers as the tasks of one Slurm job step per ``addprocs`` (see the module doc).

    ``master``: ``"host"`` or ``"host:port"`` the workers dial (default: this host's address
    on the route to the cluster's nodes); ``lease``: seconds a worker lives without hearing
    from the master; ``launch_timeout``: seconds to wait for the whole launch (default: as
    long as the job pends); ``srun``: the srun command; anything else is an srun option.
    """

    def __init__(self, *, master: str | None = None, lease: float = _lease.DEFAULT_LEASE,
                 launch_timeout: float | None = None, srun: str = "srun",
                 **options: Any) -> None:
        self.options = {k: _check_option(k, v) for k, v in options.items()}
        self.master = _check_master(master)
        self.lease = _lease.check_lease(lease)
        if launch_timeout is not None and (isinstance(launch_timeout, bool) or
                                           not isinstance(launch_timeout, (int, float)) or
                                           launch_timeout <= 0):
            raise ValueError(f"SlurmManager: launch_timeout must be seconds > 0, not {launch_timeout!r}")
        self.launch_timeout = launch_timeout
        self.srun = srun
        self._lock = threading.Lock()
        self._arrivals: dict[int, Arrival] = {}       # id(config) -> its connection
        self._jobs: dict[int, SrunJob] = {}           # id(config) -> its srun
        self._live: dict[SrunJob, set[int]] = {}      # srun -> ids of its live workers
        self._tasks: dict[tuple[int, int], int] = {}  # (id(srun), task) -> worker id

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"SlurmManager({opts})"

    # -- launching --------------------------------------------------------------------
    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: Any) -> None:
        inside = bool(os.environ.get("SLURM_JOB_ID"))
        if not inside and not self.options:
            raise LaunchError("SlurmManager(): not inside a Slurm allocation (no SLURM_JOB_ID); "
                              "run it under salloc or sbatch, or give a size such as "
                              "SlurmManager(nodes=2, ntasks_per_node=1)")
        cookie = cluster_cookie()
        host, port = self._master_address(inside)
        arrivals: queue.SimpleQueue[Arrival] = queue.SimpleQueue()
        dialin = DialIn(host, port, cookie, arrivals.put, "Slurm")
        try:
            job = SrunJob(self._srun_argv(params, dialin.address), _environment(params), cookie,
                          inside, lambda j, task: self._tasks.get((id(j), task), "?"))
        except OSError as e:
            dialin.close()
            raise LaunchError(f"SlurmManager: cannot run {self.srun!r}: {e}") from e
        with self._lock:
            self._live[job] = set()
        try:
            self._collect(job, arrivals, params, launched, launch_ntfy)
        except BaseException:
            job.finish(0.0)   # no job is left behind by a failed launch
            raise
        finally:
            dialin.close()
        threading.Thread(target=self._watch, args=(job,), name="pydist-srun-watch",
                         daemon=True).start()

    def _collect(self, job: SrunJob, arrivals: queue.SimpleQueue[Arrival], params: dict[str, Any],
                 launched: list[WorkerConfig], ntfy: Any) -> None:
        """Announce each task as it dials in, until all have; else a LaunchError."""
        clock = _LaunchClock(time.monotonic())
        expected: int | None = None
        tasks: set[int | None] = set()
        while expected is None or len(tasks) < expected:
            try:
                arrival = arrivals.get(timeout=0.1)
            except queue.Empty:
                problem = self._problem(job, clock, arrivals, tasks)
                if problem:
                    raise LaunchError(self._failure(job, problem, expected, tasks)) from None
                continue
            config = self._config(job, arrival, params)
            expected = expected or int(arrival.info.get("SLURM_NTASKS", "1") or 1)
            clock.running = clock.running or time.monotonic()   # a task runs: the job does
            tasks.add(config.task_id)
            with ntfy:
                launched.append(config)
                ntfy.notify_all()

    def _problem(self, job: SrunJob, clock: _LaunchClock, arrivals: queue.SimpleQueue[Arrival],
                 tasks: set[int | None]) -> str:
        """Why the launch cannot go on ("" while it can); shows a pending job's state."""
        now = time.monotonic()
        lost = sorted({f"{node} ({what})" for node, failed, what in job.failed if failed - tasks})
        if lost:
            return f"workers failed to start on {', '.join(lost)}"
        if job.ended() and arrivals.empty():
            job.output_done.wait(2.0)
            return "srun ended"
        if self.launch_timeout is not None and now - clock.start > self.launch_timeout:
            return f"no launch within {self.launch_timeout:g} s"
        if now >= clock.next_look:
            clock.next_look = now + 2.0
            state, reason = job.state()
            if state == "PENDING":
                job.show_pending()
                if reason in HOPELESS_REASONS:
                    return f"the job cannot run ({reason})"
            elif state == "RUNNING":
                clock.running = clock.running or now
        if clock.running and now - clock.running > RUNNING_TIMEOUT:
            return f"the job ran {RUNNING_TIMEOUT:g} s and not every task dialed in"
        return ""

    def _failure(self, job: SrunJob, what: str, expected: int | None, tasks: set[int | None]) -> str:
        code = job.proc.poll()
        joined = f"{len(tasks)} {f'of {expected} ' if expected else ''}workers joined"
        if expected is not None and len(tasks) < expected:
            joined += f" (missing tasks {sorted(set(range(expected)) - tasks)})"
        status = f"; srun exit status {code}" if code is not None else ""
        name = f"Slurm job {job.job_id}" if job.job_id else "the Slurm job"
        return (f"SlurmManager: {name}: {what}; {joined}{status}; "
                f"{job.report()}")

    def _config(self, job: SrunJob, arrival: Arrival, params: dict[str, Any]) -> SlurmWorkerConfig:
        info = arrival.info
        job.job_id = job.job_id or info.get("SLURM_JOB_ID")
        job.step_id = job.step_id or info.get("SLURM_STEP_ID")
        task = int(info["SLURM_PROCID"]) if info.get("SLURM_PROCID", "").isdigit() else None
        config = SlurmWorkerConfig(
            exename=params["exename"], exeflags=tuple(params["exeflags"]),
            host=info.get("SLURMD_NODENAME") or info.get("host"), transport="tcp",
            addresses=arrival.addresses, environ=dict(params.get("env") or {}),
            ospid=int(info["pid"]) if info.get("pid", "").isdigit() else None,
            enable_threaded_blas=params["enable_threaded_blas"], userdata=dict(info),
            job_id=info.get("SLURM_JOB_ID"), step_id=info.get("SLURM_STEP_ID"),
            task_id=task, node=info.get("SLURMD_NODENAME") or info.get("host"))
        with self._lock:
            self._arrivals[id(config)] = arrival
            self._jobs[id(config)] = job
        return config

    def _srun_argv(self, params: dict[str, Any], address: str) -> list[str]:
        argv = [self.srun, "--label", "--input=all", "--kill-on-bad-exit=0",
                f"--chdir={params['dir']}"]
        if "job_name" not in self.options:
            argv.append("--job-name=pydist")
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            argv.append(flag if value is True else f"{flag}={value}")
        argv += [params["exename"], *params["exeflags"], "-m", "pydist.worker", "--connect",
                 address, "--lifeline", "--lease", f"{self.lease:g}"]
        if params.get("transport") == "tcp":
            argv += ["--transports", "tcp"]
        return argv

    def _master_address(self, inside: bool) -> tuple[str, int]:
        """``master=``, else this host's address on the route to the first node."""
        if self.master is not None:
            return self.master
        nodes = os.environ.get("SLURM_JOB_NODELIST", "") if inside else ""
        if not nodes:
            part = self.options.get("partition")
            code, nodes = slurm_query(["sinfo", "-h", "-o", "%N"] +
                                      ([f"--partition={part}"] if part else []))
            if code != 0 or not nodes:
                raise LaunchError(f"SlurmManager: cannot list the cluster's nodes to choose "
                                  f"the address workers dial ({nodes or 'sinfo said nothing'}); "
                                  f"give SlurmManager(master='ADDRESS')")
        code, names = slurm_query(["scontrol", "show", "hostnames", nodes.split()[0]])
        first = names.split()[0] if code == 0 and names else nodes.split(",")[0]
        code, shown = slurm_query(["scontrol", "show", "node", first, "-o"])
        found = re.search(r"NodeAddr=(\S+)", shown) if code == 0 else None
        try:
            return route_to(format_tcp_url(found.group(1) if found else first, 6818)), 0
        except (OSError, ValueError) as e:
            raise LaunchError(f"SlurmManager: no route from here to node {first} ({e}); "
                              f"give SlurmManager(master='ADDRESS')") from None

    # -- the cluster's callbacks ---------------------------------------------------------
    def connect(self, pid: int, config: WorkerConfig) -> Any:
        with self._lock:
            arrival = self._arrivals.pop(id(config), None)
        if arrival is None:
            raise LaunchError(f"worker {pid}: no connection from its Slurm task is waiting")
        return arrival.transport

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        with self._lock:
            job = self._jobs.get(id(config))
        if op == "register" and job is not None:
            with self._lock:
                self._live.setdefault(job, set()).add(pid)
                if isinstance(config, SlurmWorkerConfig) and config.task_id is not None:
                    self._tasks[(id(job), config.task_id)] = pid
            _lease.renew(pid, self.lease)
        elif op == "deregister" and job is not None:
            _lease.forget(pid)
            if self._drop(job, pid):
                threading.Thread(target=job.finish, name="pydist-srun-end", daemon=True).start()
        elif op == "finalize":
            with self._lock:
                self._jobs.pop(id(config), None)
        super().manage(pid, config, op)

    def _drop(self, job: SrunJob, pid: int) -> bool:
        """Forget worker ``pid`` of ``job``; whether it was the job's last."""
        with self._lock:
            live = self._live.get(job)
            if live is None:
                return False
            live.discard(pid)
            if live:
                return False
            del self._live[job]
            for key in [k for k in self._tasks if k[0] == id(job)]:
                del self._tasks[key]
            return True

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Ask the worker to exit; when it is its step's last, end srun (and its job) too,
        so that ``rmprocs`` returns with the allocation released."""
        _lease.forget(pid)
        request_exit(pid)
        with self._lock:
            job = self._jobs.get(id(config))
        w = PGRP.workers.get(pid)
        if w is not None:
            w.gone.wait(5.0)
        if job is not None:
            last = self._drop(job, pid)
            with self._lock:
                others = job in self._live
            if last or not others:
                job.finish()   # waits for a finish already under way

    def _watch(self, job: SrunJob) -> None:
        """When srun ends, every worker of its step is gone, whatever their connections say."""
        code = job.proc.wait()
        with self._lock:
            pids = sorted(self._live.get(job, ()))
        for pid in pids:
            w = PGRP.workers.get(pid)
            if w is not None and w.state == W_CONNECTED and not w.gone.wait(3.0):
                PGRP.worker_lost(w, f"ended with its Slurm job {job.job_id} (srun exit "
                                    f"status {code})")
        job.finish(0.0)


@dataclass
class _LaunchClock:
    """When a launch began, when its job was first seen running, and when to ask squeue."""

    start: float
    running: float = 0.0
    next_look: float = 0.0


def _check_option(key: str, value: Any) -> Any:
    if not _OPTION.match(key):
        raise ValueError(f"SlurmManager: {key!r} is not an srun option name (use its long "
                         f"name with '_' for '-', e.g. ntasks_per_node)")
    if key in _RESERVED:
        raise ValueError(f"SlurmManager: the srun option {key!r} is pydist's ({_RESERVED[key]})")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value
    if not isinstance(value, str) or not value or any(c in value for c in "\n\r\0"):
        raise ValueError(f"SlurmManager: {key}={value!r} is not a value srun can take")
    return value


def _check_master(master: str | None) -> tuple[str, int] | None:
    if master is None:
        return None
    if not isinstance(master, str) or not master:
        raise ValueError(f"SlurmManager: master must be 'host' or 'host:port', not {master!r}")
    address = parse_tcp_url(f"tcp://{master}", listen=True)
    if address.host in ("0.0.0.0", "::"):
        raise ValueError(f"SlurmManager: master={master!r}: name an address of this host "
                         f"that the nodes can reach, not the unspecified one")
    return address.host, address.port


def _environment(params: dict[str, Any]) -> dict[str, str]:
    """The job's environment: the master's, ``env``, and the path to this pydist."""
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (params.get("env") or {}).items()})
    home = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if home not in paths:
        env["PYTHONPATH"] = os.pathsep.join([*paths, home])
    if not params.get("enable_threaded_blas"):
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
    return env

