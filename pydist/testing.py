"""The transport conformance suite: what every ``Transport`` must do, for any scheme.

``check_transport(listen_url)`` runs every check against the scheme of ``listen_url``; each
check is also a function of its own, listed in ``CHECKS``, so a test file can parametrize::

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_transport(check):
        check("tcp://127.0.0.1:0")

The suite reaches transports only through the registry (``pydist.transport.listen`` and
``connect``), never through an implementation's own names. Every blocking call runs in a
daemon thread that is waited for with a deadline, so a broken transport fails a check with
a message naming the step (and the stuck thread's stack), never by hanging.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import random
import struct
import subprocess
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, cast

from . import transport
from .errors import TransportBroken, TransportClosed, TransportError
from .transport import DEFAULT_MAX_FRAME, Transport

__all__ = [
    "CHECKS", "check_transport", "transport_pair", "check_ordering", "check_frame_sizes",
    "check_multipart_frames", "check_concurrent_senders", "check_simultaneous_big_sends",
    "check_close_wakes_peer", "check_close_wakes_self", "check_close_is_idempotent",
    "check_abort_never_blocks", "check_max_frame", "check_peer_death",
]

BIG = 64 << 20
WAKE_TIMEOUT = 1.0    # a close, an abort or a peer's death must be noticed this fast
STEP_TIMEOUT = 30.0   # connecting, or moving a few megabytes
BIG_TIMEOUT = 90.0    # moving several `big` frames
SETTLE = 0.2          # time for a thread to reach its blocking call before we act
THREAD_PREFIX = "pydist-check-"
R = TypeVar("R")


# -- bounded waiting ----------------------------------------------------------------------

class _Task(Generic[R]):
    """A call running in a daemon thread, awaited with a deadline."""

    def __init__(self, name: str, fn: Callable[..., R], *args: Any) -> None:
        self.name = name
        self.value: R | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(fn, args), name=THREAD_PREFIX + name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., R], args: tuple[Any, ...]) -> None:
        try:
            self.value = fn(*args)
        except BaseException as e:  # reported to whoever waits for the task
            self.error = e

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float) -> BaseException | None:
        """Wait until the call ends; its exception, or None; AssertionError on timeout."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"{self.name!r} did not finish within {timeout} s\n{self._stack()}")
        return self.error

    def result(self, timeout: float) -> R:
        """The call's value; re-raises its exception; AssertionError on timeout."""
        error = self.wait(timeout)
        if error is not None:
            raise error
        return cast(R, self.value)   # set: the call returned

    def discard(self) -> None:
        """Give the call a moment to end, and abort the transport it returned, if any."""
        self._thread.join(WAKE_TIMEOUT)
        if self.done and self.error is None:
            abort = getattr(self.value, "abort", None)
            if abort is not None:
                abort()

    def _stack(self) -> str:
        frame = sys._current_frames().get(self._thread.ident or -1)
        text = "".join(traceback.format_stack(frame)) if frame else "(no stack)\n"
        return f"stack of thread {self._thread.name}:\n{text}"


def _wait_all(tasks: list[_Task[Any]], timeout: float) -> list[Any]:
    """The values of all tasks; the first failure is raised as soon as it happens."""
    deadline = time.monotonic() + timeout
    while not all(t.done for t in tasks):
        for t in tasks:
            if t.done and t.error is not None:
                raise t.error
        if time.monotonic() > deadline:
            stuck = [t for t in tasks if not t.done]
            raise AssertionError(
                f"{', '.join(repr(t.name) for t in stuck)} did not finish within {timeout} s\n"
                + "".join(t._stack() for t in stuck))
        time.sleep(0.005)
    return [t.result(0) for t in tasks]


