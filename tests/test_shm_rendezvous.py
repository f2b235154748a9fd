"""The shared-memory rendezvous when an end dies in the middle: whichever end survives removes
the names of the segment and its semaphores, and never a name it was not promised.

The dialer announces every name before it creates anything (``pydist/shm/handover.py``). An
end that dies is a child process stopped at a chosen step (it prints ``ready-to-die`` there)
and killed with SIGKILL; the other end is this process. Every wait has a deadline.
"""
from __future__ import annotations

import json
import os
import queue
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("posix_ipc")

from testkit import subprocess_env, wait_until  # noqa: E402

from pydist.errors import TransportBroken, TransportClosed  # noqa: E402
from pydist.shm import handover, rendezvous  # noqa: E402
from pydist.shm import segment as seg  # noqa: E402
from pydist.shm.layout import SEM_COUNT  # noqa: E402

STEP = 30.0     # the bound on every wait
CLEANUP = 2.0   # seconds from a death to the names gone
pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm (Linux)")

CHILD = textwrap.dedent("""
    import json, sys, time
    from pydist.shm import handover, rendezvous, segment

    role, mode, where = sys.argv[1:4]
    squatted = sys.argv[4] if len(sys.argv) > 4 else ""

    def say(*words):
        print(*words, flush=True)

    def die_here(plan=None):
        if plan is not None:
            say("names", json.dumps(plan.names))
        say("ready-to-die")
        time.sleep(60)  # until the test kills us
        raise SystemExit("not killed")

    if role == "dial":
        if squatted:  # the first name picked (the segment's) is held by somebody else
            picks, fresh = iter([squatted]), segment.new_name
            segment.new_name = lambda: next(picks, None) or fresh()
        made, made_sem = rendezvous.new_segment, segment._create_sem

        def creating(capacity, plan):
            if mode == "before-creating":
                die_here(plan)
            created = made(capacity, plan)
            if mode == "created":
                die_here(plan)
            return created

        def semaphore(plan, index, initial):
            if mode == "while-creating" and index == 3:
                die_here(plan)  # the segment and three semaphores exist, three do not
            return made_sem(plan, index, initial)
        rendezvous.new_segment, segment._create_sem = creating, semaphore
        rendezvous.connect_shm(where, 30)
        die_here()
    else:
        listener = rendezvous.ShmListener()
        if mode == "after-intent":
            read = handover.Claim.from_intent
            handover.Claim.from_intent = staticmethod(lambda line: die_here() or read(line))
        elif mode == "opened":  # every object open, no name unlinked yet
            attach = segment.Segment.attach
            segment.Segment.attach = lambda *args, opened: attach(*args, opened=die_here)
        say("address", listener.address)
        listener.accept()
        die_here()
""")


class Child:
    """One end of a rendezvous in a process of its own; its output lines as they come."""

    def __init__(self, role: str, mode: str, where: str = "-", *extra: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, role, mode, where, *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=subprocess_env())
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.names: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def expect(self, word: str) -> str:
        """The rest of the next line that starts with ``word`` (noting any names on the way)."""
        deadline = time.monotonic() + STEP
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.proc.kill()
                raise AssertionError(f"the child never said {word!r}: {self.proc.stderr.read()}")
            head, _, rest = line.partition(" ")
            if head == "names":
                self.names = json.loads(rest)
            if head == word:
                return rest

    def kill(self) -> float:
        """SIGKILL it and reap it; the moment of the kill."""
        self.proc.kill()
        killed_at = time.monotonic()
        self.proc.wait(STEP)
        return killed_at

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=STEP)


