"""Every transport passes the conformance suite; plus what is particular to TCP."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
from testkit import live_children, subprocess_env

from pydist import transport
from pydist.errors import TransportBroken, TransportClosed, TransportError
from pydist.net.address import TcpAddress, format_tcp_url, is_loopback, parse_tcp_url
from pydist.net.tcp import TcpListener, TcpTransport, connect_tcp
from pydist.testing import CHECKS, THREAD_PREFIX, _accept_from, _Task, transport_pair
from pydist.transport import DEFAULT_MAX_FRAME

URLS = ["tcp://127.0.0.1:0"]
try:
    import pydist.shm.transport  # noqa: F401  (registers shm://)
    URLS.append("shm://")
except ImportError:
    pass


@pytest.fixture(autouse=True)
def no_leaks():
    """Each test leaves no child process (the worker server, which lives as long as this
    process, aside) and no thread of the conformance suite behind."""
    yield
    deadline = time.monotonic() + 2.0
    while True:
        children = live_children()
        threads = [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]
        if not children and not threads:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"leaked child processes {children} / threads {threads}")
        time.sleep(0.02)


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_conformance(check, url):
    check(url)


# A peer that sends five frames, then dies without a goodbye once told (stdin closes).
SEND_THEN_DIE = """
import os, sys
from pydist import transport
t = transport.connect(sys.argv[1], 30)
t.max_frame = 1 << 20
for i in range(5):
    t.send_frame([b"frame %d" % i])
sys.stdin.buffer.read()
os._exit(0)
"""


def _flood(t) -> None:
    """Send 64 KiB frames until sending fails (it blocks once the peer stops reading)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        t.send_frame([bytes(64 << 10)])


@pytest.mark.parametrize("url", URLS)
def test_a_failed_send_leaves_what_the_dead_peer_sent_to_be_read(url):
    """The peer sends frames and dies before they are read, while a send blocks on it (it
    never reads): the failed sends are the first to learn of the death. What the peer sent
    before dying is still received, then the end."""
    listener = transport.listen(url)
    child = subprocess.Popen([sys.executable, "-c", SEND_THEN_DIE, listener.address],
                             env=subprocess_env(), stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t = None
    try:
        t = _accept_from(listener, child)
        t.max_frame = DEFAULT_MAX_FRAME
        flooding = _Task("send until the peer's buffers are full", _flood, t)
        time.sleep(0.3)
        assert not flooding.done, "the peer's buffers never filled"
        child.stdin.close()
        assert child.wait(30) == 0, child.stderr.read()
        assert isinstance(flooding.wait(10), TransportError)
        error = _Task("send to the dead peer", t.send_frame, [b"anyone?"]).wait(5)
        assert isinstance(error, TransportError), error
        got = [bytes(_Task("receive", t.recv_frame).result(5)) for _ in range(5)]
        assert got == [b"frame %d" % i for i in range(5)]
        error = _Task("receive past the end", t.recv_frame).wait(5)
        assert isinstance(error, (TransportBroken, TransportClosed)), error
    finally:
        listener.close()
        if t is not None:
            t.abort()
        child.kill()
        child.wait(30)
        child.stderr.close()


@pytest.fixture
def pair():
    a, b = transport_pair("tcp://127.0.0.1:0")
    yield a, b
    a.abort()
    b.abort()


# -- addresses ------------------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("tcp://127.0.0.1:9000", ("127.0.0.1", 9000)),
    ("tcp://[::1]:9000", ("::1", 9000)),
    ("tcp://[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
    ("tcp://localhost:65535", ("localhost", 65535)),
    ("tcp://node-7.cluster_a.example.org.:22", ("node-7.cluster_a.example.org.", 22)),
    ("tcp://:9000", ("127.0.0.1", 9000)),
])
def test_parse_good(url, expected):
    assert parse_tcp_url(url) == TcpAddress(*expected)


@pytest.mark.parametrize("url, expected", [
    ("tcp://", ("127.0.0.1", 0)),
    ("tcp://:0", ("127.0.0.1", 0)),
    ("tcp://10.0.0.5", ("10.0.0.5", 0)),
    ("tcp://[::]", ("::", 0)),
])
def test_parse_listen_defaults(url, expected):
    assert parse_tcp_url(url, listen=True) == TcpAddress(*expected)