def _expect_error(task: _Task[Any], timeout: float, kinds: tuple[type, ...], what: str) -> BaseException:
    """The exception ``task`` ends with, checked to be one of ``kinds`` within ``timeout``."""
    try:
        error = task.wait(timeout)
    except AssertionError as e:
        raise AssertionError(f"{what}: still blocked after {timeout} s\n{e}") from None
    names = " or ".join(k.__name__ for k in kinds)
    if error is None:
        raise AssertionError(f"{what}: expected {names}, but the call returned {task.value!r:.80}")
    if not isinstance(error, kinds):
        raise AssertionError(f"{what}: expected {names}, got {type(error).__name__}: {error}") from error
    return error


# -- pairs --------------------------------------------------------------------------------

def transport_pair(listen_url: str, *, timeout: float = STEP_TIMEOUT) -> tuple[Transport, Transport]:
    """``(accepted, connected)``: both ends of one new connection, with ``max_frame`` raised
    to ``DEFAULT_MAX_FRAME``; the listener is closed before returning."""
    listener = transport.listen(listen_url)
    try:
        accepting = _Task("accept", listener.accept)
        connecting = _Task("connect", transport.connect, listener.address, timeout)
        try:
            accepted, connected = _wait_all([accepting, connecting], timeout)
        except BaseException:
            listener.close()  # wakes the accept if it is still waiting
            accepting.discard()
            connecting.discard()
            raise
    finally:
        listener.close()
    for t in (accepted, connected):
        t.max_frame = DEFAULT_MAX_FRAME
    return accepted, connected


@contextlib.contextmanager
def _pair(listen_url: str) -> Iterator[tuple[Transport, Transport]]:
    """A transport pair, aborted on exit (which also wakes any thread still using it)."""
    a, b = transport_pair(listen_url)
    try:
        yield a, b
    finally:
        a.abort()
        b.abort()


def _random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _summary(data: Any) -> tuple[int, str]:
    """Length and digest: enough to tell that a large frame arrived intact."""
    return len(data), hashlib.blake2b(data, digest_size=16).hexdigest()


def _transfer(src: Transport, dst: Transport, frames: list[list[Any]], what: str,
              keep: Callable[[memoryview], Any] = bytes, timeout: float = STEP_TIMEOUT) -> list[Any]:
    """Send ``frames`` (each a list of parts) from ``src`` while ``dst`` receives as many;
    ``keep`` of each received frame."""
    def send() -> None:
        for parts in frames:
            src.send_frame(parts)

    def receive() -> list[Any]:
        return [keep(dst.recv_frame()) for _ in frames]

    receiving = _Task(f"receive {what}", receive)
    _wait_all([_Task(f"send {what}", send), receiving], timeout)
    return receiving.result(0)


# -- ordering, sizes, parts -----------------------------------------------------------------

def check_ordering(listen_url: str, *, count: int = 10_000) -> None:
    """``count`` small frames of varying length arrive complete and in order."""
    frames = [[struct.pack("<Q", i) + bytes(i % 23)] for i in range(count)]
    with _pair(listen_url) as (a, b):
        got = _transfer(a, b, frames, f"{count} numbered frames")
    for i, (parts, frame) in enumerate(zip(frames, got)):
        assert frame == parts[0], f"frame {i} arrived as {frame[:8]!r}+{len(frame) - 8} bytes"


def check_frame_sizes(listen_url: str, *, big: int = BIG) -> None:
    """Frames of 0 B up to ``big`` arrive intact (digest-checked), in both directions."""
    sizes = [0, 1, 7, 8, 4095, 4096, 65536 + 1, 1 << 20, big]
    frames = [[_random_bytes(n, seed=n)] for n in sizes]
    expected = [_summary(parts[0]) for parts in frames]
    with _pair(listen_url) as (a, b):
        for src, dst, direction in ((a, b, "accepted -> connected"), (b, a, "connected -> accepted")):
            got = _transfer(src, dst, frames, f"sizes {direction}", _summary, BIG_TIMEOUT)
            for n, want, have in zip(sizes, expected, got):
                assert have == want, f"{direction}: frame of {n} bytes arrived as {have}, expected {want}"