class Bg:
    """A call in a daemon thread, awaited with a deadline."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.ended_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            self.value = fn(*args)
        except BaseException as exc:
            self.error = exc
        self.ended_at = time.monotonic()

    def result(self, timeout: float = STEP) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.value


def paths(name: str) -> tuple[str, str]:
    """Where a name lives in /dev/shm: as a segment, and as a semaphore."""
    return f"/dev/shm/{name[1:]}", f"/dev/shm/sem.{name[1:]}"


def existing(names: list[str]) -> list[str]:
    return [n for n in names if any(os.path.exists(p) for p in paths(n))]


@pytest.fixture
def noted(monkeypatch):
    """Every name picked in this process or named by a child; any left are removed at the
    end (ours only), so that one failure does not spill into the next test."""
    names: list[str] = []
    real = seg.new_name

    def noting() -> str:
        names.append(real())
        return names[-1]
    monkeypatch.setattr(seg, "new_name", noting)
    yield names
    for name in existing(names):
        for path in paths(name):
            if os.path.exists(path):
                os.remove(path)


@pytest.fixture
def listener():
    with rendezvous.ShmListener() as lst:
        yield lst


def a_working_dial(listener: rendezvous.ShmListener, accepting: Bg) -> None:
    """A good peer still gets through ``accepting`` (the acceptor gave up on the dead one)."""
    dialed = rendezvous.connect_shm(listener.address, 10)
    accepted = accepting.result()
    try:
        dialed.send_frame([b"still accepting"])
        assert bytes(accepted.recv_frame()) == b"still accepting"
    finally:
        dialed.close()
        accepted.close()


# -- the dialer dies ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode, made", [("created", 1 + SEM_COUNT), ("while-creating", 4)])
def test_the_acceptor_removes_the_names_of_a_dialer_killed_in_the_handover(listener, noted,
                                                                          mode, made):
    accepting = Bg(listener.accept)
    dialer = Child("dial", mode, listener.address)
    try:
        dialer.expect("ready-to-die")
        names = dialer.names
        noted.extend(names)
        assert len(names) == 1 + SEM_COUNT and len(existing(names)) == made
        killed_at = dialer.kill()
        assert wait_until(lambda: not existing(names), CLEANUP), \
            f"{existing(names)} still in /dev/shm {CLEANUP} s after the dialer died"
        print(f"\n{mode}: names gone {(time.monotonic() - killed_at) * 1000:.1f} ms after the kill")
        a_working_dial(listener, accepting)
    finally:
        dialer.close()


def test_a_dialer_killed_before_creating_leaves_nothing_and_the_acceptor_moves_on(
        listener, noted, caplog):
    accepting = Bg(listener.accept)
    dialer = Child("dial", "before-creating", listener.address)
    try:
        dialer.expect("ready-to-die")
        noted.extend(dialer.names)
        assert len(dialer.names) == 1 + SEM_COUNT and not existing(dialer.names)
        killed_at = dialer.kill()
        # It gives up at the end of file, not after the rendezvous timeout.
        assert wait_until(lambda: "hung up" in caplog.text, 1.0), caplog.text
        assert not existing(dialer.names)
        a_working_dial(listener, accepting)
        assert time.monotonic() - killed_at < rendezvous.RENDEZVOUS_TIMEOUT
    finally:
        dialer.close()


def test_a_stuck_dialer_is_given_up_at_the_rendezvous_timeout_and_its_names_removed(
        listener, noted, monkeypatch):
    monkeypatch.setattr(rendezvous, "RENDEZVOUS_TIMEOUT", 1.0)
    accepting = Bg(listener.accept)
    dialer = Child("dial", "created", listener.address)
    try:
        dialer.expect("ready-to-die")
        noted.extend(dialer.names)
        assert len(existing(dialer.names)) == 1 + SEM_COUNT
        assert wait_until(lambda: not existing(dialer.names), 1.0 + CLEANUP)
        assert dialer.proc.poll() is None  # alive: the acceptor removed them on its timeout
        a_working_dial(listener, accepting)
    finally:
        dialer.close()


def test_a_squatted_name_is_replaced_and_the_squatter_left_alone_even_if_the_dialer_dies(
        listener, noted):
    squatted = seg.new_name()
    with open(paths(squatted)[0], "x") as f:
        f.write("squatter")
    try:
        accepting = Bg(listener.accept)
        dialer = Child("dial", "created", listener.address, squatted)
        try:
            dialer.expect("ready-to-die")
            names = dialer.names
            noted.extend(names)
            assert squatted not in names and len(existing(names)) == 1 + SEM_COUNT
            dialer.kill()
            assert wait_until(lambda: not existing(names), CLEANUP), existing(names)
            with open(paths(squatted)[0]) as f:
                assert f.read() == "squatter"
            a_working_dial(listener, accepting)
        finally:
            dialer.close()
    finally:
        os.remove(paths(squatted)[0])


def noted_name(noted: list[str]) -> str:
    """A fresh name of pydist's form, noted for the clean-up."""
    name = "/pydist-" + secrets.token_hex(8)
    noted.append(name)
    return name


def test_a_squatted_name_is_passed_over_in_a_rendezvous(listener, noted, monkeypatch):
    squatted = seg.new_name()
    with open(paths(squatted)[1], "x") as f:  # the first semaphore's name
        f.write("squatter")
    picks = iter([seg.new_name(), squatted])
    monkeypatch.setattr(seg, "new_name", lambda: next(picks, None) or noted_name(noted))
    try:
        a_working_dial(listener, Bg(listener.accept))
        with open(paths(squatted)[1]) as f:
            assert f.read() == "squatter"
        assert not existing([n for n in noted if n != squatted])
    finally:
        os.remove(paths(squatted)[1])


# -- the acceptor dies -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["after-intent", "opened"])
def test_the_dialer_removes_the_names_when_the_acceptor_is_killed_in_the_handover(noted, mode):
    acceptor = Child("accept", mode)
    try:
        address = acceptor.expect("address")
        dialing = Bg(rendezvous.connect_shm, address, STEP)
        acceptor.expect("ready-to-die")
        # "after-intent": the dialer goes on creating while the acceptor is stopped.
        assert wait_until(lambda: len(existing(noted)) == 1 + SEM_COUNT, STEP), noted
        killed_at = acceptor.kill()
        # The end of file, or a reset where the acceptor left a line unread.
        with pytest.raises(TransportBroken, match="hung up|reset"):
            dialing.result()
        assert dialing.ended_at - killed_at < CLEANUP
        assert not existing(noted)  # unlinked before connect_shm raised
    finally:
        acceptor.close()


