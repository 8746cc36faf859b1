"""The cache server's wire protocol: frame header, opcodes, statuses and payload codecs.

Specified in ``docs/protocol.md``; the server (``kvstore/server``) and the
client (``kvstore/client.py``) both use this module, so the two cannot
drift apart. Everything is little-endian. A frame is a fixed 32-byte header
followed by ``payload_len`` bytes::

    magic        4s   b"KVSP"
    version      u8   protocol version of the frame (1)
    opcode       u8   Op
    flags        u16  FLAG_REPLY on replies, FLAG_ERROR on error replies
    request_id   u64  chosen by the client, echoed in the reply
    count        u32  keys or blocks in a request; a result count in a reply
    status       u32  0 in requests; Status in replies
    payload_len  u64  bytes that follow
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAGIC = b"KVSP"
VERSION = 1
# The versions this build speaks; HELLO picks the highest both sides know.
SUPPORTED_VERSIONS = (1,)
HEADER = struct.Struct("<4sBBHQIIQ")
HEADER_BYTES = HEADER.size
FLAG_REPLY = 1
FLAG_ERROR = 2
MAX_KEY_BYTES = 64
MAX_HELLO_BYTES = 4096  # a HELLO's payload; a server's max_frame_bytes is at least this
# A GET reply's size-table entry for a key that is not stored.
MISSING = (1 << 64) - 1
U8 = struct.Struct("<B")
U64 = struct.Struct("<Q")
_HELLO = struct.Struct("<HHH")
_WELCOME = struct.Struct("<HQIQQH")


class Op(enum.IntEnum):
    HELLO = 1
    PING = 2
    EXISTS_PREFIX = 3
    GET = 4
    PUT = 5
    DELETE = 6
    STATS = 7
    LIST = 8


class Status(enum.IntEnum):
    OK = 0
    MALFORMED = 1
    UNSUPPORTED_VERSION = 2
    UNAUTHORIZED = 3
    UNKNOWN_OPCODE = 4
    TOO_LARGE = 5
    TOO_MANY_KEYS = 6
    TOO_MANY_CONNECTIONS = 7
    NOT_AUTHENTICATED = 8
    SHUTTING_DOWN = 9
    INTERNAL = 10


class PutResult(enum.IntEnum):
    """Per-block outcome of a PUT, one byte each in the reply."""

    STORED = 0
    PRESENT = 1  # already stored: skipped
    REJECTED = 2  # larger than a frame, past the quota or the server's capacity, or its disk refusing writes
    INVALID = 3  # its integrity header does not match its key or bytes


class ProtocolError(Exception):
    """A frame or payload that does not follow the protocol; ``status`` is what the reply says."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status


class ServerError(ConnectionError):
    """The server answered with an error reply (and closed the connection)."""

    def __init__(self, status: int, message: str):
        name = Status(status).name if status in Status._value2member_map_ else str(status)
        super().__init__(f"server error {name}: {message}")
        self.status = status


@dataclass(frozen=True)
class Header:
    opcode: int
    request_id: int
    count: int = 0
    payload_len: int = 0
    flags: int = 0
    status: int = 0
    version: int = VERSION

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, self.opcode, self.flags, self.request_id, self.count,
                           self.status, self.payload_len)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> "Header":
        """Parse a header; ``ProtocolError`` if the magic or version is wrong."""
        magic, version, opcode, flags, request_id, count, status, payload_len = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ProtocolError(Status.MALFORMED, f"expected magic {MAGIC!r}, got {bytes(magic)!r}")
        if version not in SUPPORTED_VERSIONS:
            raise ProtocolError(Status.UNSUPPORTED_VERSION,
                                f"expected frame version in {list(SUPPORTED_VERSIONS)}, got {version}")
        return cls(opcode, request_id, count, payload_len, flags, status, version)


