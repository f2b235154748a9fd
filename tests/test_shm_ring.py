"""The shared-memory ring and transport: framing through a small ring, wrap-around, streaming,
corrupted shared memory, wake-ups, and crashes that must leave nothing in /dev/shm."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("posix_ipc")

from pydist import transport  # noqa: E402
from pydist.errors import TransportBroken, TransportClosed, TransportError  # noqa: E402
from pydist.shm import buffers, fence, layout, placement, ring, wait  # noqa: E402
from pydist.shm import transport as shm  # noqa: E402
from pydist.shm.ring import SpinPolicy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = 4096
STEP = 30.0  # seconds: the bound on every wait in these tests
pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm (Linux)")


class Bg:
    """A call in a daemon thread, awaited with a deadline (a hang fails, never blocks)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            self.value = fn(*args)
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = STEP) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.value


def make_pair(capacity: int = SMALL, *, spin: bool = True, tso: bool | None = None):
    a, b = shm.shm_pair(capacity, spin=spin, tso=tso)
    a.max_frame = b.max_frame = transport.DEFAULT_MAX_FRAME
    return a, b


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def child(code: str, *args: str) -> subprocess.Popen:
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def accept_child(listener: shm.ShmListener, proc: subprocess.Popen) -> shm.ShmTransport:
    accepting = Bg(listener.accept)
    try:
        t = accepting.result(STEP)
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.communicate(timeout=STEP)[1].decode(errors="replace")) from None
    t.max_frame = transport.DEFAULT_MAX_FRAME
    return t


def reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=STEP)


# -- framing through a small ring, two threads -------------------------------------------------

EDGES = [0, 1, 7, 8, 9, SMALL - 9, SMALL - 8, SMALL - 7, SMALL - 1, SMALL, SMALL + 1,
         2 * SMALL, 3 * SMALL + 5]
SIZES = st.one_of(st.sampled_from(EDGES), st.integers(0, 3 * SMALL))
MODES = [(True, True), (False, True), (True, False)]  # (spin, tso): the locked path runs too


def split(data: bytes, cuts: list[int]) -> list[Any]:
    """``data`` as several parts (bytes, bytearray, memoryview), some of them empty."""
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    kinds = [bytes, bytearray, memoryview]
    return [kinds[i % 3](data[lo:hi]) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(SIZES, min_size=1, max_size=25),
       cuts=st.lists(st.integers(0, 3 * SMALL), max_size=3),
       mode=st.sampled_from(MODES))
def test_frames_through_a_small_ring(sizes, cuts, mode):
    spin, tso = mode
    a, b = make_pair(spin=spin, tso=tso)
    try:
        frames = [payload(n, seed=i) for i, n in enumerate(sizes)]

        def send() -> None:
            for frame in frames:
                a.send_frame(split(frame, cuts))
        sending = Bg(send)
        for i, frame in enumerate(frames):
            got = Bg(b.recv_frame).result(10.0)
            assert bytes(got) == frame, f"frame {i} of {len(frame)} bytes differs"
        sending.result(10.0)
    finally:
        a.abort()
        b.abort()


@pytest.mark.parametrize("spin, tso", MODES)
def test_many_wraparounds_both_directions(spin, tso):
    a, b = make_pair(1024, spin=spin, tso=tso)
    sizes = [random.Random(7).randrange(0, 3000) for _ in range(600)]
    try:
        for src, dst in ((a, b), (b, a)):
            sending = Bg(lambda t=src: [t.send_frame([payload(n, n)]) for n in sizes])
            for n in sizes:
                assert bytes(Bg(dst.recv_frame).result()) == payload(n, n)
            sending.result()
    finally:
        a.abort()
        b.abort()


@pytest.mark.parametrize("tso", [True, False])
def test_no_wakeup_is_lost(monkeypatch, tso):
    """Ping-pong with spinning off: every wait sleeps; none may need the timeout to end."""
    slow: list[float] = []
    real = wait._acquire

    def timed(sem, timeout):
        start = time.monotonic()
        real(sem, timeout)
        if time.monotonic() - start >= timeout * 0.9:
            slow.append(time.monotonic() - start)
    monkeypatch.setattr(wait, "_acquire", timed)
    a, b = make_pair(spin=False, tso=tso)
    try:
        def echo() -> None:
            for _ in range(3000):
                b.send_frame([b.recv_frame()])
        echoing = Bg(echo)
        for i in range(3000):
            a.send_frame([struct.pack("<Q", i)])
            assert struct.unpack("<Q", Bg(a.recv_frame).result())[0] == i
        echoing.result()
    finally:
        a.abort()
        b.abort()
    assert not slow, f"{len(slow)} waits ended by timeout: a wake-up was lost"


