"""Sans-IO framing, message encoding and the hello."""
from __future__ import annotations

import colorsys
import os.path
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydist.errors import AuthenticationError, BodyDecodeError, DecodeError, SerializationError
from pydist.transport import DEFAULT_MAX_FRAME, HELLO_MAX_FRAME
from pydist.wire.codec import (
    BUFFER_ALIGN,
    PROTOCOL_VERSION,
    Handshake,
    decode_message,
    encode_message,
    frame_header,
    parse_frame_header,
)
from pydist.wire.messages import (
    KINDS,
    NULL_HEADER,
    RRID,
    TAGS,
    CallFetchMsg,
    CallMsg,
    CallWaitMsg,
    IdentifySocketAckMsg,
    IdentifySocketMsg,
    JoinCompleteMsg,
    JoinPGRPMsg,
    MsgHeader,
    RemoteDoMsg,
    ResultMsg,
)

# The documented message header, written out independently of the codec.
HEAD = struct.Struct("<HBBIQIQQI")


# ---------------------------------------------------------------------------- frame headers

@pytest.mark.parametrize("length, max_frame", [
    (length, limit) for limit in (HELLO_MAX_FRAME, DEFAULT_MAX_FRAME)
    for length in (HELLO_MAX_FRAME + 1, 2**31, 2**63, 2**64 - 1) if length > limit
])
def test_hostile_length_refused(length, max_frame):
    with pytest.raises(DecodeError, match="limit"):
        parse_frame_header(frame_header(length), max_frame)


@pytest.mark.parametrize("length", [0, 1, HELLO_MAX_FRAME])
def test_length_within_the_limit_read_back(length):
    assert parse_frame_header(frame_header(length), HELLO_MAX_FRAME) == length


# ---------------------------------------------------------------------------- messages

HEADERS = [NULL_HEADER, MsgHeader(RRID(1, 2), RRID(3, 4)), MsgHeader(RRID(2**32 - 1, 2**64 - 1)),
           MsgHeader(notify_oid=RRID(7, 99))]

SAMPLES = [
    CallMsg(os.path.join, ("a", "b"), {}),
    CallFetchMsg(max, (1, 2), {"key": abs}),
    CallWaitMsg(lambda x: x * 2, (21,)),
    RemoteDoMsg(print, ("hi",), {"end": ""}),
    ResultMsg({"value": [1, 2.5, None]}),
    IdentifySocketMsg(3),
    IdentifySocketAckMsg(4),
    JoinPGRPMsg(2, ((3, ("tcp://127.0.0.1:9000",), "host"),), "all_to_all", True, False,
                ("/x",), "hk"),
    JoinCompleteMsg(8, 4242, "hk", "node1"),
]


def as_frame(parts) -> bytearray:
    """What the transport delivers: the parts concatenated (in a fresh, writable buffer)."""
    return bytearray(b"".join(bytes(p) for p in parts))


def test_every_kind_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(TAGS)


@pytest.mark.parametrize("header", HEADERS, ids=str)
@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_roundtrip(header, msg):
    got_header, got = decode_message(as_frame(encode_message(header, msg)))
    assert got_header == header and type(got) is type(msg)
    if isinstance(msg, CallWaitMsg):
        assert got.f(*got.args) == 42
    else:
        assert got == msg


def test_decode_accepts_bytes_and_memoryview():
    frame = bytes(as_frame(encode_message(HEADERS[1], SAMPLES[5])))
    assert decode_message(frame) == decode_message(memoryview(frame)) == (HEADERS[1], SAMPLES[5])


def test_layout_matches_the_documentation():
    header = MsgHeader(RRID(1, 2), RRID(3, 4))
    frame = as_frame(encode_message(header, IdentifySocketMsg(5)))
    fields = HEAD.unpack_from(frame)
    assert fields[:3] == (0x5044, PROTOCOL_VERSION, TAGS[IdentifySocketMsg])
    assert fields[3:7] == (1, 2, 3, 4)
    body_len, nbuf = fields[7:]
    assert nbuf == 0 and len(frame) == HEAD.size + body_len