def _multipart_cases() -> list[list[Any]]:
    import array
    doubles = array.array("d", (i * 0.5 for i in range(1000)))
    grid = memoryview(bytes(range(256)) * 4).cast("B", shape=[32, 32])  # 2-D, C-contiguous
    cases: list[list[Any]] = [
        [], [b""], [b"", b"", b""],
        [b"head", b"", bytearray(b"middle"), memoryview(b"xyz")[1:], b""],
        [memoryview(doubles), b"|", memoryview(array.array("i", range(-50, 50)))],
        [grid, memoryview(doubles)[10:20]],
        [b"<", _random_bytes(3 << 20, seed=3), b">"],
        [struct.pack("<I", i) for i in range(2000)],  # more parts than one sendmsg takes
    ]
    with contextlib.suppress(ImportError):
        import numpy
        matrix = numpy.arange(12_000, dtype=numpy.float64).reshape(100, 120)
        cases.append([b"np", matrix.data, numpy.arange(7, dtype=numpy.int16).data])   # memoryviews
    return cases


def check_multipart_frames(listen_url: str) -> None:
    """A frame sent as several parts (empty ones, memoryviews of typed buffers) arrives as
    their concatenation."""
    cases = _multipart_cases()
    with _pair(listen_url) as (a, b):
        got = _transfer(a, b, cases, "multipart frames")
    for i, (parts, have) in enumerate(zip(cases, got)):
        want = b"".join(bytes(memoryview(p)) for p in parts)
        assert have == want, (f"multipart case {i}: got {len(have)} bytes {have[:32]!r}..., "
                              f"expected {len(want)} bytes {want[:32]!r}...")


# -- concurrency --------------------------------------------------------------------------

def _tagged_body(tid: int, seq: int) -> bytes:
    return bytes([(tid * 64 + seq) & 0xFF]) * ((seq * 37 + tid * 101) % 3000)


def check_concurrent_senders(listen_url: str, *, threads: int = 4, count: int = 2000) -> None:
    """Frames sent by several threads at once never interleave, and each thread's frames
    arrive in the order it sent them."""
    def send(t: Transport, tid: int) -> None:
        for seq in range(count):
            t.send_frame([struct.pack("<II", tid, seq), _tagged_body(tid, seq)])

    def receive(t: Transport) -> None:
        following = [0] * threads
        for _ in range(threads * count):
            frame = t.recv_frame()
            tid, seq = struct.unpack_from("<II", frame)
            assert tid < threads, f"corrupt frame: thread id {tid}"
            assert seq == following[tid], f"thread {tid}: frame {seq} arrived, expected {following[tid]}"
            assert frame[8:] == _tagged_body(tid, seq), f"thread {tid} frame {seq}: corrupt body"
            following[tid] += 1

    with _pair(listen_url) as (a, b):
        senders = [_Task(f"sender {tid}", send, a, tid) for tid in range(threads)]
        _wait_all(senders + [_Task("receive tagged frames", receive, b)], STEP_TIMEOUT)


def check_simultaneous_big_sends(listen_url: str, *, big: int = BIG) -> None:
    """Both ends sending a ``big`` frame at once, each reading in another thread, do not
    deadlock, and both frames arrive intact."""
    data = _random_bytes(big, seed=1)
    from_a, from_b = memoryview(data), memoryview(data)[1:]  # different lengths and contents
    with _pair(listen_url) as (a, b):
        at_a, at_b, _, _ = _wait_all([
            _Task("receive on the accepted end", lambda: _summary(a.recv_frame())),
            _Task("receive on the connected end", lambda: _summary(b.recv_frame())),
            _Task(f"send {big} bytes from the accepted end", a.send_frame, [from_a]),
            _Task(f"send {big - 1} bytes from the connected end", b.send_frame, [from_b]),
        ], BIG_TIMEOUT)
    assert at_a == _summary(from_b), "the big frame received on the accepted end is corrupt"
    assert at_b == _summary(from_a), "the big frame received on the connected end is corrupt"