@pytest.mark.parametrize("url", [
    "127.0.0.1:9000", "http://127.0.0.1:80", "tcp:/127.0.0.1:1", "tcp://127.0.0.1",
    "tcp://127.0.0.1:", "tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://127.0.0.1:-1",
    "tcp://127.0.0.1:http", "tcp://127.0.0.1:9000/path", "tcp://user@host:1", "tcp://::1:9000",
    "tcp://[::1:9000", "tcp://[]:1", "tcp://[127.0.0.1]:1", "tcp://[::1]x:1", "tcp://256.1.1.1:1",
    "tcp://10.1:1", "tcp://bad host:1", "tcp://-bad.example:1", "tcp://a..b:1", "tcp://١٢:1",
    "tcp://h:１２",
])
def test_parse_bad(url):
    with pytest.raises(ValueError) as info:
        parse_tcp_url(url)
    assert repr(url) in str(info.value)


def test_format_round_trip():
    for host, port in [("127.0.0.1", 1), ("::1", 2), ("example.org", 3)]:
        assert parse_tcp_url(format_tcp_url(host, port)) == (host, port)
    assert format_tcp_url("::1", 80) == "tcp://[::1]:80"
    assert TcpAddress("::1", 80).url == str(TcpAddress("::1", 80)) == "tcp://[::1]:80"


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True),
    ("::ffff:127.0.0.1", True), ("localhost", True), ("LOCALHOST.", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("example.org", False), ("", False),
])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


# -- listening and connecting ------------------------------------------------------------------

@pytest.mark.parametrize("url", ["tcp://", "tcp://:0", "tcp://127.0.0.1:0"])
def test_default_bind_is_loopback(url):
    with transport.listen(url) as listener:
        host, port = parse_tcp_url(listener.address)
        assert host == "127.0.0.1" and port > 0
        assert listener._sock.getsockname()[0] == "127.0.0.1"


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = TcpListener("tcp://[::1]:0")
    except TransportBroken as e:
        pytest.skip(f"IPv6 loopback unavailable: {e}")
    with listener:
        assert listener.address.startswith("tcp://[::1]:")
        with connect_tcp(listener.address, timeout=5) as t:
            assert t.peer == listener.address


def test_connect_to_closed_port_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = format_tcp_url(*s.getsockname())
    start = time.monotonic()
    with pytest.raises(TransportBroken, match=url.replace("[", r"\[")) as info:
        transport.connect(url, timeout=5)
    assert time.monotonic() - start < 1.0
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_connect_timeout_names_address():
    # A listener whose backlog is full drops further SYNs, so the next connect gets no answer.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        url = format_tcp_url(*server.getsockname())
        filler = []
        try:
            start = time.monotonic()
            with pytest.raises(TransportBroken, match=rf"{url}: no answer within 0.3 s"):
                for _ in range(4):
                    filler.append(connect_tcp(url, timeout=0.3))
            assert time.monotonic() - start < 3.0
        finally:
            for t in filler:
                t.abort()


def test_connect_unresolvable_host():
    with pytest.raises(TransportBroken, match="no-such-host.invalid"):
        connect_tcp("tcp://no-such-host.invalid:1", timeout=5)


def test_listen_on_busy_port_names_address():
    with transport.listen("tcp://127.0.0.1:0") as first:
        with pytest.raises(TransportBroken, match=first.address):
            transport.listen(first.address)


def test_close_wakes_accept():
    listener = TcpListener("tcp://")
    result: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(listener.accept, result))
    thread.start()
    time.sleep(0.1)
    start = time.monotonic()
    listener.close()
    listener.close()
    thread.join(2.0)
    assert not thread.is_alive() and time.monotonic() - start < 0.3
    assert isinstance(result[0], TransportClosed)


def _catch(fn, into: list) -> None:
    try:
        fn()
    except BaseException as e:
        into.append(e)


# -- the connection -------------------------------------------------------------------------

def test_nodelay_peer_and_limits(pair):
    a, b = pair
    for t in (a, b):
        assert isinstance(t, TcpTransport) and isinstance(t, transport.Transport)
        assert t.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert t.fileno() == t.socket.fileno() >= 0
        assert t.socket.gettimeout() is None
    assert a.peer == format_tcp_url(*b.socket.getsockname()[:2])
    assert b.peer == format_tcp_url(*a.socket.getsockname()[:2])
    assert "open" in repr(a)


def test_new_transport_starts_at_hello_limit():
    with transport.listen("tcp://") as listener:
        with transport.connect(listener.address, 5) as t:
            assert t.max_frame == transport.HELLO_MAX_FRAME