def test_numpy_travels_out_of_band_zero_copy():
    arr = np.arange(10_001, dtype=np.float64)
    other = np.arange(7, dtype=np.uint8)
    parts = encode_message(NULL_HEADER, ResultMsg((arr, other)))
    views = [p for p in parts if isinstance(p, memoryview)]
    assert len(views) == 2
    assert np.shares_memory(np.frombuffer(views[0], np.uint8), arr)   # not copied
    assert sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts) < arr.nbytes + 500
    frame = as_frame(parts)
    base = np.frombuffer(frame, np.uint8)
    _, msg = decode_message(memoryview(frame))
    got, got_other = msg.value
    np.testing.assert_array_equal(got, arr)
    np.testing.assert_array_equal(got_other, other)
    assert np.shares_memory(got, base) and np.shares_memory(got_other, base)
    for a in (got, got_other):
        assert (a.ctypes.data - base.ctypes.data) % BUFFER_ALIGN == 0


def test_unknown_message_type_refused():
    with pytest.raises(SerializationError):
        encode_message(NULL_HEADER, object())  # type: ignore[arg-type]


def test_unpicklable_body_raises_serialization_error():
    import threading
    with pytest.raises(SerializationError, match="lock"):
        encode_message(NULL_HEADER, ResultMsg(threading.Lock()))


def test_header_out_of_range_refused():
    with pytest.raises(SerializationError):
        encode_message(MsgHeader(RRID(2**32, 1)), IdentifySocketMsg(1))


def explode():
    raise RuntimeError("refuses to load")


class Bomb:
    def __reduce__(self):
        return (explode, ())


def test_body_that_raises_gives_body_decode_error():
    header = MsgHeader(RRID(5, 6), RRID(7, 8))
    frame = as_frame(encode_message(header, CallFetchMsg(len, (Bomb(),))))
    with pytest.raises(BodyDecodeError) as info:
        decode_message(frame)
    assert info.value.header == header and info.value.kind is CallFetchMsg
    assert isinstance(info.value.__cause__, RuntimeError)


def test_body_naming_missing_module_gives_body_decode_error():
    header = MsgHeader(RRID(9, 10))
    frame = as_frame(encode_message(header, CallMsg(colorsys.rgb_to_hsv, (0, 0, 0))))
    assert frame.count(b"colorsys") == 1
    at = frame.index(b"colorsys")
    frame[at:at + 8] = b"colorsyz"
    with pytest.raises(BodyDecodeError) as info:
        decode_message(frame)
    assert info.value.header == header and info.value.kind is CallMsg
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def handmade(tag: int, body: bytes, header=(0, 0, 0, 0)) -> bytes:
    return HEAD.pack(0x5044, PROTOCOL_VERSION, tag, *header, len(body), 0) + body


@pytest.mark.parametrize("body", [(1, 2), (), "not a tuple"])
def test_wrong_field_count_gives_body_decode_error(body):
    import pickle
    frame = handmade(TAGS[IdentifySocketMsg], pickle.dumps(body), (1, 2, 0, 0))
    with pytest.raises(BodyDecodeError) as info:
        decode_message(frame)
    assert info.value.kind is IdentifySocketMsg and info.value.header == MsgHeader(RRID(1, 2))


@pytest.mark.parametrize("frame, words", [
    (b"", "shorter"),
    (handmade(1, b"")[:-1], "shorter"),
    (b"\x00\x00" + handmade(1, b"")[2:], "magic"),
    (handmade(1, b"")[:2] + bytes([PROTOCOL_VERSION + 1]) + handmade(1, b"")[3:], "version"),
    (handmade(0, b""), "tag"),
    (handmade(255, b""), "tag"),
    (handmade(1, b"") + b"x", "after"),
    (HEAD.pack(0x5044, PROTOCOL_VERSION, 1, 0, 0, 0, 0, 0, 2**32 - 1), "buffers"),
    (HEAD.pack(0x5044, PROTOCOL_VERSION, 1, 0, 0, 0, 0, 2**64 - 1, 0), "body"),
    (HEAD.pack(0x5044, PROTOCOL_VERSION, 1, 0, 0, 0, 0, 0, 1) + struct.pack("<Q", 2**64 - 1),
     "exceed"),
])
def test_bad_headers(frame, words):
    with pytest.raises(DecodeError, match=words) as info:
        decode_message(frame)
    assert not isinstance(info.value, BodyDecodeError)


def test_truncation_at_every_offset_is_decode_error():
    msg = ResultMsg((np.arange(5, dtype=np.int16), np.arange(3, dtype=np.int32)))
    frame = bytes(as_frame(encode_message(MsgHeader(RRID(1, 1)), msg)))
    for cut in range(len(frame)):
        with pytest.raises(DecodeError):
            decode_message(frame[:cut])