def test_close_lets_the_peer_drain_first():
    a, b = make_pair()
    try:
        for i in range(3):
            a.send_frame([b"frame %d" % i])
        a.close()
        assert [bytes(b.recv_frame()) for _ in range(3)] == [b"frame 0", b"frame 1", b"frame 2"]
        with pytest.raises(TransportClosed):
            b.recv_frame()
        with pytest.raises(TransportClosed):
            b.send_frame([b"late"])
        assert b.closed
    finally:
        b.abort()


def test_closing_releases_the_mapping():
    a, b = make_pair()
    a.close()
    b.close()
    assert a._seg.buf.closed and b._seg.buf.closed


# -- corrupted shared memory ----------------------------------------------------------------

CTL0 = 64  # ring 0 (dialer -> acceptor) control block; its data starts at _DATA_OFFSET


def poke(t: shm.ShmTransport, offset: int, value: int) -> None:
    struct.pack_into("<Q", t._seg.buf, offset, value)


def word(index: int) -> int:
    return CTL0 + 8 * index


def scribble_head_far(a, b):
    poke(a, word(ring.HEAD), 10**12)
    b.recv_frame()


def scribble_head_back(a, b):
    a.send_frame([b"x" * 100])
    b.recv_frame()
    poke(a, word(ring.HEAD), 3)
    b.recv_frame()


def scribble_length(a, b, length=2**62):
    poke(a, layout.DATA_OFFSET, length)
    poke(a, word(ring.HEAD), 8)
    b.recv_frame()


def scribble_closed_flag(a, b):
    poke(a, word(ring.WRITER_CLOSED), 12345)
    b.recv_frame()


def scribble_tail_far(a, b):
    poke(b, word(ring.TAIL), 10**12)
    a.send_frame([bytes(SMALL + 100)])


def scribble_tail_back(a, b):
    for _ in range(2):
        a.send_frame([bytes(3000)])
        b.recv_frame()
    poke(b, word(ring.TAIL), 5)
    a.send_frame([bytes(3000)])


CORRUPTIONS = [scribble_head_far, scribble_head_back, scribble_length,
               lambda a, b: scribble_length(a, b, 2**64 - 1), scribble_closed_flag,
               scribble_tail_far, scribble_tail_back]


@pytest.mark.parametrize("tso", [True, False])
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: getattr(f, "__name__", "length_max"))
def test_scribbled_shared_memory_is_broken(corrupt, tso):
    a, b = make_pair(tso=tso)  # `a` and `b` map the segment separately: another mapping
    try:
        with pytest.raises(TransportBroken):
            Bg(corrupt, a, b).result(5.0)
        victim = b if corrupt is not scribble_tail_far and corrupt is not scribble_tail_back else a
        assert victim.closed
    finally:
        a.abort()
        b.abort()


@settings(max_examples=60, deadline=None)
@given(pokes=st.lists(st.tuples(st.sampled_from([word(i) for i in (0, 1, 2, 8, 9, 10)]
                                                + [layout.DATA_OFFSET, layout.DATA_OFFSET + 8]),
                                st.integers(0, 2**64 - 1)), min_size=1, max_size=4),
       send_first=st.booleans())
def test_random_scribbles_never_escape(pokes, send_first):
    """Whatever is written into the control words or a length, the reader returns a frame
    within its limit or raises TransportError: no other error, no hang, no huge buffer."""
    a, b = make_pair()
    b.max_frame = 1 << 20
    try:
        if send_first:
            a.send_frame([b"before"])
        for offset, value in pokes:
            poke(a, offset, value)
        receiving = Bg(b.recv_frame)
        receiving._thread.join(0.05)
        a.abort()  # ends a legitimate wait for bytes that will never come
        try:
            frame = receiving.result(5.0)
            assert len(frame) <= b.max_frame
        except TransportError:
            pass
    finally:
        a.abort()
        b.abort()


# A peer process of our own uid that writes what it likes into the segment it created: each
# command line is applied to its newest connection, then answered with "done".
SCRIBBLER = """
import struct, sys
from pydist.shm.transport import connect_shm
t = None
for line in sys.stdin:
    cmd, *args = line.split()
    n = [int(a) for a in args]
    if cmd == "connect":
        t = connect_shm(sys.argv[1], 30, capacity=int(sys.argv[2]))
    elif cmd == "fill":  # offset, length, byte
        t._seg.buf[n[0]:n[0] + n[1]] = bytes([n[2]]) * n[1]
    elif cmd == "poke":  # offset, u64 value
        struct.pack_into("<Q", t._seg.buf, n[0], n[1])
    elif cmd == "abort":
        t.abort()
    print("done", flush=True)
"""
RING0, OUTSIDE = 0xAB, 0xCD  # the byte in the data the reader may read, and everywhere else


