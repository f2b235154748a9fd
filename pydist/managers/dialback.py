"""Workers that dial back: the master listens, the worker connects (Slurm jobs, elastic workers).

Where a worker cannot be reached by its master (a batch node behind a scheduler, a container
started anywhere), the connection goes the other way. The story of one worker::

    worker                                           master (a ``DialIn`` listener)
    1. reads the cookie (stdin or a 0600 file)
    2. listens for its peers on the address that
       routes to the master (UDP "connect": no packet)
    3. connects to HOST:PORT  ----------------------> accepts (at most MAX_UNPROVEN hellos at once)
    4. the hello, as in every pydist connection  <--> the hello ("dial" side), with a deadline;
                                                     a wrong cookie: closed, logged, nothing read
    5. sends one contact frame: JSON (never  ------> reads it (length-checked), parses JSON:
       pickle) with its listening addresses           an ``Arrival`` (transport, addresses, info)
       and where it runs (host, pid, Slurm ids)       handed to the manager
    6. waits for JoinPGRPMsg, as a dialed worker <--- the usual join (``join_worker``), over the
       would (``serve_incoming``)                     connection the worker opened

From then on the connection is the worker's connection to its master, as if the master had
dialed it: its end (the master died) makes the worker exit, and so does a lapsed lease.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import transport as _transport
from ..cluster import deadlines
from ..cluster.join import HELLO_TIMEOUT, authenticate
from ..errors import AuthenticationError, DecodeError, TransportError
from ..net.address import format_tcp_url, parse_tcp_url

__all__ = ["Arrival", "DialIn", "dial_master", "route_to", "read_cookie_file", "write_cookie_file", "CONTACT_LIMIT",
           "SLURM_FIELDS"]

CONTACT_LIMIT = 16384      # bytes of the contact frame
MAX_UNPROVEN = 64          # connections in their hello at once; past it the oldest is dropped
SLURM_FIELDS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID",
                "SLURM_NODEID", "SLURMD_NODENAME", "SLURM_NTASKS")


@dataclass
class Arrival:
    """A worker that has proven the cookie and said where it listens; not joined yet."""

    transport: Any
    addresses: tuple[str, ...]
    info: dict[str, str] = field(default_factory=dict)

    @property
    def peer(self) -> str:
        return getattr(self.transport, "peer", "?")


# -- the master's side -------------------------------------------------------------------
class DialIn:
    """A listener for workers that dial in: runs the hello and reads the contact frame of
    each connection off the accept loop, then calls ``on_arrival``. ``close`` is idempotent."""

    def __init__(self, host: str, port: int, cookie: str,
                 on_arrival: Callable[[Arrival], None], what: str = "worker") -> None:
        self._cookie = cookie
        self._on_arrival = on_arrival
        self._what = what
        self._lock = threading.Lock()
        self._unproven: dict[int, Any] = {}   # id -> transport still in its hello, oldest first
        if _unspecified(host):
            raise ValueError(f"workers cannot dial {host!r}: name an address of this host "
                             f"that they can reach")
        self._listener = _transport.listen(format_tcp_url(host, port))
        self.address = self._listener.address.removeprefix("tcp://")
        self._closed = False
        threading.Thread(target=self._accept_loop, name="pydist-dialin", daemon=True).start()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._listener.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                t = self._listener.accept()
            except TransportError:
                return
            self._admit_unproven(t)
            threading.Thread(target=self._admit, args=(t,), name="pydist-dialin-hello",
                             daemon=True).start()

    def _admit_unproven(self, t: Any) -> None:
        """Past the cap, drop the oldest connection still in its hello: idle connections
        can delay a worker by one hello at most, never lock it out."""
        with self._lock:
            self._unproven[id(t)] = t
            victims = []
            while len(self._unproven) > MAX_UNPROVEN:
                victims.append(self._unproven.pop(next(iter(self._unproven))))
        for v in victims:
            v.abort()

    def _admit(self, t: Any) -> None:
        try:
            arrival = _read_arrival(t, self._cookie)
        except (AuthenticationError, TransportError, DecodeError, ValueError) as e:
            t.abort()
            # A wrong proof or a bad contact is worth a line; a dropped idle socket is not.
            if not self._closed and (isinstance(e, ValueError) or "refused" in str(e)):
                print(f"pydist: the {self._what} listener refused a connection from {t.peer}: {e}",
                      file=sys.stderr, flush=True)
            return
        finally:
            with self._lock:
                self._unproven.pop(id(t), None)
        if self._closed:
            t.abort()
            return
        self._on_arrival(arrival)


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False   # a host name


def _read_arrival(t: Any, cookie: str) -> Arrival:
    """The hello, then the contact frame (JSON, never unpickled), each with a deadline."""
    authenticate(t, cookie, "dial")
    deadline = deadlines.after(HELLO_TIMEOUT, t.abort)
    try:
        frame = t.recv_frame()
    finally:
        deadline.cancel()
    if len(frame) > CONTACT_LIMIT:
        raise ValueError(f"its contact frame has {len(frame)} bytes (limit {CONTACT_LIMIT})")
    try:
        contact = json.loads(bytes(frame).decode("utf-8"))
        addresses = tuple(str(a) for a in contact["addresses"])
        info = {str(k): str(v) for k, v in dict(contact.get("info", {})).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"its contact frame is not a pydist contact ({e})") from None
    for a in addresses:
        if a.startswith("tcp://"):
            parse_tcp_url(a)
    return Arrival(t, addresses, info)


# -- the worker's side -------------------------------------------------------------------
def route_to(url: str) -> str:
    """This host's address on the route to ``url``'s host (no packet is sent)."""
    target = parse_tcp_url(url)
    family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
    infos = socket.getaddrinfo(target.host, target.port or 9, family, socket.SOCK_DGRAM)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(infos[0][4])
        address: str = s.getsockname()[0]
        return address


def dial_master(url: str, cookie: str, addresses: tuple[str, ...],
                timeout: float = 30.0) -> Any:
    """Connect to the master at ``url``, prove the cookie and send the contact frame; the
    proven transport (serve it with ``join.serve_incoming``). Retries a refused connection
    until ``timeout`` (the master may still be opening its listener)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            t = _transport.connect(url, max(1.0, deadline - time.monotonic()))
            break
        except TransportError as e:
            if time.monotonic() > deadline:
                raise TransportError(f"could not reach the master at {url}: {e}") from None
            time.sleep(0.2)
    authenticate(t, cookie, "accept")
    info = {k: os.environ[k] for k in SLURM_FIELDS if k in os.environ}
    info.update(host=socket.gethostname(), pid=str(os.getpid()))
    t.send_frame([json.dumps({"addresses": list(addresses), "info": info}).encode()])
    return t


def read_cookie_file(path: str) -> str:
    """The cookie in ``path``: the first line of a file only its owner can read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise SystemExit(f"pydist-worker: cannot open the cookie file {path!r}: {e}") from None
    with os.fdopen(fd) as f:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise SystemExit(f"pydist-worker: the cookie file {path!r} has mode "
                             f"{stat.S_IMODE(mode):04o}; others may read it: chmod 600 it")
        cookie = f.readline().strip()
    if not cookie:
        raise SystemExit(f"pydist-worker: the cookie file {path!r} is empty")
    return cookie


def write_cookie_file(path: str, cookie: str) -> None:
    """Write ``cookie`` to a new file at ``path`` with mode 0600 (never an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(cookie + "\n")