def test_corrupting_any_header_byte_is_decode_error_or_valid():
    frame = bytes(as_frame(encode_message(MsgHeader(RRID(1, 1)), ResultMsg(np.arange(3)))))
    nbuf = HEAD.unpack_from(frame)[-1]
    # Only the header: a corrupted pickle body is pickle's business (it may allocate a lot).
    for i in range(HEAD.size + 8 * nbuf):
        for value in (0, 0xFF, frame[i] ^ 1):
            bad = frame[:i] + bytes([value]) + frame[i + 1:]
            try:
                decode_message(bad)
            except DecodeError:
                pass


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_into_decode_message(data):
    with pytest.raises(DecodeError):
        decode_message(data)


# Random pickles without the PUT/LONG_BINPUT opcodes, whose random memo index makes pickle
# itself allocate (and clear) gigabytes: bodies come from authenticated peers only.
PICKLE_NOISE = st.lists(st.integers(0, 255).filter(lambda b: b not in b"pr"), max_size=100).map(bytes)


@settings(max_examples=500, deadline=None)
@given(tag=st.sampled_from(sorted(TAGS.values())), body=PICKLE_NOISE)
def test_arbitrary_body_is_body_decode_error(tag, body):
    try:
        decode_message(handmade(tag, body))
    except BodyDecodeError as e:
        assert e.kind is KINDS[tag]


# ---------------------------------------------------------------------------- hello

def handshake_pair(cookie_a="sesame", cookie_b="sesame"):
    return Handshake(cookie_a, "dial"), Handshake(cookie_b, "accept")


def run_hello(a: Handshake, b: Handshake, order: str = "ab") -> None:
    """Deliver each side's frames to the other; ``order`` says who processes first."""
    fa, fb = a.first_frame(), b.first_frame()
    first, second = (a, b) if order == "ab" else (b, a)
    frames = {a: fb, b: fa}
    proofs = {}
    proofs[first] = first.receive(frames[first])
    proofs[second] = second.receive(frames[second])
    assert second.receive(proofs[first]) is None
    assert first.receive(proofs[second]) is None


@pytest.mark.parametrize("order", ["ab", "ba"])
@pytest.mark.parametrize("cookie", ["sesame", "", "ünïcødé ✓ cookie", "x" * 1000])
def test_hello_succeeds(order, cookie):
    a, b = handshake_pair(cookie, cookie)
    assert not a.done and a.peer_role is None
    run_hello(a, b, order)
    assert a.done and b.done
    assert (a.role, a.peer_role, b.role, b.peer_role) == ("dial", "accept", "accept", "dial")


def test_hello_frames_small_and_fresh():
    a1, a2 = Handshake("c", "dial"), Handshake("c", "dial")
    assert len(a1.first_frame()) < HELLO_MAX_FRAME
    assert a1.first_frame() != a2.first_frame()           # fresh nonces
    assert a1.first_frame().startswith(b"PDHELLO1")


def test_fixed_nonces_are_deterministic():
    a = Handshake("c", "dial", nonce=b"\x01" * 32)
    b = Handshake("c", "accept", nonce=b"\x02" * 32)
    assert a.first_frame() == b"PDHELLO1" + bytes([PROTOCOL_VERSION]) + b"D" + b"\x01" * 32
    proof = a.receive(b.first_frame())
    assert proof.startswith(b"PDHELLO2") and len(proof) == 40
    assert Handshake("c", "dial", nonce=b"\x01" * 32).receive(b.first_frame()) == proof


@pytest.mark.parametrize("cookie_a, cookie_b", [
    ("sesame", "sesamE"), ("sesame", "sesame!"), ("sesame", "sesam"), ("", "sesame"),
    ("sesame", ""), ("a", "b"),
])
def test_wrong_cookie_fails_on_both_sides(cookie_a, cookie_b):
    a, b = handshake_pair(cookie_a, cookie_b)
    pa = a.receive(b.first_frame())
    pb = b.receive(a.first_frame())
    with pytest.raises(AuthenticationError, match="cookie"):
        a.receive(pb)
    with pytest.raises(AuthenticationError, match="cookie"):
        b.receive(pa)
    assert not a.done and not b.done


def test_reflected_first_frame():
    a = Handshake("sesame", "dial")
    with pytest.raises(AuthenticationError, match="reflected"):
        a.receive(a.first_frame())