# -- the listener closes (the acceptor's process exits) ----------------------------------------

def test_closing_the_listener_removes_the_names_of_a_rendezvous_in_progress(listener, noted,
                                                                           monkeypatch):
    # The process exits right after close() (exit_worker): the names must be gone by then,
    # even when the rendezvous thread is slow to remove them.
    settle = handover.Claim.settle

    def slow_settle(claim: handover.Claim) -> None:
        time.sleep(0.2)
        settle(claim)
    monkeypatch.setattr(handover.Claim, "settle", slow_settle)
    accepting = Bg(listener.accept)
    dialer = Child("dial", "created", listener.address)
    try:
        dialer.expect("ready-to-die")
        noted.extend(dialer.names)
        assert len(existing(dialer.names)) == 1 + SEM_COUNT
        listener.close()
        assert not existing(dialer.names)  # when close() returns, not later
        with pytest.raises(TransportClosed):
            accepting.result()
    finally:
        dialer.close()


def test_closing_the_listener_removes_the_names_a_peer_announced_before_it_was_accepted(
        listener, noted):
    dialer = Child("dial", "created", listener.address)  # nobody accepts: it waits in the backlog
    try:
        dialer.expect("ready-to-die")
        noted.extend(dialer.names)
        assert len(existing(dialer.names)) == 1 + SEM_COUNT
        dialer.kill()
        listener.close()
        assert not existing(dialer.names)
    finally:
        dialer.close()


# -- what a peer may make the acceptor unlink ---------------------------------------------------

def plant() -> list[str]:
    """A segment file and SEM_COUNT semaphore files under fresh names of pydist's form."""
    names = ["/pydist-" + secrets.token_hex(8) for _ in range(1 + SEM_COUNT)]
    for i, name in enumerate(names):
        with open(paths(name)[0 if i == 0 else 1], "x") as f:
            f.write("planted")
    return names


def remove(names: list[str]) -> None:
    for name in names:
        for path in paths(name):
            if os.path.exists(path):
                os.remove(path)


def send_and_hang_up(listener: rendezvous.ShmListener, *lines: object) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("\0" + listener.address.removeprefix("shm://@"))
    for line in lines:
        s.sendall(line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n")
    s.close()


def intent(shm: str, sems: list[str], capacity: int = 4096) -> dict:
    return {"v": 2, "capacity": capacity, "shm": shm, "sems": sems}


def test_an_intent_with_any_foreign_name_unlinks_nothing(listener, noted, caplog):
    planted = plant()
    foreign = f"/victim-{secrets.token_hex(8)}"
    with open(f"/dev/shm/{foreign[1:]}", "x") as f:
        f.write("planted")
    shm, sems = planted[0], planted[1:]
    try:
        accepting = Bg(listener.accept)
        for bad in (intent(foreign, sems), intent(shm, [*sems[:-1], "/../" + foreign[1:]]),
                    intent(shm, [*sems[:-1], "/pydist-" + "AB" * 8]),
                    intent(shm, [*sems[:-1], "/pydist-1234"]),
                    intent(shm, sems[:-1]), intent(shm, sems, capacity=3),
                    {**intent(shm, sems), "v": 1}, b"[" * 4000 + b"\n", b"\xff\xfe\n"):
            send_and_hang_up(listener, bad)
        assert wait_until(lambda: caplog.text.count("rendezvous at") >= 9, STEP), caplog.text
        assert existing(planted) == planted and os.path.exists(f"/dev/shm/{foreign[1:]}")
        # A rename may only replace a name the intent gave, and only by one of pydist's form.
        send_and_hang_up(listener, intent(shm, sems), {"instead": [foreign, planted[1]]})
        assert wait_until(lambda: not existing(planted), CLEANUP)  # the intent's own: gone
        assert os.path.exists(f"/dev/shm/{foreign[1:]}")
        a_working_dial(listener, accepting)
    finally:
        os.remove(f"/dev/shm/{foreign[1:]}")
        remove(planted)


def test_a_rename_to_a_foreign_name_is_refused(listener, noted):
    planted = plant()
    shm, sems = planted[0], planted[1:]
    try:
        accepting = Bg(listener.accept)
        send_and_hang_up(listener, intent(shm, sems), {"instead": [sems[0], "/etc/passwd"]})
        # Refused as a whole line: the claim keeps sems[0] and settles every planted name.
        assert wait_until(lambda: not existing(planted), CLEANUP), existing(planted)
        a_working_dial(listener, accepting)
    finally:
        remove(planted)