class Scribbler:
    """The scribbling peer process and our end of each connection it makes."""

    def __init__(self, listener: shm.ShmListener) -> None:
        self.listener = listener
        self.proc = child(SCRIBBLER, listener.address, str(SMALL))

    def do(self, *command: object) -> None:
        self.proc.stdin.write((" ".join(map(str, command)) + "\n").encode())
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer == b"done\n", self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()  # the peer's loop ends
        try:
            self.proc.wait(STEP)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(STEP)
            self.proc.stdout.close()
            self.proc.stderr.close()

    def connect(self) -> shm.ShmTransport:
        """A fresh connection, its ring 0 data all RING0 and the bytes around it OUTSIDE."""
        accepting = Bg(self.listener.accept)
        self.do("connect")
        ours = accepting.result()
        ours.max_frame = 1 << 20
        self.do("fill", CTL0 + 2 * ring.CTL_SIZE, layout.DATA_OFFSET - CTL0 - 2 * ring.CTL_SIZE,
                OUTSIDE)
        self.do("fill", layout.DATA_OFFSET, SMALL, RING0)
        self.do("fill", layout.DATA_OFFSET + SMALL, SMALL, OUTSIDE)  # ring 1's data
        return ours


def test_a_peer_process_scribbling_on_the_ring_cannot_make_us_read_outside_it():
    """Random frame lengths and write counters from another process: the reader returns a
    frame made only of ring 0's bytes, within its limit, or raises TransportError."""
    rng = random.Random(11)
    outcomes = {"frame": 0, "error": 0}
    with shm.ShmListener() as listener:
        peer = Scribbler(listener)
        try:
            for case in range(40):
                ours = peer.connect()
                try:
                    length = rng.choice([rng.randrange(SMALL), rng.randrange(3 * SMALL),
                                         rng.randrange(2**64)])
                    head = rng.choice([rng.randrange(SMALL + 1), rng.randrange(2**64)])
                    peer.do("poke", layout.DATA_OFFSET, length)
                    peer.do("poke", word(ring.HEAD), head)
                    receiving = Bg(ours.recv_frame)
                    receiving._thread.join(0.05)
                    peer.do("abort")  # ends a legitimate wait for bytes that never come
                    try:
                        frame = receiving.result(5.0)
                    except TransportError:
                        outcomes["error"] += 1
                        continue
                    outcomes["frame"] += 1
                    assert len(frame) == length <= ours.max_frame, (case, length, head)
                    assert set(bytes(frame)) <= {RING0}, f"case {case}: read outside ring 0's data"
                finally:
                    ours.abort()
        finally:
            peer.close()
    assert outcomes["frame"] and outcomes["error"], outcomes  # both kinds of case happened


@pytest.mark.parametrize("pokes", [
    [(word(ring.HEAD), 10**12)],                                  # more than the ring holds
    [(layout.DATA_OFFSET, 2**62), (word(ring.HEAD), 8)],          # a length past any limit
    [(layout.DATA_OFFSET, 2**64 - 1), (word(ring.HEAD), 8)],
    [(word(ring.WRITER_CLOSED), 12345)],                          # a closed flag that is not 1
], ids=["head_far", "length_huge", "length_max", "closed_flag"])
def test_a_peer_process_scribbling_on_the_counters_breaks_the_connection(pokes):
    with shm.ShmListener() as listener:
        peer = Scribbler(listener)
        try:
            ours = peer.connect()
            try:
                for offset, value in pokes:
                    peer.do("poke", offset, value)
                with pytest.raises(TransportBroken, match="corrupt|limit|closed flag"):
                    Bg(ours.recv_frame).result(5.0)
                assert ours.closed
            finally:
                ours.abort()
        finally:
            peer.close()


# -- two processes ------------------------------------------------------------------------------

ECHO = """
import sys
from pydist import transport
from pydist.shm.transport import connect_shm
t = connect_shm(sys.argv[1], 30, capacity=int(sys.argv[2]))
t.max_frame = transport.DEFAULT_MAX_FRAME
try:
    while True:
        t.send_frame([t.recv_frame()])
except transport.TransportClosed:
    pass
"""