# -- closing --------------------------------------------------------------------------------

def check_close_wakes_peer(listen_url: str) -> None:
    """Closing one end wakes the other end's blocked ``recv_frame`` with ``TransportClosed``."""
    with _pair(listen_url) as (a, b):
        receiving = _Task("recv_frame on the peer", b.recv_frame)
        time.sleep(SETTLE)
        a.close()
        _expect_error(receiving, WAKE_TIMEOUT, (TransportClosed,), "peer blocked in recv_frame after close()")


def check_close_wakes_self(listen_url: str) -> None:
    """``close()`` wakes this end's own blocked ``recv_frame`` with ``TransportClosed``;
    later calls raise ``TransportClosed`` too."""
    with _pair(listen_url) as (a, b):
        receiving = _Task("recv_frame on the closing end", a.recv_frame)
        time.sleep(SETTLE)
        a.close()
        _expect_error(receiving, WAKE_TIMEOUT, (TransportClosed,), "recv_frame blocked during close()")
        assert a.closed, "closed is False after close()"
        for name, call in (("recv_frame", a.recv_frame), ("send_frame", lambda: a.send_frame([b"x"]))):
            _expect_error(_Task(f"{name} after close", call), WAKE_TIMEOUT, (TransportClosed,),
                          f"{name} after close()")


def check_close_is_idempotent(listen_url: str) -> None:
    """``close`` and ``abort`` may be called any number of times, in any order."""
    with _pair(listen_url) as (a, b):
        assert not (a.closed or b.closed), "a new transport says it is closed"
        for t, calls in ((a, "close close abort close"), (b, "abort abort close")):
            steps = [getattr(t, name) for name in calls.split()]
            _Task(calls, lambda steps=steps: [step() for step in steps]).result(WAKE_TIMEOUT)
        assert a.closed and b.closed, "closed is False after close()/abort()"


def check_abort_never_blocks(listen_url: str, *, big: int = BIG, frames: int = 16) -> None:
    """``abort()`` returns at once even while a send is blocked on a peer that does not read;
    the blocked sender and the peer's reader both wake with a ``TransportError``.

    A transport may buffer a few whole frames (shared memory hands large ones over in
    segments of their own), but not without bound: one of ``frames`` sends must block."""
    size = max(big, 32 << 20)  # more than any ring or socket buffers
    with _pair(listen_url) as (a, b):
        payload = bytes(size)

        def send_all() -> None:
            for _ in range(frames):
                a.send_frame([payload])
        sending = _Task("sends to a peer that does not read", send_all)
        time.sleep(SETTLE)
        assert not sending.done, (f"{frames} frames of {size} bytes were sent to a peer that "
                                  "reads nothing, without blocking")
        aborting = _Task("abort", a.abort)
        aborting.result(WAKE_TIMEOUT / 2)
        _expect_error(sending, WAKE_TIMEOUT, (TransportError,), "send_frame blocked during abort()")
        receiving = _Task("recv_frame on the aborted peer",
                          lambda: [b.recv_frame() for _ in range(frames + 1)])
        _expect_error(receiving, WAKE_TIMEOUT, (TransportError,), "recv_frame of a half-sent frame")


def check_max_frame(listen_url: str, *, size: int = 8 << 20, limit: int = 1024) -> None:
    """A frame longer than the receiver's ``max_frame`` raises ``TransportBroken`` (naming the
    length and the limit) without allocating room for it, and aborts the transport."""
    with _pair(listen_url) as (a, b):
        b.max_frame = limit
        _transfer(a, b, [[bytes(limit)]], "a frame at the limit")
        payload = bytes(size)
        tracemalloc.start()
        try:
            sending = _Task("send an oversized frame", a.send_frame, [payload])
            error = _expect_error(_Task("receive an oversized frame", b.recv_frame), STEP_TIMEOUT,
                                  (TransportBroken,), f"a {size}-byte frame over max_frame={limit}")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert str(size) in str(error) and str(limit) in str(error), (
            f"the error should name the length {size} and the limit {limit}: {error}")
        assert peak < size // 4, f"{peak} bytes were allocated while refusing a {size}-byte frame"
        assert b.closed, "the transport is still open after refusing an oversized frame"
        _expect_error(_Task("recv_frame after refusing", b.recv_frame), WAKE_TIMEOUT, (TransportError,),
                      "recv_frame after an oversized frame")
        sending.wait(STEP_TIMEOUT)  # ends either way; it must only not hang


