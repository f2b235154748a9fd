"""The master killed with SIGKILL at a random point: while it starts workers, in the middle of
a map (``pmap``, ``Executor.map``, ``Pool.map``) and while it shuts its workers down.

However it dies, every worker process it started must exit within two seconds, and nothing
of pydist may stay in /dev/shm. The master is a small script in a process of its own; it
prints ``begin`` when the phase starts and ``end`` when it is over. The test waits for
``begin``, sleeps a delay drawn from a seeded ``random.Random`` (the seed is printed; set
``PYDIST_MASTER_DEATH_SEED`` to replay a run), freezes the master with SIGSTOP, lists its
children (a frozen process cannot start another), and kills it. A kill that came after
``end`` missed the phase: it is retried with a shorter delay.

A master killed while it hands a new connection's segment to a worker (the segment and its
semaphores exist under names, and the worker has not opened them yet) leaves nothing either:
the worker was told the names before they were made, and removes them
(``test_master_killed_while_handing_over_a_segment``).
"""
from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
from testkit import TRANSPORTS, shm_entries, subprocess_env, wait_until

EXIT_BOUND = 2.0  # seconds from the master's SIGKILL to the last worker gone
STEP = 30.0       # the bound on every other wait
SEED = int(os.environ.get("PYDIST_MASTER_DEATH_SEED") or random.SystemRandom().randrange(2**32))

MASTER = textwrap.dedent("""
    import faulthandler, os, signal, sys, time
    import pydist as pd

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks when it hangs

    transport, phase, names_path = sys.argv[1:4]
    N = 400_000  # map items: far more than fit in the kill delay

    if transport == "shm" and __name__ == "__main__":
        # Note every segment and semaphore name before it is created: the test checks them.
        from pydist.shm import segment
        names, fresh = open(names_path, "a", buffering=1), segment.new_name

        def noted():
            name = fresh()
            names.write(name + "\\n")
            return name
        segment.new_name = noted

    def say(*words):
        print(*words, flush=True)

    def show_workers():
        say("workers", *[pd.remotecall_fetch(os.getpid, p) for p in pd.workers() if p != 1])

    def work(x):  # a few microseconds
        return sum(range(32)) + x

    if __name__ != "__main__":
        pass  # a drop-in's worker runs this script as __mp_main__: the definitions only
    elif phase == "addprocs":
        say("begin")
        pd.addprocs(3, transport=transport)
        say("end")
    elif phase == "pmap":
        pd.addprocs(2, transport=transport)
        show_workers()
        say("begin")
        pd.pmap(work, range(N))
        say("end")
    elif phase == "executor_map":
        ex = pd.Executor(2, transport=transport)
        list(ex.map(work, range(64)))
        show_workers()
        say("begin")
        list(ex.map(work, range(N)))
        say("end")
    elif phase == "pool_map":
        pool = pd.Pool(2, transport=transport)
        pool.map(work, range(64))
        show_workers()
        say("begin")
        pool.map(work, range(N), chunksize=1)
        say("end")
    elif phase == "rmprocs":
        pids = pd.addprocs(3, transport=transport)
        show_workers()
        for p in pids:
            pd.remotecall(time.sleep, p, 60)  # each is busy in a call when asked to exit
        say("begin")
        pd.rmprocs(*pids)
        say("end")
    elif phase == "shutdown":
        ex = pd.Executor(2, transport=transport)
        tasks = [ex.submit(time.sleep, 0.05) for _ in range(40)]
        tasks[0].result()
        show_workers()
        say("begin")
        ex.shutdown(wait=True)
        say("end")
    elif phase == "handover":  # stops the master after it made a segment, before "ready"
        from pydist.shm import rendezvous
        made = rendezvous.new_segment

        def held(*args):
            created = made(*args)
            say("begin")
            time.sleep(60)
            return created
        rendezvous.new_segment = held
        pd.addprocs(1, transport=transport)
    if __name__ == "__main__":
        time.sleep(60)
""")

# Each phase, and the upper end of the kill delay after "begin" (seconds). Here the phases
# last about 0.3 s (addprocs of 3), 0.2-0.5 s (pmap), 2-4 s (the drop-ins' maps), 20 ms
# (rmprocs of 3) and 1 s (shutdown).
PHASES = {"addprocs": 0.25, "pmap": 0.15, "executor_map": 1.5, "pool_map": 1.5,
          "rmprocs": 0.012, "shutdown": 0.7}
ATTEMPTS = 5


