"""Sans-IO framing, message encoding and the authenticated hello.

Frame layout (every transport, every direction)::

    +----------------------+---------------------------+
    | length: u64 LE       | payload: `length` bytes   |
    +----------------------+---------------------------+

``length`` is checked against the receiver's current limit before anything is allocated:
``HELLO_MAX_FRAME`` until the hello succeeds, ``DEFAULT_MAX_FRAME`` afterwards.

Message payload layout (all integers little-endian; offsets from the payload start)::

    0   magic u16 = 0x5044 ('PD')    2  version u8 = PROTOCOL_VERSION   3  kind tag u8 (TAGS)
    4   response_oid.whence u32      8  response_oid.id u64
    16  notify_oid.whence u32        20 notify_oid.id u64
    28  body_len u64                 36 nbuffers u32
    40  nbuffers x u64: the length of each out-of-band buffer
    40 + 8*nbuffers: body (body_len bytes: the pickle of the message's fields as a tuple)
    then each buffer, each starting at the next multiple of BUFFER_ALIGN (8) after the
    part before it; the gap is zero bytes. Nothing follows the last buffer.

The header is fixed and validated before the body is touched, so a body that fails to
unpickle can still be answered (``BodyDecodeError`` carries the header). With the 8-byte
frame header in front, a payload placed at an aligned address keeps every buffer 8-byte
aligned, so numpy arrays decode in place, without a copy.

The hello (before it, nothing is unpickled and frames are at most ``HELLO_MAX_FRAME``)::

    1. both sides send  HELLO1 = b"PDHELLO1" | version u8 | role u8 (b"D" dial, b"A" accept)
                                 | nonce (32 random bytes)
    2. on the peer's HELLO1, each sends  HELLO2 = b"PDHELLO2" | mac (32 bytes), where
         mac = HMAC-SHA256(cookie, b"pydist-hello" | version | own role | peer role
                                   | peer nonce | own nonce)
       (every field has a fixed length, so the concatenation is unambiguous)
    3. on the peer's HELLO2, each recomputes the peer's mac from its own view and compares.

The cookie never travels; fresh nonces on both sides make every proof good for one
session only, and the roles inside the mac stop a side's own frames being reflected to it.

Nothing here touches a socket, a thread or a clock: each transport reads a frame's header
and checks its length (``parse_frame_header``) its own way; messages and the hello are
bytes in, bytes out.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import operator
import pickle
import secrets
import struct
from collections.abc import Callable
from typing import Any, NoReturn

from ..errors import AuthenticationError, BodyDecodeError, DecodeError, SerializationError
from . import serialize
from .messages import KINDS, NULL_HEADER, NULL_RRID, TAGS, Message, MsgHeader, make_rrid

# Before the hello succeeds a peer may send only tiny frames; afterwards the limit is raised
# to DEFAULT_MAX_FRAME (the largest single message pydist accepts).
HELLO_MAX_FRAME = 4096
DEFAULT_MAX_FRAME = 1 << 40

# The bytes-like types frames are made of (the same as ``transport.Buffer``).
Buffer = bytes | bytearray | memoryview

__all__ = [
    "FRAME_HEADER", "FRAME_HEADER_SIZE", "frame_header", "parse_frame_header",
    "PROTOCOL_VERSION", "MESSAGE_MAGIC", "BUFFER_ALIGN", "encode_message", "decode_message",
    "Handshake",
]

FRAME_HEADER = struct.Struct("<Q")
FRAME_HEADER_SIZE = FRAME_HEADER.size


def frame_header(length: int) -> bytes:
    """The 8-byte header that precedes a payload of ``length`` bytes."""
    return FRAME_HEADER.pack(length)


def parse_frame_header(header: bytes | bytearray | memoryview, limit: int) -> int:
    """The payload length announced by ``header``; ``DecodeError`` if it exceeds ``limit``."""
    length: int = FRAME_HEADER.unpack(header)[0]
    if length > limit:
        raise DecodeError(f"frame of {length} bytes announced, over the limit of {limit} bytes")
    return length


def _byte_view(data: Buffer) -> memoryview:
    """A flat unsigned-byte view of any contiguous bytes-like object."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