# -- peer death -----------------------------------------------------------------------------

def _peer_main(url: str) -> None:
    """Child side of ``check_peer_death``: connect, send one frame, wait until stdin closes."""
    t = transport.connect(url, STEP_TIMEOUT)
    t.max_frame = DEFAULT_MAX_FRAME
    t.send_frame([b"hello from %d" % os.getpid()])
    sys.stdin.buffer.read()  # EOF when the parent closes the pipe or dies: never outlive it
    t.close()


def _start_peer(address: str) -> subprocess.Popen[bytes]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    code = "import sys; from pydist.testing import _peer_main; _peer_main(sys.argv[1])"
    return subprocess.Popen([sys.executable, "-c", code, address], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _accept_from(listener: transport.Listener, child: subprocess.Popen[bytes]) -> Transport:
    """The child's connection; fails at once (with its stderr) if the child exits first."""
    accepting = _Task("accept the child's connection", listener.accept)
    deadline = time.monotonic() + STEP_TIMEOUT
    while not accepting.done:
        if child.poll() is not None or time.monotonic() > deadline:
            listener.close()
            accepting.discard()
            child.kill()
            stderr = child.communicate(timeout=STEP_TIMEOUT)[1].decode(errors="replace")
            raise AssertionError(f"the child (exit status {child.returncode}) did not connect:\n{stderr}")
        time.sleep(0.01)
    return accepting.result(0)


def check_peer_death(listen_url: str) -> None:
    """A peer killed with SIGKILL wakes a blocked ``recv_frame`` with ``TransportBroken`` or
    ``TransportClosed`` within a second; a later ``send_frame`` raises a ``TransportError``."""
    listener = transport.listen(listen_url)
    child = _start_peer(listener.address)
    t: Transport | None = None
    try:
        t = _accept_from(listener, child)
        t.max_frame = DEFAULT_MAX_FRAME
        hello = bytes(_Task("receive the child's frame", t.recv_frame).result(STEP_TIMEOUT))
        assert hello == b"hello from %d" % child.pid, f"unexpected first frame {hello!r}"
        receiving = _Task("recv_frame while the peer is killed", t.recv_frame)
        time.sleep(SETTLE)
        child.kill()
        _expect_error(receiving, WAKE_TIMEOUT, (TransportBroken, TransportClosed),
                      "recv_frame when the peer was killed")
        _expect_error(_Task("send_frame to a dead peer", t.send_frame, [b"anyone?"]), WAKE_TIMEOUT,
                      (TransportError,), "send_frame after the peer was killed")
    finally:
        listener.close()
        if t is not None:
            t.abort()
        child.kill()
        child.communicate(timeout=STEP_TIMEOUT)  # reaps it and closes its pipes


CHECKS: list[Callable[[str], None]] = [
    check_ordering, check_frame_sizes, check_multipart_frames, check_concurrent_senders,
    check_simultaneous_big_sends, check_close_wakes_peer, check_close_wakes_self,
    check_close_is_idempotent, check_abort_never_blocks, check_max_frame, check_peer_death,
]


def check_transport(listen_url: str, *, big: int = BIG) -> None:
    """Run every check in ``CHECKS`` against the scheme of ``listen_url``; ``big`` is the size
    of the largest frames sent."""
    for check in CHECKS:
        kwargs = {"big": big} if "big" in inspect.signature(check).parameters else {}
        check(listen_url, **kwargs)
