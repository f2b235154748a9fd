"""One ``srun`` of ``SlurmManager``: its process, its output, its job's state, and its end.

``srun`` runs every worker of one ``addprocs`` as the tasks of one job step. Its standard
input carries the cookie to every task (srun broadcasts it) and then stays open as their
lifeline; its output (``--label``: each line prefixed with the task number) is relayed to
the master's, prefixed with the worker's id. A line of srun's own saying the job waits
for resources is shown, with the reason ``squeue`` gives.

srun runs under a small guard (``_GUARD``, a bare interpreter) that holds one end of a
pipe whose other end only the master holds: when the master dies, even by SIGKILL and even
while the job still pends (srun reads nothing then), the guard reads end-of-file and
SIGTERMs srun, which withdraws the request or cancels the step. The guard passes srun's
exit status on, and forwards SIGTERM, SIGINT and SIGHUP to it.

The end, as a ladder with deadlines (when the last worker of the step is gone, or the
launch failed): close srun's input (the lifeline: the tasks exit and srun with them), then
SIGTERM srun (it cancels the step, and the job it made), then ``scancel`` the job (if srun
made it) or the step, then SIGKILL srun.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import TextIO

__all__ = ["SrunJob", "slurm_query", "HOPELESS_REASONS"]

# Pending reasons that no wait resolves: the request is wrong for this cluster.
HOPELESS_REASONS = ("BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit",
                    "PartitionConfig", "InvalidAccount", "InvalidQOS", "AccountNotAllowed",
                    "QOSNotAllowed", "JobHeldAdmin", "DependencyNeverSatisfied")
_QUEUED = re.compile(r"job (\d+) (queued|has been allocated)")
_LABEL = re.compile(r"^\s*(\d+): ?(.*)$", re.S)
_GUARD = """\
import os, signal, subprocess, sys, threading
child = subprocess.Popen(sys.argv[2:])
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, lambda sig, frame: child.send_signal(sig))
def watch(fd=int(sys.argv[1])):
    while os.read(fd, 64):
        pass
    child.terminate()
threading.Thread(target=watch, daemon=True).start()
code = child.wait()
sys.exit(code if code >= 0 else 128 - code)
"""
_TASK_FAILED = re.compile(r"srun: error: (\S+): tasks? ([\d,-]+): (.*)")


def slurm_query(argv: list[str], timeout: float = 20.0) -> tuple[int, str]:
    """Run a Slurm command; (exit status, its output); -1 if it cannot run or times out."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, f"{argv[0]}: {e}"
    return done.returncode, done.stdout.strip()