@pytest.mark.parametrize("spin", [True, False])
def test_echo_between_processes(spin):
    rng = random.Random(5)
    sizes = EDGES * 3 + [rng.randrange(0, 5 * SMALL) for _ in range(300)] + [1 << 20]
    with shm.ShmListener(spin=spin) as listener:
        proc = child(ECHO, listener.address, str(SMALL))
        try:
            t = accept_child(listener, proc)
            sending = Bg(lambda: [t.send_frame(split(payload(n, n), [n // 3])) for n in sizes])
            for n in sizes:
                assert bytes(Bg(t.recv_frame).result()) == payload(n, n), f"{n}-byte frame"
            sending.result()
            t.close()
            assert proc.wait(STEP) == 0, proc.stderr.read().decode(errors="replace")
        finally:
            reap(proc)


STREAM = """
import hashlib, json, sys
from pydist import transport
from pydist.shm.transport import connect_shm
import random
t = connect_shm(sys.argv[1], 30, capacity=int(sys.argv[2]))
t.max_frame = transport.DEFAULT_MAX_FRAME
block = bytearray(random.Random(1).randbytes(int(sys.argv[3])))
digests = []
for i in range(int(sys.argv[4])):
    block[:8] = i.to_bytes(8, "little")
    t.send_frame([block])
    digests.append(hashlib.blake2b(block, digest_size=16).hexdigest())
t.send_frame([json.dumps(digests).encode()])
t.recv_frame()  # the parent's "done"
"""


def test_one_gib_through_a_256_kib_ring():
    frame, count = 64 << 20, 16
    with shm.ShmListener() as listener:
        proc = child(STREAM, listener.address, str(256 << 10), str(frame), str(count))
        try:
            t = accept_child(listener, proc)
            start = time.monotonic()
            got = [hashlib.blake2b(Bg(t.recv_frame).result(), digest_size=16).hexdigest()
                   for _ in range(count)]
            sent = json.loads(bytes(Bg(t.recv_frame).result()))
            elapsed = time.monotonic() - start
            assert got == sent
            t.send_frame([b"done"])
            assert proc.wait(STEP) == 0, proc.stderr.read().decode(errors="replace")
            assert elapsed < 60, f"1 GiB took {elapsed:.1f} s"
        finally:
            reap(proc)


IDLE = """
import sys
from pydist.shm.transport import connect_shm
t = connect_shm(sys.argv[1], 30, capacity=int(sys.argv[2]))
sys.stdin.buffer.read()
"""


def test_peer_death_wakes_a_blocked_sender():
    with shm.ShmListener() as listener:
        proc = child(IDLE, listener.address, str(SMALL))
        try:
            t = accept_child(listener, proc)
            sending = Bg(t.send_frame, [bytes(SMALL * 10)])  # more than the ring holds
            time.sleep(0.2)
            assert sending._thread.is_alive()
            proc.kill()
            start = time.monotonic()
            with pytest.raises(TransportBroken, match="died"):
                sending.result(2.0)
            assert time.monotonic() - start < 1.0
            assert not t.closed   # what the peer sent before it died is still to be read
            with pytest.raises(TransportBroken, match="died"):
                Bg(t.recv_frame).result(2.0)
            assert t.closed
        finally:
            reap(proc)


SERVE = """
import sys
from pydist.shm.transport import ShmListener
listener = ShmListener()
print(listener.address, flush=True)
t = listener.accept()
print(" ".join([t._seg.name, *t._seg.sem_names]), flush=True)
data = bytes(1 << 20)
while True:
    t.send_frame([data])
"""

DRAIN = """
import sys
from pydist.shm.transport import connect_shm
t = connect_shm(sys.argv[1], 30)
t.max_frame = 1 << 30
while True:
    t.recv_frame()
"""


def leftovers(names: list[str]) -> list[str]:
    paths = [f"/dev/shm/{n[1:]}" for n in names] + [f"/dev/shm/sem.{n[1:]}" for n in names]
    return [p for p in paths if os.path.exists(p)]


def test_kill_9_of_both_processes_leaves_nothing():
    server = child(SERVE)
    client = None
    try:
        address = server.stdout.readline().decode().strip()
        assert address.startswith("shm://"), server.stderr.read().decode(errors="replace")
        client = child(DRAIN, address)
        names = server.stdout.readline().decode().split()
        assert len(names) == 7, server.stderr.read().decode(errors="replace")
        time.sleep(0.3)  # mid-transfer
        assert server.poll() is None and client.poll() is None
        assert not leftovers(names), "names must be unlinked as soon as both ends attached"
        for proc in (server, client):
            os.kill(proc.pid, signal.SIGKILL)
        for proc in (server, client):
            proc.wait(STEP)
        assert not leftovers(names)
    finally:
        for proc in (server, client):
            if proc is not None:
                reap(proc)


# -- rendezvous -----------------------------------------------------------------------------

def test_listener_address_and_scheme_registry():
    with transport.listen("shm://") as listener:
        assert listener.address.startswith("shm://@pydist-")
        connecting = Bg(transport.connect, listener.address, 10)
        accepted = listener.accept()
        connected = connecting.result()
        try:
            assert accepted.peer == connected.peer == listener.address
            assert accepted.max_frame == transport.HELLO_MAX_FRAME
            connected.send_frame([b"over the registry"])
            assert bytes(accepted.recv_frame()) == b"over the registry"
        finally:
            accepted.close()
            connected.close()


def test_connect_to_nobody_fails_fast():
    start = time.monotonic()
    with pytest.raises(TransportBroken, match="pydist-0000"):
        shm.connect_shm("shm://@pydist-0000000000000000", 5)
    assert time.monotonic() - start < 1.0


def test_a_silent_listener_times_the_dialer_out():
    import socket
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0pydist-silent-" + os.urandom(4).hex())
    server.listen(1)
    url = "shm://@" + server.getsockname()[1:].decode()
    try:
        start = time.monotonic()
        with pytest.raises(TransportBroken, match="timed out"):
            shm.connect_shm(url, 0.3)
        assert time.monotonic() - start < 2.0
    finally:
        server.close()


def test_bad_offers_are_dropped_and_accept_goes_on():
    import socket
    with shm.ShmListener() as listener:
        address = "\0" + listener.address.removeprefix("shm://@")
        for junk in (b"not json\n", b'{"v": 1, "capacity": 3}\n',
                     b'{"v": 1, "capacity": 4096, "shm": "/etc", "sems": []}\n'):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(address)
            s.sendall(junk)
            s.close()
        connecting = Bg(shm.connect_shm, listener.address, 10)
        t = listener.accept()
        connecting.result().close()
        t.close()


def test_bad_urls():
    for url in ("tcp://x", "shm:/x", "shm://relative/path"):
        with pytest.raises(ValueError):
            shm.ShmListener(url)


# -- the spin policy ------------------------------------------------------------------------

def test_spin_policy_adapts():
    p = SpinPolicy()
    assert p.budget() == 20_000
    p.miss(100_000, spun=True)  # short miss: spin longer next time
    assert p.budget_ns == 30_000
    for _ in range(5):
        p.miss(100_000, spun=True)
    assert p.budget_ns == SpinPolicy.MAX_NS
    budgets = [p.budget() for _ in range(128)]  # three misses in a row: block...
    assert budgets.count(0) == 126 and budgets[63] == budgets[127] == SpinPolicy.MAX_NS
    p.hit()  # ...until a retry catches the peer
    assert p.budget() == SpinPolicy.MAX_NS
    p.miss(10_000_000, spun=True)  # a long wait halves the budget
    assert p.budget_ns == SpinPolicy.MAX_NS // 2
    assert SpinPolicy(enabled=False).budget() == 0


def test_fence_mode_can_be_forced(monkeypatch):
    monkeypatch.setenv("PYDIST_SHM_FENCE", "locked")
    assert fence.tso_by_default() is False
    monkeypatch.setenv("PYDIST_SHM_FENCE", "tso")
    assert fence.tso_by_default() is True


# -- interruptions and stuck peers ----------------------------------------------------------

def test_interrupt_before_a_frame_leaves_the_transport_usable(monkeypatch):
    a, b = make_pair()
    try:
        def interrupted() -> None:
            raise KeyboardInterrupt
        monkeypatch.setattr(b._rx, "wait_readable", interrupted)
        with pytest.raises(KeyboardInterrupt):
            b.recv_frame()
        monkeypatch.undo()
        a.send_frame([b"still fine"])
        assert bytes(b.recv_frame()) == b"still fine" and not b.closed
    finally:
        a.abort()
        b.abort()


def interrupt_on_call(obj: Any, name: str, calls: set[int], monkeypatch) -> list[int]:
    """Make ``obj.name`` raise KeyboardInterrupt on the given (1-based) calls."""
    real, seen = getattr(obj, name), []

    def maybe(*args: Any) -> Any:
        seen.append(1)
        if len(seen) in calls:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(obj, name, maybe)
    return seen


@pytest.mark.parametrize("when", [{2}, {3}, {2, 3, 5}])
def test_interrupt_mid_receive_resumes_the_frame(monkeypatch, when):
    a, b = make_pair()
    data = payload(5 * SMALL, seed=3)  # streams: larger than the ring
    try:
        sending = Bg(a.send_frame, [data])
        interrupt_on_call(b._rx, "_await_bytes", when, monkeypatch)
        for _ in when:
            with pytest.raises(KeyboardInterrupt):
                b.recv_frame()
        assert not b.closed
        assert bytes(b.recv_frame()) == data
        sending.result()
        a.send_frame([b"next"])
        assert bytes(b.recv_frame()) == b"next"
    finally:
        a.abort()
        b.abort()


def test_interrupt_mid_send_finishes_the_frame(monkeypatch):
    a, b = make_pair()
    data = payload(5 * SMALL, seed=4)
    try:
        receiving = Bg(lambda: [bytes(b.recv_frame()) for _ in range(2)])
        interrupt_on_call(a._tx, "_make_room", {1, 3}, monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            a.send_frame([data])
        monkeypatch.undo()
        a.send_frame([b"after"])
        assert receiving.result() == [data, b"after"]
        assert not a.closed
    finally:
        a.abort()
        b.abort()


def test_interrupt_before_the_first_byte_cancels_the_frame(monkeypatch):
    a, b = make_pair()
    try:
        interrupt_on_call(a._tx, "try_write_frame", {1}, monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            a.send_frame([b"cancelled"])
        a.send_frame([b"sent"])
        assert bytes(b.recv_frame()) == b"sent"
    finally:
        a.abort()
        b.abort()


def test_poll():
    a, b = make_pair()
    try:
        start = time.monotonic()
        assert b.poll(0.2) is False
        assert 0.15 < time.monotonic() - start < 2.0
        a.send_frame([b"x"])
        assert b.poll(5.0) is True and bytes(b.recv_frame()) == b"x"
        waiting = Bg(b.poll, 10.0)
        time.sleep(0.1)
        a.send_frame([b"y"])
        assert waiting.result(2.0) is True
        assert bytes(b.recv_frame()) == b"y"
        a.close()
        assert b.poll(5.0) is True  # recv_frame would raise at once
        with pytest.raises(TransportClosed):
            b.recv_frame()
    finally:
        a.abort()
        b.abort()


def test_a_peer_dying_with_the_ring_mutex_held_is_noticed():
    a, b = make_pair(tso=False)
    mutex = a._seg.sems[2]  # ring 0's mutex, as if the peer died inside its critical section
    mutex.acquire(1.0)
    try:
        receiving = Bg(b.recv_frame)
        time.sleep(0.2)
        a.abort()  # the peer's lifeline ends
        with pytest.raises(TransportBroken):
            receiving.result(2.0)
    finally:
        with contextlib.suppress(Exception):  # both ends may have closed their handles
            mutex.release()
        a.abort()
        b.abort()


def test_unsendable_parts_are_refused_before_anything_is_sent():
    np = pytest.importorskip("numpy")
    a, b = make_pair()
    try:
        with pytest.raises(ValueError, match="part 1 is not a contiguous"):
            a.send_frame([b"ok", np.arange(10)[::2]])
        with pytest.raises(TypeError):
            a.send_frame(["text"])
        fortran = np.asfortranarray(np.arange(24, dtype=np.int32).reshape(4, 6))
        a.send_frame([fortran])
        assert bytes(b.recv_frame()) == fortran.tobytes(order="F")
    finally:
        a.abort()
        b.abort()


PINNED = """
import os, sys
from pydist.shm.transport import connect_shm
os.sched_setaffinity(0, {int(sys.argv[2])})
t = connect_shm(sys.argv[1], 30)
t.send_frame([t.recv_frame()])  # it waits once, and says where it runs when it wakes
sys.stdin.buffer.read()
"""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
                    or placement.current_cpu() is None,
                    reason="needs two CPUs, sched_setaffinity and sched_getcpu")
@pytest.mark.parametrize("apart", [False, True])
def test_spin_only_when_the_peer_runs_on_another_vcpu(apart, monkeypatch):
    monkeypatch.delenv("PYDIST_SHM_SPIN", raising=False)
    cpus = sorted(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpus[0]})
        with shm.ShmListener() as listener:
            proc = child(PINNED, listener.address, str(cpus[1] if apart else cpus[0]))
            try:
                t = accept_child(listener, proc)
                t.send_frame([b"where are you?"])
                assert bytes(Bg(t.recv_frame).result()) == b"where are you?"
                waiter = t._rx.waiter
                assert waiter.policy.enabled and waiter._consult  # "auto" between processes
                waiter._placement.apart()  # may answer "we have just woken the peer"
                assert bool(waiter._placement.apart()) is apart  # the vCPUs answer
                t.close()
            finally:
                reap(proc)
    finally:
        os.sched_setaffinity(0, before)


def test_only_the_thread_that_sent_last_spins():
    """A spin holds the GIL: a thread that reads for others must not keep them waiting."""
    import posix_ipc
    asked: list[int] = []

    class Everywhere:
        def apart(self) -> int:
            asked.append(threading.get_ident())
            return 1

        def publish(self) -> None:
            pass

    sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, 0o600, 0)
    try:
        ctl = memoryview(bytearray(ring.CTL_SIZE)).cast("Q")
        state = wait.LinkState()
        waiter = wait.Waiter(ctl, lambda i, v, j: ctl[j], own_sem=sem, peer_sem=sem,
                             state=state, placement=Everywhere(), mode="auto")
        args = (ring.HEAD, 0, ring.READER_SLEEP, ring.WRITER_CLOSED, state.check)
        assert waiter.wait(*args, timeout=0.01) is False and not asked  # nobody sent yet
        state.sender = threading.get_ident()
        assert waiter.wait(*args, timeout=0.01) is False and asked == [state.sender]
        state.sender = -1  # another thread sent last
        assert waiter.wait(*args, timeout=0.01) is False and len(asked) == 1
    finally:
        sem.unlink()
        sem.close()


def test_spin_mode(monkeypatch):
    monkeypatch.delenv("PYDIST_SHM_SPIN", raising=False)
    assert wait.spin_mode(None, same_process=False) == "auto"
    assert wait.spin_mode(None, same_process=True) == "off"  # threads would fight for the GIL
    assert wait.spin_mode(True, same_process=True) == "on"
    monkeypatch.setenv("PYDIST_SHM_SPIN", "0")
    assert wait.spin_mode(None, same_process=False) == "off"
    assert wait.spin_mode(True, same_process=False) == "on"
    monkeypatch.setenv("PYDIST_SHM_SPIN", "1")
    assert wait.spin_mode(None, same_process=True) == "on"
    monkeypatch.delenv("PYDIST_SHM_SPIN")
    a, b = shm.shm_pair(SMALL)
    try:
        assert not a._rx.waiter.policy.enabled and not b._tx.waiter.policy.enabled
    finally:
        a.abort()
        b.abort()


def test_placement_compares_vcpus():
    words = memoryview(bytearray(2 * ring.CTL_SIZE)).cast("Q")
    mine, theirs = words[:16], words[16:]
    p = placement.Placement(mine, theirs, ring.WRITER_CPU, frozenset({10**6}))
    cpu = placement.current_cpu()
    if cpu is None:
        assert p.apart()  # the fallback answers: our affinity and {10**6} are disjoint
        return
    assert mine[ring.WRITER_CPU] != 0  # published on creation: a vCPU number + 1
    assert not p.apart()  # the peer has said nothing yet: do not spin
    theirs[ring.WRITER_CPU] = 10**6  # a vCPU this process never runs on
    assert p.apart()
    theirs[ring.WRITER_CPU] = 2**64 - 1  # a scribble is only a wrong hint
    assert p.apart()


@pytest.mark.skipif(placement.current_cpu() is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs sched_getcpu and two CPUs")
def test_a_waiting_thread_moves_off_its_peers_vcpu_and_keeps_its_mask(monkeypatch):
    monkeypatch.setattr(placement, "_runnable", lambda: 1)  # nothing else wants a vCPU
    words = memoryview(bytearray(2 * ring.CTL_SIZE)).cast("Q")
    mine, theirs = words[:16], words[16:]
    p = placement.Placement(mine, theirs, ring.WRITER_CPU, may_move=True)
    mask = os.sched_getaffinity(0)
    placement.allow_moves()
    try:
        answers = []
        for _ in range(placement.MOVE_AFTER):
            theirs[ring.WRITER_CPU] = placement.current_cpu() + 1  # the peer, awake right here
            answers.append(p.apart())
        assert answers[:-1] == [0] * (placement.MOVE_AFTER - 1)
        assert answers[-1] == placement.MOVED
        assert placement.current_cpu() + 1 != theirs[ring.WRITER_CPU]
        assert mine[ring.WRITER_CPU] == placement.current_cpu() + 1  # told the peer
        assert os.sched_getaffinity(0) == mask  # moved, not pinned
        theirs[ring.WRITER_CPU] = placement.current_cpu() + 1
        for _ in range(2 * placement.MOVE_AFTER):  # at most one move per MOVE_EVERY
            assert p.apart() == 0
    finally:
        placement.allow_moves(False)
        os.sched_setaffinity(0, mask)


def test_no_move_without_consent_or_a_free_vcpu(monkeypatch):
    runnable = placement._runnable
    if os.path.exists("/proc/loadavg"):
        assert 1 <= runnable() < 1 << 20  # counts at least this thread
    moves: list[int] = []
    monkeypatch.setattr(placement, "_move_off", lambda cpu: moves.append(cpu) or True)
    words = memoryview(bytearray(2 * ring.CTL_SIZE)).cast("Q")
    mine, theirs = words[:16], words[16:]
    p = placement.Placement(mine, theirs, ring.WRITER_CPU, may_move=True)
    if placement.current_cpu() is None:
        return
    for _ in range(3 * placement.MOVE_AFTER):  # this process did not allow moves
        theirs[ring.WRITER_CPU] = placement.current_cpu() + 1
        assert p.apart() == 0
    placement.allow_moves()
    try:
        dialer = placement.Placement(mine, theirs, ring.WRITER_CPU, may_move=False)
        for _ in range(3 * placement.MOVE_AFTER):  # the dialing end never moves
            theirs[ring.WRITER_CPU] = placement.current_cpu() + 1
            assert dialer.apart() == 0
    finally:
        placement.allow_moves(False)
    assert not moves
    monkeypatch.undo()
    monkeypatch.setattr(placement, "_runnable", lambda: 1 << 20)  # a busy machine
    assert placement._move_off(placement.current_cpu()) is False


def test_after_waking_the_peer_a_spin_is_worth_it():
    words = memoryview(bytearray(2 * ring.CTL_SIZE)).cast("Q")
    mine, theirs = words[:16], words[16:]
    p = placement.Placement(mine, theirs, ring.WRITER_CPU)
    if placement.current_cpu() is None:
        return
    theirs[ring.WRITER_CPU] = placement.current_cpu() + 1
    p.woke_peer()  # the OS places a woken peer anew: its word is stale
    assert p.apart() == 1
    theirs[ring.WRITER_CPU] = placement.current_cpu() + 1
    assert p.apart() == 0  # once only


def test_the_spin_policy_starts_afresh_after_a_move():
    policy = SpinPolicy()
    for _ in range(SpinPolicy.MISSES_TO_BLOCK):
        policy.miss(1_000_000, spun=True)
    assert policy.budget() == 0
    policy.reset()
    assert policy.budget() == SpinPolicy.START_NS


# -- receive buffers ------------------------------------------------------------------------

BIG = buffers.LARGE + 12345  # a frame that lands in pooled memory


def test_large_frames_reuse_their_memory_once_nothing_refers_to_it(monkeypatch):
    monkeypatch.setenv("PYDIST_SHM_BIGBUF", "0")  # through the ring (bigbuf has its own tests)
    a, b = make_pair(1 << 20)  # smaller than the frames: they stream through
    try:
        sending = Bg(a.send_frame, [payload(BIG, 1)])
        first = Bg(b.recv_frame).result()
        sending.result()
        assert bytes(first) == payload(BIG, 1)
        memory, pooled = id(first.obj), buffers.pool_stats()
        del first  # the last reference: the memory may serve again
        sending = Bg(a.send_frame, [payload(BIG, 2)])
        second = Bg(b.recv_frame).result()
        sending.result()
        assert id(second.obj) == memory and buffers.pool_stats() == pooled
        assert bytes(second) == payload(BIG, 2)
    finally:
        a.abort()
        b.abort()


@pytest.mark.parametrize("bigbuf", ["0", ""], ids=["ring", "segment"])
def test_memory_an_array_still_uses_is_never_handed_out_again(monkeypatch, bigbuf):
    np = pytest.importorskip("numpy")
    monkeypatch.setenv("PYDIST_SHM_BIGBUF", bigbuf)
    a, b = make_pair(4 << 20)  # larger than the frames: the one-step path
    try:
        a.send_frame([payload(BIG, 3)])
        frame = b.recv_frame()
        array = np.frombuffer(frame, dtype=np.uint8)[10:]  # a view of a view
        memory = frame.obj
        del frame
        for seed in range(4, 8):
            a.send_frame([payload(BIG, seed)])
            other = b.recv_frame()
            assert other.obj is not memory and bytes(other) == payload(BIG, seed)
            del other
        assert array.tobytes() == payload(BIG, 3)[10:]
    finally:
        a.abort()
        b.abort()


def test_the_buffer_pool_is_bounded_in_size_and_in_time(monkeypatch):
    pool = buffers._Pool()
    monkeypatch.setattr(buffers, "POOL_BYTES", 4 * buffers.LARGE)
    monkeypatch.setattr(buffers, "IDLE_SECONDS", 0.05)
    huge = pool.get(4 * buffers.LARGE + 1)  # larger than the whole pool: never kept
    assert pool.stats() == (0, 0)
    held = [pool.get(buffers.LARGE) for _ in range(5)]  # four fit; the fifth is on its own
    assert pool.stats() == (4, 4 * buffers.LARGE)
    del held[1:], huge
    again = pool.get(buffers.LARGE)  # an idle one serves again
    assert pool.stats() == (4, 4 * buffers.LARGE) and again.obj is not held[0].obj
    del held, again
    deadline = time.monotonic() + STEP
    while pool.stats() != (0, 0):  # idle memory goes back to the OS
        assert time.monotonic() < deadline, f"the pool still holds {pool.stats()}"
        time.sleep(0.02)


def test_small_frames_get_plain_memory():
    frame = buffers.receive_buffer(buffers.LARGE - 1)
    assert isinstance(frame.obj, bytearray) and len(frame) == buffers.LARGE - 1