class Master:
    """The master script in a process of its own, its output lines collected as they come."""

    def __init__(self, script: Path, transport: str, phase: str, names: Path) -> None:
        self.stderr = open(script.with_suffix(".err"), "w+")
        self.proc = subprocess.Popen([sys.executable, str(script), transport, phase, str(names)],
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     start_new_session=True, env=subprocess_env())
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def expect(self, word: str) -> str:
        """Wait for the next line that starts with ``word``."""
        deadline = time.monotonic() + STEP
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                if self.proc.poll() is None:  # hung: have it print every thread's stack
                    os.kill(self.proc.pid, signal.SIGUSR1)
                    time.sleep(1.0)
                raise AssertionError(f"the master never said {word!r}; it said {self.seen}; "
                                     f"stderr:\n{self.errors()}")
            self.seen.append(line)
            if line.split()[0] == word:
                return line

    def kill(self) -> tuple[list[int], float]:
        """Freeze, list the children, SIGKILL; (their os pids, the moment of the kill)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        assert wait_until(lambda: _frozen(self.proc.pid), STEP), "SIGSTOP did not stop the master"
        children = [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        os.kill(self.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        self.proc.wait(STEP)
        return children, killed_at

    def rest(self) -> list[str]:
        """Every line the master printed after the ones ``expect`` consumed."""
        out = []
        while (line := self.lines.get(timeout=STEP)) is not None:
            out.append(line)
        return out

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-6000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STEP)
        self.stderr.close()


def _frozen(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped."""
    try:
        states = [Path(f"/proc/{pid}/task/{t}/stat").read_text().rpartition(")")[2].split()[0]
                  for t in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return all(s in ("T", "t") for s in states)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _time_to_exit(pids: list[int], since: float) -> float:
    """Seconds from ``since`` until every process in ``pids`` is gone (or STEP passed)."""
    deadline = since + STEP
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.002)
    return time.monotonic() - since


def _names(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _alive_names(names: list[str]) -> list[str]:
    left = set(shm_entries())
    return [n for n in names if n[1:] in left or f"sem.{n[1:]}" in left]


class Kill(NamedTuple):
    children: list[int]  # the master's worker processes
    delay: float         # seconds from "begin" to the kill
    elapsed: float       # seconds from the kill until the last child was gone
    attempt: int


def kill_in_phase(tmp_path: Path, transport: str, phase: str, rng: random.Random) -> Kill:
    """Run the master and kill it within ``phase``; every kill, also one that missed the
    phase, must see the workers gone within EXIT_BOUND."""
    script = tmp_path / "master.py"
    script.write_text(MASTER)
    upper = PHASES[phase]
    for attempt in range(1, ATTEMPTS + 1):
        delay = rng.uniform(0, upper)
        master = Master(script, transport, phase, tmp_path / f"names-{attempt}")
        try:
            shown = [] if phase == "addprocs" else [int(p) for p in master.expect("workers").split()[1:]]
            master.expect("begin")
            time.sleep(delay)
            children, killed_at = master.kill()
            children += [p for p in shown if p not in children]  # rmprocs may have reaped some
            elapsed = _time_to_exit(children, killed_at)
            after = master.rest()
        finally:
            master.close()
        assert elapsed < EXIT_BOUND, \
            f"workers {[p for p in children if not _gone(p)]} outlived their master by " \
            f"{elapsed:.1f} s (killed {delay * 1000:.1f} ms into {phase}; seed {SEED})"
        if "end" not in after:
            return Kill(children, delay, elapsed, attempt)
        upper = delay / 2  # the phase was over before the kill: aim earlier
    pytest.fail(f"{phase}: {ATTEMPTS} kills all came after the phase had ended (seed {SEED})")


@pytest.fixture
def noted(tmp_path):
    """The shared-memory names the masters of a test created; any still in /dev/shm at the
    end are removed (ours only), so that one failure does not spill into the next test."""
    def names() -> list[str]:
        return [n for p in sorted(tmp_path.glob("names-*")) for n in _names(p)]
    yield names
    for name in _alive_names(names()):
        for path in (f"/dev/shm/{name[1:]}", f"/dev/shm/sem.{name[1:]}"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_master_sigkill_mid_phase_leaves_no_worker_and_no_segment(transport, phase, tmp_path,
                                                                  noted):
    rng = random.Random(f"{SEED}-{transport}-{phase}")
    before = shm_entries()
    kill = kill_in_phase(tmp_path, transport, phase, rng)
    where = f"killed {kill.delay * 1000:.1f} ms into {phase} (attempt {kill.attempt}; seed {SEED})"
    print(f"\n{transport}: {len(kill.children)} worker processes gone {kill.elapsed * 1000:.0f} ms "
          f"after the master was {where}")
    if phase != "addprocs":
        assert kill.children, "the master had no worker processes when it was killed"
    # A kill while the master hands a segment to a new worker (addprocs, or a drop-in
    # starting one on demand) leaves names that the worker, told of them first, removes.
    assert wait_until(lambda: not _alive_names(noted()), 2), \
        f"/dev/shm still holds {_alive_names(noted())}, names the master made ({where})"
    assert wait_until(lambda: shm_entries() <= before, 5), \
        f"/dev/shm left: {sorted(shm_entries() - before)} ({where})"


@pytest.mark.skipif("shm" not in TRANSPORTS, reason="needs the shared-memory transport")
def test_master_killed_while_handing_over_a_segment(tmp_path, noted):
    """The master dies after creating a new connection's segment and semaphores, before the
    worker opened them: the worker, which was told the names first, removes all seven."""
    script = tmp_path / "master.py"
    script.write_text(MASTER)
    master = Master(script, "shm", "handover", tmp_path / "names-0")
    try:
        master.expect("begin")
        made = _alive_names(noted())
        children, killed_at = master.kill()
        elapsed = _time_to_exit(children, killed_at)
    finally:
        master.close()
    # The worker, and the worker server that forked it (unless it was exec'd).
    assert len(children) in (1, 2) and elapsed < EXIT_BOUND, f"{children} still up after {elapsed:.1f} s"
    assert len(made) == len(noted()) == 7  # the segment and its six semaphores existed
    assert wait_until(lambda: not _alive_names(noted()), 2), \
        f"/dev/shm still holds {_alive_names(noted())}"