def test_same_nonce_is_reflection():
    a = Handshake("sesame", "dial", nonce=b"n" * 32)
    b = Handshake("sesame", "accept", nonce=b"n" * 32)
    with pytest.raises(AuthenticationError, match="nonce"):
        a.receive(b.first_frame())


def test_same_role_refused():
    a, b = Handshake("sesame", "accept"), Handshake("sesame", "accept")
    with pytest.raises(AuthenticationError, match="role"):
        a.receive(b.first_frame())


def test_reflected_proof():
    a, b = handshake_pair()
    pa = a.receive(b.first_frame())
    with pytest.raises(AuthenticationError, match="cookie"):
        a.receive(pa)


def test_replayed_session_fails():
    a1, b1 = handshake_pair()
    fb1 = b1.first_frame()
    pa1 = a1.receive(fb1)
    pb1 = b1.receive(a1.first_frame())
    b1.receive(pa1)
    # An eavesdropper replays b1's frames to a new dialer, and a1's to a new acceptor.
    a2 = Handshake("sesame", "dial")
    a2.receive(fb1)
    with pytest.raises(AuthenticationError, match="cookie"):
        a2.receive(pb1)
    b2 = Handshake("sesame", "accept")
    b2.receive(a1.first_frame())
    with pytest.raises(AuthenticationError, match="cookie"):
        b2.receive(pa1)


def test_wrong_version_names_both():
    a, b = handshake_pair()
    frame = bytearray(b.first_frame())
    frame[8] = 7
    with pytest.raises(AuthenticationError, match=f"version 7.*version {PROTOCOL_VERSION}"):
        a.receive(frame)


@pytest.mark.parametrize("frame", [b"GET / HTTP/1.1\r\n\r\n", b"", b"PDHELLO9" + bytes(34)])
def test_wrong_magic(frame):
    with pytest.raises(AuthenticationError):
        Handshake("sesame", "dial").receive(frame)


def test_unknown_role_byte():
    frame = bytearray(Handshake("sesame", "accept").first_frame())
    frame[9] = ord("X")
    with pytest.raises(AuthenticationError, match="role"):
        Handshake("sesame", "dial").receive(frame)


def test_truncated_and_extended_hello_frames():
    b = Handshake("sesame", "accept")
    fb = b.first_frame()
    for cut in range(len(fb)):
        with pytest.raises(AuthenticationError):
            Handshake("sesame", "dial").receive(memoryview(fb)[:cut])
    with pytest.raises(AuthenticationError):
        Handshake("sesame", "dial").receive(fb + b"\x00")
    a = Handshake("sesame", "dial")
    pb = b.receive(a.first_frame())
    for cut in range(len(pb) + 1):
        fresh = Handshake("sesame", "dial", nonce=a._nonce)
        fresh.receive(fb)
        with pytest.raises(AuthenticationError):
            fresh.receive(pb[:cut] if cut < len(pb) else pb + b"\x00")
    a.receive(fb)
    assert a.receive(pb) is None and a.done


def test_proof_before_first_frame():
    a, b = handshake_pair()
    pb = b.receive(a.first_frame())
    with pytest.raises(AuthenticationError, match="proof before"):
        Handshake("sesame", "dial").receive(pb)


def test_second_first_frame_instead_of_proof():
    a, b = handshake_pair()
    a.receive(b.first_frame())
    with pytest.raises(AuthenticationError):
        a.receive(b.first_frame())


def test_frames_after_done_and_after_failure():
    a, b = handshake_pair()
    run_hello(a, b)
    with pytest.raises(AuthenticationError, match="after"):
        a.receive(b.first_frame())
    c = Handshake("sesame", "dial")
    with pytest.raises(AuthenticationError):
        c.receive(b"junk")
    with pytest.raises(AuthenticationError, match="already failed"):
        c.receive(b.first_frame())


def test_cookie_must_be_str():
    with pytest.raises(TypeError):
        Handshake(b"sesame", "dial")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Handshake(None, "dial")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Handshake("sesame", "server")
    with pytest.raises(ValueError):
        Handshake("sesame", "dial", nonce=b"short")


@settings(max_examples=500, deadline=None)
@given(first=st.binary(max_size=80), second=st.binary(max_size=80))
def test_arbitrary_hello_frames_only_authentication_error(first, second):
    a = Handshake("sesame", "dial")
    with pytest.raises(AuthenticationError):
        a.receive(first)
        a.receive(second)