# ---------------------------------------------------------------------------------------
# Messages

PROTOCOL_VERSION = 1
MESSAGE_MAGIC = 0x5044
BUFFER_ALIGN = 8
_HEAD = struct.Struct("<HBBIQIQQI")
_PADS = [bytes(n) for n in range(BUFFER_ALIGN)]


def _fields_getter(kind: type) -> Callable[[Message], tuple[Any, ...]]:
    """A fast function returning the fields of a message of ``kind`` as a tuple, in order."""
    names = [f.name for f in dataclasses.fields(kind)]
    if len(names) == 1:
        name = names[0]
        return lambda msg: (getattr(msg, name),)
    return operator.attrgetter(*names)  # a tuple when given several names


_GETTERS = {kind: (tag, _fields_getter(kind), len(dataclasses.fields(kind)))
            for kind, tag in TAGS.items()}
_NFIELDS = {tag: nfields for tag, _get, nfields in _GETTERS.values()}


def _pad(offset: int) -> int:
    """How many zero bytes bring ``offset`` to the next multiple of BUFFER_ALIGN."""
    return -offset % BUFFER_ALIGN


def encode_message(header: MsgHeader, msg: Message) -> list[Buffer]:
    """The parts of one message frame payload (without the frame header), for
    ``Transport.send_frame``. Out-of-band buffers are returned as views, not copies.

    Raises ``SerializationError`` if the body cannot be pickled or the header does not fit.
    """
    try:
        tag, get_fields, _n = _GETTERS[type(msg)]
    except KeyError:
        raise SerializationError(f"{type(msg).__qualname__} is not a message kind in messages.TAGS") from None
    body, pickle_buffers = serialize.dumps(get_fields(msg))
    buffers = [_raw(pb) for pb in pickle_buffers]
    r, n = header.response_oid, header.notify_oid
    try:
        head = _HEAD.pack(MESSAGE_MAGIC, PROTOCOL_VERSION, tag, r.whence, r.id, n.whence, n.id,
                          len(body), len(buffers))
    except struct.error as e:
        raise SerializationError(f"message header {header} does not fit the wire format "
                                 f"(whence u32, id u64): {e}") from e
    if not buffers:
        return [head, body]
    parts: list[Buffer] = [head + struct.pack(f"<{len(buffers)}Q", *[b.nbytes for b in buffers]), body]
    offset = _HEAD.size + 8 * len(buffers) + len(body)
    for buf in buffers:
        pad = _pad(offset)
        if pad:
            parts.append(_PADS[pad])
        parts.append(buf)
        offset += pad + buf.nbytes
    return parts


def _raw(pb: pickle.PickleBuffer) -> memoryview:
    """The bytes of an out-of-band buffer as a flat view; a copy only if not contiguous."""
    try:
        return pb.raw()
    except BufferError:
        return memoryview(memoryview(pb).tobytes(order="A"))


def decode_message(frame: Buffer) -> tuple[MsgHeader, Message]:
    """Parse one message frame payload. Out-of-band buffers are views of ``frame``.

    Raises ``DecodeError`` for a malformed frame, and its subclass ``BodyDecodeError``
    (carrying the header and kind) when only the body fails to unpickle.
    """
    view = _byte_view(frame)
    header, tag, body_at, body_len, spans = _parse_head(view)
    kind = KINDS[tag]
    buffers = [view[start:end] for start, end in spans]
    try:
        fields = serialize.loads(view[body_at:body_at + body_len], buffers)
    except KeyboardInterrupt:
        raise
    except BaseException as e:   # SystemExit from a __reduce__ too: it is the message's failure
        raise BodyDecodeError(f"the body of a {kind.__name__} could not be unpickled: "
                              f"{type(e).__name__}: {e}", header, kind) from e
    if type(fields) is not tuple or len(fields) != _NFIELDS[tag]:
        got = f"{len(fields)} fields" if type(fields) is tuple else type(fields).__name__
        raise BodyDecodeError(f"the body of a {kind.__name__} holds {got}, expected a tuple of "
                              f"{_NFIELDS[tag]} fields", header, kind)
    return header, kind(*fields)