class SrunJob:
    """One running ``srun`` and what is known of its job (ids fill in as workers arrive)."""

    def __init__(self, argv: list[str], env: dict[str, str], cookie: str, inside: bool,
                 worker_id: Callable[[SrunJob, int], object]) -> None:
        self.argv = argv
        self.inside = inside              # a step of an existing allocation (not our job)
        self.job_id: str | None = None
        self.step_id: str | None = None
        self.pending_shown = ""
        self.failed: list[tuple[str, set[int], str]] = []   # (node, tasks, what srun said)
        self._worker_id = worker_id       # (job, task number) -> worker id (or "?")
        self._log: deque[str] = deque(maxlen=40)
        self._lock = threading.Lock()
        self._ended = False
        self._ending = threading.Lock()   # held through the ladder: a second finish waits
        guard, self._lifeline = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _GUARD, str(guard), *argv], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, pass_fds=(guard,))
        except OSError:
            os.close(self._lifeline)
            raise
        finally:
            os.close(guard)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((cookie + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            pass   # srun already ended: its output says why
        self.output_done = threading.Event()
        threading.Thread(target=self._relay, name="pydist-srun-output", daemon=True).start()

    def __repr__(self) -> str:
        return f"<srun job {self.job_id or '?'} pid {self.proc.pid}>"

    # -- output ---------------------------------------------------------------------
    def _relay(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in iter(self.proc.stdout.readline, b""):
                self._line(raw.decode(errors="replace"))
        finally:
            self.output_done.set()

    def _line(self, line: str) -> None:
        labelled = _LABEL.match(line)
        if labelled is not None:
            who = self._worker_id(self, int(labelled.group(1)))
            _write(sys.stdout, f"      From worker {who}:\t{labelled.group(2)}")
            return
        with self._lock:
            self._log.append(line)
        failed = _TASK_FAILED.search(line)
        if failed is not None:
            self.failed.append((failed.group(1), _task_set(failed.group(2)),
                                failed.group(3).strip()))
        queued = _QUEUED.search(line)
        if queued is not None:
            self.job_id = self.job_id or queued.group(1)
            if queued.group(2) == "queued":
                self.show_pending()

    def output(self) -> str:
        """srun's own recent lines (not the workers')."""
        with self._lock:
            return "".join(self._log).strip()

    # -- the job's state ----------------------------------------------------------------
    def state(self) -> tuple[str, str]:
        """(state, reason) of the job from ``squeue``; ("", "") if it is not listed."""
        if self.job_id is None:
            return "", ""
        code, out = slurm_query(["squeue", "-h", "-j", self.job_id, "-o", "%T|%r"])
        if code != 0 or "|" not in out:
            return "", ""
        state, _, reason = out.splitlines()[0].partition("|")
        return state.strip(), reason.strip()

    def show_pending(self) -> None:
        """Say (once per reason) that the job waits, and why."""
        state, reason = self.state()
        shown = f"{state} {reason}"
        if state and shown != self.pending_shown:
            self.pending_shown = shown
            _write(sys.stderr, f"pydist: Slurm job {self.job_id} is {state.lower()} "
                               f"({reason or 'no reason given'}); waiting for it\n")

    def report(self) -> str:
        """What Slurm says of the job, for an error message: srun, squeue and sacct."""
        parts = [f"srun said: {self.output() or '(nothing)'}"]
        if self.job_id is not None:
            code, out = slurm_query(["squeue", "-j", self.job_id, "-o", "%i %T %r %N"])
            parts.append(f"squeue: {out or '(job not listed)'}")
            code, out = slurm_query(["sacct", "-n", "-P", "-j", self.job_id,
                                     "-o", "JobID,State,ExitCode,Reason"])
            if code == 0 and out:
                parts.append(f"sacct: {out}")
        return "; ".join(parts)

    # -- the end ------------------------------------------------------------------------
    def ended(self) -> bool:
        return self.proc.poll() is not None

    def finish(self, grace: float = 5.0) -> None:
        """End srun and its job: the ladder of the module doc. Idempotent."""
        with self._ending:
            if not self._ended:
                self._ended = True
                self._end(grace)

    def _end(self, grace: float) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        if self._wait(grace):
            return self._reap()
        for step in (self._terminate, self._scancel, self.proc.kill):
            try:
                step()
            except OSError:
                pass
            if self._wait(3.0):
                break
        self._reap()

    def _terminate(self) -> None:
        self.proc.send_signal(15)

    def _scancel(self) -> None:
        if self.job_id is None:
            return
        target = self.job_id if not self.inside or self.step_id is None \
            else f"{self.job_id}.{self.step_id}"
        slurm_query(["scancel", target])

    def _wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _reap(self) -> None:
        lifeline, self._lifeline = self._lifeline, -1
        if lifeline >= 0:
            os.close(lifeline)
        self.output_done.wait(5.0)
        if self.proc.stdout is not None:
            try:
                self.proc.stdout.close()
            except OSError:
                pass


def _task_set(text: str) -> set[int]:
    """``"0-2,5"`` -> {0, 1, 2, 5}."""
    tasks: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        if first.isdigit():
            tasks.update(range(int(first), int(last if last.isdigit() else first) + 1))
    return tasks


def _write(stream: TextIO, text: str) -> None:
    try:
        stream.write(text if text.endswith("\n") else text + "\n")
        stream.flush()
    except (ValueError, OSError):
        pass
