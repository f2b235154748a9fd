"""Hostile input: idle connections, lying length fields, truncated hellos, leaked secrets."""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest

import pydist as pd
from pydist import transport
from pydist.cluster.group import PGRP
from pydist.cluster.join import authenticate
from pydist.errors import AuthenticationError, TransportError


def tcp_address(pid: int) -> tuple[str, int]:
    url = next(a for a in PGRP.workers[pid].addresses if a.startswith("tcp://"))
    host, _, port = url.removeprefix("tcp://").rpartition(":")
    return host, int(port)


def test_two_hundred_idle_connections_do_not_lock_out_a_peer(fresh):
    a, b = fresh(2)
    host, port = tcp_address(a)
    idle = [socket.create_connection((host, port), timeout=5) for _ in range(200)]
    try:
        t0 = time.monotonic()
        t = transport.connect(f"tcp://{host}:{port}", 5)
        authenticate(t, pd.cluster_cookie(), "dial", timeout=5)
        assert time.monotonic() - t0 < 1.0
        t.abort()
        # and a real worker-to-worker connection to the besieged worker still forms
        assert pd.remotecall_fetch(lambda p: pd.remotecall_fetch(pd.myid, p), b, a) == a
    finally:
        for s in idle:
            s.close()
    assert pd.remotecall_fetch(pd.myid, a) == a


@pytest.mark.parametrize("length", [2**31, 2**63, 2**64 - 1])
def test_lying_length_before_the_hello_is_refused(fresh, length):
    (a,) = fresh(1)
    host, port = tcp_address(a)
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(struct.pack("<Q", length))
        s.settimeout(5)
        try:
            got = s.recv(1)
        except ConnectionResetError:
            got = b""
        assert got == b"" or got          # the worker hung up (or sent its own hello first)
    assert pd.remotecall_fetch(pd.myid, a) == a


@pytest.mark.parametrize("length", [2**31, 2**63, 2**64 - 1])
def test_lying_length_after_the_hello_is_refused_before_allocating(length):
    from pydist.testing import transport_pair
    recv_side, send_side = transport_pair("tcp://127.0.0.1:0")
    try:
        recv_side.max_frame = 1 << 30
        send_side.socket.sendall(struct.pack("<Q", length))
        with pytest.raises(TransportError, match="limit"):
            recv_side.recv_frame()
    finally:
        recv_side.abort()
        send_side.abort()


def test_hello_truncated_at_every_offset_is_refused(fresh):
    from pydist.wire.codec import Handshake, frame_header
    (a,) = fresh(1)
    host, port = tcp_address(a)
    first = Handshake("not-the-cookie", "dial").first_frame()
    wire = frame_header(len(first)) + first
    for cut in range(len(wire)):
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(wire[:cut])
    # the worker still serves its master
    assert pd.remotecall_fetch(pd.myid, a) == a


def test_a_hello_replayed_from_another_connection_fails(fresh):
    (a,) = fresh(1)
    host, port = tcp_address(a)
    t = transport.connect(f"tcp://{host}:{port}", 5)
    with pytest.raises(AuthenticationError):
        authenticate(t, "someone-else's-cookie", "dial", timeout=5)
    t.abort()


def test_no_cookie_in_any_worker_cmdline_or_environment(fresh):
    pids = fresh(2)
    cookie = pd.cluster_cookie().encode()
    for p in pids:
        ospid = pd.remotecall_fetch(os.getpid, p)
        with open(f"/proc/{ospid}/cmdline", "rb") as f:
            assert cookie not in f.read()
        with open(f"/proc/{ospid}/environ", "rb") as f:
            assert cookie not in f.read()


def test_listeners_are_on_loopback_unless_asked(fresh):
    pids = fresh(2)
    for p in pids:
        for url in PGRP.workers[p].addresses:
            if url.startswith("tcp://"):
                assert url.startswith("tcp://127.0.0.1:"), url
    import psutil
    for p in pids:
        ospid = pd.remotecall_fetch(os.getpid, p)
        for conn in psutil.Process(ospid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                assert conn.laddr.ip == "127.0.0.1", conn