def test_eof_mid_frame_is_broken():
    with transport.listen("tcp://") as listener:
        raw = socket.create_connection(parse_tcp_url(listener.address), timeout=5)
        t = listener.accept()
        raw.sendall(b"\x64" + bytes(7) + b"only ten..")  # announces 100 bytes, sends 10
        raw.close()
        with pytest.raises(TransportBroken, match=r"10 of 100 bytes") as info:
            t.recv_frame()
        assert t.peer in str(info.value) and t.closed
        with pytest.raises(TransportBroken):
            t.send_frame([b"x"])


def test_peer_close_then_send_is_closed(pair):
    a, b = pair
    b.close()
    with pytest.raises(TransportClosed):
        a.recv_frame()
    with pytest.raises(TransportClosed):
        a.send_frame([b"x"])


def test_unusual_buffers(pair):
    np = pytest.importorskip("numpy")
    a, b = pair
    fortran = np.asfortranarray(np.arange(24, dtype=np.int32).reshape(4, 6))
    a.send_frame([fortran, np.arange(5, dtype=np.float32)])
    assert bytes(b.recv_frame()) == fortran.tobytes(order="F") + np.arange(5, dtype=np.float32).tobytes()
    with pytest.raises(ValueError, match="part 1 is not a contiguous"):
        a.send_frame([b"ok", np.arange(10)[::2]])
    with pytest.raises(TypeError):
        a.send_frame(["text"])
    a.send_frame([b"still usable"])  # nothing was sent for the refused frames
    assert bytes(b.recv_frame()) == b"still usable"


def test_received_frames_are_writable_and_independent(pair):
    a, b = pair
    a.send_frame([b"first"])
    a.send_frame([b"second"])
    first, second = b.recv_frame(), b.recv_frame()
    first[0:1] = b"F"
    assert (bytes(first), bytes(second)) == (b"First", b"second")


def test_keyboard_interrupt_mid_frame_resumes(pair, monkeypatch):
    a, b = pair
    payload = bytes(range(256)) * 4096                      # 1 MiB, recognisable
    a.send_frame([payload])

    def interrupted(*args):
        raise KeyboardInterrupt

    real = b.socket
    calls = iter([real.recv_into, interrupted])
    monkeypatch.setattr(b, "_sock", type("S", (), {"recv_into": lambda self, *a: next(calls)(*a)})())
    with pytest.raises(KeyboardInterrupt):
        b.recv_frame()
    monkeypatch.setattr(b, "_sock", real)
    assert not b.closed                                      # the connection survives ...
    assert bytes(b.recv_frame()) == payload                  # ... and the frame resumes
    a.send_frame([b"next"])
    assert bytes(b.recv_frame()) == b"next"


def test_keyboard_interrupt_mid_send_finishes_the_frame(pair, monkeypatch):
    a, b = pair
    payload = bytes(range(256)) * 4096
    real = a.socket
    state = {"n": 0}

    class Flaky:
        def sendmsg(self, bufs, ancdata, flags):
            state["n"] += 1
            if state["n"] == 2:
                raise KeyboardInterrupt
            room, taken = 100_000, []
            for buf in bufs:
                mv = memoryview(buf)[:room]
                taken.append(mv)
                room -= len(mv)
                if not room:
                    break
            return real.sendmsg(taken, ancdata, flags)
    monkeypatch.setattr(a, "_sock", Flaky())
    got = []
    reader = threading.Thread(target=lambda: got.append(bytes(b.recv_frame())))
    reader.start()
    with pytest.raises(KeyboardInterrupt):
        a.send_frame([payload])
    reader.join(10)
    monkeypatch.setattr(a, "_sock", real)
    assert got == [payload]
    a.send_frame([b"after"])
    assert bytes(b.recv_frame()) == b"after"


def test_partial_sends_resume_without_losing_bytes(pair, monkeypatch):
    a, b = pair

    class Trickle:
        """Accepts at most 7777 bytes per sendmsg, as a socket may under signals or timeouts."""

        def __init__(self, sock: socket.socket) -> None:
            self.sock, self.calls = sock, 0

        def sendmsg(self, bufs, ancdata, flags):
            self.calls += 1
            room, taken = 7777, []
            for buf in bufs:
                piece = memoryview(buf)[:room]
                taken.append(piece)
                room -= len(piece)
                if not room:
                    break
            return self.sock.sendmsg(taken, ancdata, flags)

    trickle = Trickle(a.socket)
    monkeypatch.setattr(a, "_sock", trickle)
    parts = [bytes([i % 256]) * (i % 50) for i in range(1500)] + [bytes(range(256)) * 1000]
    a.send_frame(parts)
    assert bytes(b.recv_frame()) == b"".join(parts)
    assert trickle.calls > 10