def _parse_head(view: memoryview) -> tuple[MsgHeader, int, int, int, list[tuple[int, int]]]:
    """Validate the fixed header and every length against the frame size (no allocation
    that depends on an unchecked length): header, tag, body offset and length, buffer spans."""
    total = len(view)
    if total < _HEAD.size:
        raise DecodeError(f"message frame of {total} bytes is shorter than the {_HEAD.size}-byte header")
    magic, version, tag, rw, rid, nw, nid, body_len, nbuf = _HEAD.unpack_from(view)
    if magic != MESSAGE_MAGIC:
        raise DecodeError(f"bad message magic 0x{magic:04x}, expected 0x{MESSAGE_MAGIC:04x}: not a pydist message")
    if version != PROTOCOL_VERSION:
        raise DecodeError(f"message of protocol version {version}; this process speaks version {PROTOCOL_VERSION}")
    if tag not in KINDS:
        raise DecodeError(f"unknown message kind tag {tag}")
    body_at = _HEAD.size + 8 * nbuf
    if body_at + body_len > total:
        raise DecodeError(f"message announces {nbuf} buffers and a {body_len}-byte body, "
                          f"more than the {total}-byte frame holds")
    spans = []
    offset = body_at + body_len
    for length in struct.unpack_from(f"<{nbuf}Q", view, _HEAD.size) if nbuf else ():
        offset += _pad(offset)
        spans.append((offset, offset + length))
        offset += length
        if offset > total:
            raise DecodeError(f"message buffer lengths exceed the {total}-byte frame")
    if offset != total:
        raise DecodeError(f"message frame has {total - offset} bytes after its last part")
    return _header(rw, rid, nw, nid), tag, body_at, body_len, spans


def _header(rw: int, rid: int, nw: int, nid: int) -> MsgHeader:
    """A MsgHeader from its wire fields, sharing the null ids (most messages have one)."""
    if rw == rid == nw == nid == 0:
        return NULL_HEADER
    response = make_rrid((rw, rid)) if rw or rid else NULL_RRID
    notify = make_rrid((nw, nid)) if nw or nid else NULL_RRID
    return MsgHeader(response, notify)


# ---------------------------------------------------------------------------------------
# The authenticated hello

_HELLO1 = b"PDHELLO1"
_HELLO2 = b"PDHELLO2"
_MAC_CONTEXT = b"pydist-hello"
_NONCE_SIZE = 32
_MAC_SIZE = hashlib.sha256().digest_size
_ROLES = {"dial": b"D", "accept": b"A"}
_ROLE_NAMES = {code: name for name, code in _ROLES.items()}
_HELLO1_SIZE = len(_HELLO1) + 2 + _NONCE_SIZE
_HELLO2_SIZE = len(_HELLO2) + _MAC_SIZE