@dataclass(frozen=True)
class Welcome:
    """What HELLO's reply tells the client: the version chosen, the limits and its namespace."""

    version: int
    max_frame_bytes: int
    max_keys: int
    max_inflight_bytes: int
    quota_bytes: int  # 0: no quota
    namespace: str

    def pack(self) -> bytes:
        name = self.namespace.encode()
        return _WELCOME.pack(self.version, self.max_frame_bytes, self.max_keys, self.max_inflight_bytes,
                             self.quota_bytes, len(name)) + name

    @classmethod
    def unpack(cls, data: bytes) -> "Welcome":
        if len(data) < _WELCOME.size:
            raise ProtocolError(Status.MALFORMED, f"expected a HELLO reply of >= {_WELCOME.size} bytes, got {len(data)}")
        version, frame, keys, inflight, quota, name_len = _WELCOME.unpack_from(data)
        name = bytes(data[_WELCOME.size:_WELCOME.size + name_len]).decode("utf-8", "replace")
        return cls(version, frame, keys, inflight, quota, name)


def pack_hello(token: str | None, min_version: int = min(SUPPORTED_VERSIONS),
               max_version: int = max(SUPPORTED_VERSIONS)) -> bytes:
    raw = (token or "").encode()
    return _HELLO.pack(min_version, max_version, len(raw)) + raw


def unpack_hello(data: bytes) -> tuple[int, int, str]:
    """(min_version, max_version, token) of a HELLO request payload."""
    if len(data) < _HELLO.size:
        raise ProtocolError(Status.MALFORMED, f"expected a HELLO payload of >= {_HELLO.size} bytes, got {len(data)}")
    low, high, token_len = _HELLO.unpack_from(data)
    if len(data) != _HELLO.size + token_len:
        raise ProtocolError(Status.MALFORMED,
                            f"expected a HELLO payload of {_HELLO.size + token_len} bytes, got {len(data)}")
    try:
        token = bytes(data[_HELLO.size:]).decode()
    except UnicodeDecodeError:
        raise ProtocolError(Status.MALFORMED, "expected a UTF-8 token") from None
    return low, high, token


def choose_version(low: int, high: int) -> int | None:
    """The highest version in ``[low, high]`` this build speaks, or None."""
    common = [v for v in SUPPORTED_VERSIONS if low <= v <= high]
    return max(common) if common else None


def check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or not 1 <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"key: expected 1..{MAX_KEY_BYTES} bytes, got {key!r:.80}")


def pack_keys(keys: Sequence[bytes]) -> bytes:
    """Keys as ``u8 length + bytes`` each (EXISTS_PREFIX, GET, DELETE requests; LIST replies)."""
    if not keys:
        return b""
    size = len(keys[0])
    if 1 <= size <= MAX_KEY_BYTES and all(isinstance(k, bytes) and len(k) == size for k in keys):
        prefix = U8.pack(size)  # one length for every key: a chain of block keys (the common case)
        return prefix + prefix.join(keys)
    parts = []
    for key in keys:
        check_key(key)
        parts.append(U8.pack(len(key)))
        parts.append(bytes(key))
    return b"".join(parts)


def unpack_keys(data: bytes | memoryview, count: int) -> list[bytes]:
    """Exactly ``count`` keys filling ``data``; ``ProtocolError`` otherwise."""
    view = memoryview(data)
    if count and len(view) % count == 0:  # every key the same length: slice without a loop per byte
        stride = len(view) // count
        raw = bytes(view)
        if 2 <= stride <= 1 + MAX_KEY_BYTES and raw[::stride] == bytes([stride - 1]) * count:
            return [raw[i + 1:i + stride] for i in range(0, len(raw), stride)]
    keys = []
    pos = 0
    for _ in range(count):
        if pos >= len(view):
            raise ProtocolError(Status.MALFORMED, f"expected {count} keys, payload ended after {len(keys)}")
        size = view[pos]
        if not 1 <= size <= MAX_KEY_BYTES or pos + 1 + size > len(view):
            raise ProtocolError(Status.MALFORMED, f"key {len(keys)}: bad length {size} at offset {pos}")
        keys.append(bytes(view[pos + 1:pos + 1 + size]))
        pos += 1 + size
    if pos != len(view):
        raise ProtocolError(Status.MALFORMED, f"expected {count} keys in {pos} bytes, payload has {len(view)}")
    return keys


def put_item_header(key: bytes, blob_len: int) -> bytes:
    """What precedes each block of a PUT request: ``u8 key length, key, u64 blob length``."""
    check_key(key)
    return U8.pack(len(key)) + bytes(key) + U64.pack(blob_len)


def pack_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def unpack_json(data: bytes) -> Any:
    return json.loads(bytes(data).decode())
