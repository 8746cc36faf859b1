"""Unit tests of the wire protocol's codecs (``kvstore/protocol.py``): no server, no sockets."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.protocol import (FLAG_ERROR, FLAG_REPLY, HEADER, HEADER_BYTES, MAGIC, MAX_KEY_BYTES, MISSING,
                              SUPPORTED_VERSIONS, U64, VERSION, Header, Op, ProtocolError, PutResult, ServerError,
                              Status, Welcome, check_key, choose_version, pack_hello, pack_json, pack_keys,
                              put_item_header, unpack_hello, unpack_json, unpack_keys)

u8 = st.integers(0, 255)
u16 = st.integers(0, (1 << 16) - 1)
u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)
keys = st.binary(min_size=1, max_size=MAX_KEY_BYTES)


# -- constants: what docs/protocol.md fixes -----------------------------------------------------------------------

def test_constants_follow_the_spec():
    assert MAGIC == b"KVSP" and VERSION == 1 and VERSION in SUPPORTED_VERSIONS
    assert HEADER_BYTES == HEADER.size == 32
    assert (FLAG_REPLY, FLAG_ERROR) == (1, 2)
    assert MISSING == 2 ** 64 - 1 and MAX_KEY_BYTES == 64
    assert [(op.name, op.value) for op in Op] == [("HELLO", 1), ("PING", 2), ("EXISTS_PREFIX", 3), ("GET", 4),
                                                  ("PUT", 5), ("DELETE", 6), ("STATS", 7), ("LIST", 8)]
    assert [s.value for s in Status] == list(range(11))
    assert Status.TOO_LARGE == 5 and Status.NOT_AUTHENTICATED == 8 and Status.INTERNAL == 10
    assert [r.value for r in (PutResult.STORED, PutResult.PRESENT, PutResult.REJECTED, PutResult.INVALID)] == [0, 1, 2, 3]


def test_the_spec_example_ping_frame():
    """docs/protocol.md section 6: PING, payload ``hi``, request id 7, and its reply."""
    expected = bytes.fromhex("4b565350 01 02 0000 0700000000000000 00000000 00000000 0200000000000000".replace(" ", ""))
    assert Header(Op.PING, 7, payload_len=2).pack() == expected
    reply = Header(Op.PING, 7, payload_len=2, flags=FLAG_REPLY).pack()
    assert reply == expected[:6] + b"\x01\x00" + expected[8:]


# -- Header ---------------------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, derandomize=True)
@given(opcode=u8, request_id=u64, count=u32, payload_len=u64, flags=u16, status=u32)
def test_header_round_trip(opcode, request_id, count, payload_len, flags, status):
    header = Header(opcode, request_id, count, payload_len, flags, status)
    raw = header.pack()
    assert len(raw) == HEADER_BYTES and raw[:4] == MAGIC and raw[4] == VERSION
    assert Header.unpack(raw) == header
    assert Header.unpack(bytearray(raw)) == header
    assert Header.unpack(memoryview(raw)) == header
    # Field offsets are those of the spec's table.
    assert raw[5] == opcode
    assert struct.unpack_from("<H", raw, 6)[0] == flags
    assert struct.unpack_from("<Q", raw, 8)[0] == request_id
    assert struct.unpack_from("<I", raw, 16)[0] == count
    assert struct.unpack_from("<I", raw, 20)[0] == status
    assert struct.unpack_from("<Q", raw, 24)[0] == payload_len


def test_header_unpack_reads_only_the_first_32_bytes():
    raw = Header(Op.GET, 5, 2, 10).pack()
    assert Header.unpack(raw + b"trailing payload") == Header(Op.GET, 5, 2, 10)


@pytest.mark.parametrize("magic", [b"KVSB", b"kvsp", b"\0\0\0\0", b"PSVK"])
def test_header_with_a_bad_magic_is_malformed(magic):
    raw = magic + Header(Op.PING, 1).pack()[4:]
    with pytest.raises(ProtocolError) as info:
        Header.unpack(raw)
    assert info.value.status == Status.MALFORMED
    assert repr(magic) in str(info.value)


@pytest.mark.parametrize("version", [0, 2, 9, 255])
def test_header_with_an_unknown_version_is_unsupported(version):
    raw = Header(Op.PING, 1, version=version).pack()
    assert raw[4] == version
    with pytest.raises(ProtocolError) as info:
        Header.unpack(raw)
    assert info.value.status == Status.UNSUPPORTED_VERSION
    assert str(version) in str(info.value)


def test_bad_magic_is_reported_before_a_bad_version():
    raw = b"XXXX" + bytes([9]) + Header(Op.PING, 1).pack()[5:]
    with pytest.raises(ProtocolError) as info:
        Header.unpack(raw)
    assert info.value.status == Status.MALFORMED


# -- keys ---------------------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(keys, max_size=40))
def test_pack_keys_round_trip(key_list):
    packed = pack_keys(key_list)
    assert len(packed) == sum(1 + len(k) for k in key_list)
    assert unpack_keys(packed, len(key_list)) == key_list
    assert unpack_keys(memoryview(packed), len(key_list)) == key_list
    assert unpack_keys(bytearray(packed), len(key_list)) == key_list


def test_pack_keys_layout_and_types():
    assert pack_keys([b"ab", b"c"]) == b"\x02ab\x01c"
    assert pack_keys([]) == b""
    assert pack_keys([bytearray(b"xy")]) == b"\x02xy"
    assert pack_keys([b"k" * 64]) == b"\x40" + b"k" * 64
    assert unpack_keys(b"", 0) == []


@pytest.mark.parametrize("key", [b"", b"k" * 65, b"k" * 300, "text", None, 7])
def test_keys_outside_1_to_64_bytes_raise_value_error(key):
    with pytest.raises(ValueError):
        check_key(key)
    with pytest.raises(ValueError):
        pack_keys([b"fine", key])
    with pytest.raises(ValueError):
        put_item_header(key, 10)


@pytest.mark.parametrize("size", [1, 32, 33, 64])
def test_keys_of_1_to_64_bytes_are_accepted(size):
    check_key(b"k" * size)
    check_key(bytearray(size))


def _malformed(data: bytes, count: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        unpack_keys(data, count)
    assert info.value.status == Status.MALFORMED
    return info.value


def test_unpack_keys_with_too_few_keys_in_the_payload():
    packed = pack_keys([b"one", b"two"])
    assert "ended after 2" in str(_malformed(packed, 3))
    _malformed(b"", 1)


def test_unpack_keys_with_trailing_bytes():
    packed = pack_keys([b"one", b"two"])
    _malformed(packed, 1)  # the second key is left over
    _malformed(packed + b"\x00", 2)
    _malformed(packed + b"x", 2)
    _malformed(b"\x01a", 0)


@pytest.mark.parametrize("data", [
    b"\x00",  # a zero-length key
    b"\x00abc",
    b"\x41" + b"k" * 65,  # 65 bytes: over MAX_KEY_BYTES
    b"\xff" + b"k" * 255,
    b"\x05abc",  # length past the end of the payload
    b"\x02ab\x09abc",  # the second key runs past the end
])
def test_unpack_keys_with_a_bad_length_byte(data):
    count = 2 if data.startswith(b"\x02ab") else 1
    assert "bad length" in str(_malformed(data, count))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=80), st.integers(0, 10))
def test_unpack_keys_of_arbitrary_bytes_returns_exact_keys_or_raises_protocol_error(data, count):
    try:
        got = unpack_keys(data, count)
    except ProtocolError as exc:
        assert exc.status == Status.MALFORMED
    else:
        assert len(got) == count and pack_keys(got) == data


def test_put_item_header():
    assert put_item_header(b"key", 5) == b"\x03key" + U64.pack(5)
    assert put_item_header(b"k" * 64, 2 ** 64 - 1) == b"\x40" + b"k" * 64 + b"\xff" * 8


# -- HELLO and its reply ----------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(max_size=100), u16, u16)
def test_hello_round_trip(token, low, high):
    payload = pack_hello(token, low, high)
    assert payload[:6] == struct.pack("<HHH", low, high, len(token.encode()))
    assert unpack_hello(payload) == (low, high, token)


def test_hello_defaults_and_no_token():
    assert unpack_hello(pack_hello("secret-token")) == (min(SUPPORTED_VERSIONS), max(SUPPORTED_VERSIONS),
                                                        "secret-token")
    assert pack_hello(None) == struct.pack("<HHH", 1, 1, 0)
    assert unpack_hello(pack_hello(None)) == (1, 1, "")
    assert unpack_hello(pack_hello("")) == (1, 1, "")


@pytest.mark.parametrize("payload", [
    b"",
    b"\x01\x00\x01",  # shorter than the fixed part
    struct.pack("<HHH", 1, 1, 5) + b"abcd",  # token shorter than its length
    struct.pack("<HHH", 1, 1, 3) + b"abcd",  # bytes after the token
    struct.pack("<HHH", 1, 1, 2) + b"\xff\xfe",  # not UTF-8
])
def test_malformed_hello_payloads(payload):
    with pytest.raises(ProtocolError) as info:
        unpack_hello(payload)
    assert info.value.status == Status.MALFORMED


@settings(max_examples=200, deadline=None, derandomize=True)
@given(version=u16, frame=u64, max_keys=u32, inflight=u64, quota=u64,
       namespace=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True))
def test_welcome_round_trip(version, frame, max_keys, inflight, quota, namespace):
    welcome = Welcome(version, frame, max_keys, inflight, quota, namespace)
    raw = welcome.pack()
    assert len(raw) == 2 + 8 + 4 + 8 + 8 + 2 + len(namespace)
    assert Welcome.unpack(raw) == welcome
    assert Welcome.unpack(bytearray(raw)) == welcome


def test_welcome_with_a_non_ascii_namespace_and_short_data():
    welcome = Welcome(1, 1 << 20, 16, 2 << 20, 0, "équipe")
    assert Welcome.unpack(welcome.pack()) == welcome
    with pytest.raises(ProtocolError) as info:
        Welcome.unpack(welcome.pack()[:31])
    assert info.value.status == Status.MALFORMED


@pytest.mark.parametrize("low, high, expected", [
    (1, 1, 1), (0, 1, 1), (1, 5, 1), (0, 65535, 1),
    (2, 5, None), (0, 0, None), (1, 0, None), (5, 2, None), (2, 1, None),
])
def test_choose_version(low, high, expected):
    assert choose_version(low, high) == expected


# -- errors and JSON ----------------------------------------------------------------------------------------------------

def test_server_error_names_the_status():
    error = ServerError(Status.UNAUTHORIZED, "expected a valid token")
    assert error.status == Status.UNAUTHORIZED
    assert "UNAUTHORIZED" in str(error) and "expected a valid token" in str(error)
    assert isinstance(error, ConnectionError)
    odd = ServerError(99, "from the future")
    assert odd.status == 99 and "99" in str(odd)


def test_json_round_trip():
    value = {"namespace": "a", "blocks": {"hits_ram": 3}, "list": [1, 2.5, None, "x"]}
    raw = pack_json(value)
    assert unpack_json(raw) == value
    assert unpack_json(bytearray(raw)) == value
    assert raw == json.dumps(value, sort_keys=True).encode()