class Handshake:
    """One side of the hello: mutual HMAC-SHA256 proof of the cluster cookie.

    Send ``first_frame()`` at once; pass each hello frame from the peer to ``receive``,
    sending back whatever it returns. When ``done`` is true the peer is authenticated.
    Every failure raises ``AuthenticationError``, after which the handshake stays failed.
    """

    def __init__(self, cookie: str, role: str, *, nonce: bytes | None = None) -> None:
        if not isinstance(cookie, str):
            raise TypeError(f"the cluster cookie must be a str, not {type(cookie).__name__}")
        if role not in _ROLES:
            raise ValueError(f"hello role must be 'dial' or 'accept', not {role!r}")
        nonce = secrets.token_bytes(_NONCE_SIZE) if nonce is None else bytes(nonce)
        if len(nonce) != _NONCE_SIZE:
            raise ValueError(f"a hello nonce has {_NONCE_SIZE} bytes, not {len(nonce)}")
        self._key = cookie.encode("utf-8")
        self._nonce = nonce
        self.role = role
        self.peer_role: str | None = None
        self._peer_nonce: bytes | None = None
        self.done = False
        self._failed: str | None = None

    def first_frame(self) -> bytes:
        """The payload of the first hello frame: magic, version, role, nonce."""
        return _HELLO1 + bytes([PROTOCOL_VERSION]) + _ROLES[self.role] + self._nonce

    def receive(self, frame: Buffer) -> bytes | None:
        """Take the peer's next hello frame: after its first, the proof frame to send back;
        after its proof, ``None`` (and ``done`` is set)."""
        if self._failed is not None:
            raise AuthenticationError(f"the hello already failed: {self._failed}")
        if self.done:
            self._fail("a hello frame arrived after the hello completed")
        data = bytes(_byte_view(frame)[:HELLO_MAX_FRAME + 1])
        if self._peer_nonce is None:
            peer_role, peer_nonce = self._take_first(data)
            return _HELLO2 + self._mac(self.role, peer_role, peer_nonce, self._nonce)
        self._take_proof(data)
        return None

    def _take_first(self, data: bytes) -> tuple[str, bytes]:
        """Check the peer's first frame; remember and return its role and nonce."""
        if data.startswith(_HELLO2):
            self._fail("the peer sent its proof before its first hello frame")
        if not data.startswith(_HELLO1):
            self._fail("the peer did not send a pydist hello (bad magic): another program or protocol?")
        if len(data) != _HELLO1_SIZE:
            self._fail(f"the peer's first hello frame has {len(data)} bytes, expected {_HELLO1_SIZE}")
        version, role, nonce = data[8], data[9:10], data[10:]
        if version != PROTOCOL_VERSION:
            self._fail(f"the peer speaks protocol version {version}, this process speaks "
                       f"version {PROTOCOL_VERSION}: run the same pydist version on both sides")
        if role not in _ROLE_NAMES:
            self._fail(f"the peer's hello names an unknown role {role!r}")
        if _ROLE_NAMES[role] == self.role:
            self._fail(f"the peer's hello has this side's own role ({self.role!r}): a reflected hello")
        if hmac.compare_digest(nonce, self._nonce):
            self._fail("the peer's hello carries this side's own nonce: a reflected hello")
        self.peer_role, self._peer_nonce = _ROLE_NAMES[role], nonce
        return self.peer_role, nonce

    def _take_proof(self, data: bytes) -> None:
        """Check the peer's proof against the mac it must have computed."""
        if data.startswith(_HELLO1):
            self._fail("the peer sent a second first hello frame instead of its proof")
        if not data.startswith(_HELLO2):
            self._fail("the peer's hello proof has a bad magic")
        if len(data) != _HELLO2_SIZE:
            self._fail(f"the peer's hello proof has {len(data)} bytes, expected {_HELLO2_SIZE}")
        assert self.peer_role is not None and self._peer_nonce is not None
        expected = self._mac(self.peer_role, self.role, self._nonce, self._peer_nonce)
        if not hmac.compare_digest(data[len(_HELLO2):], expected):
            self._fail("hello proof is wrong: the peer does not know the cluster cookie")
        self.done = True

    def _mac(self, sender: str, receiver: str, receiver_nonce: bytes, sender_nonce: bytes) -> bytes:
        """The proof ``sender`` sends ``receiver``: the receiver's challenge comes first."""
        msg = (_MAC_CONTEXT + bytes([PROTOCOL_VERSION]) + _ROLES[sender] + _ROLES[receiver]
               + receiver_nonce + sender_nonce)
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def _fail(self, reason: str) -> NoReturn:
        self._failed = reason
        raise AuthenticationError(f"hello failed ({self.role} side): {reason}")
