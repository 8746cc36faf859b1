"""The frame format: every field of a real frame damaged, and the specific error each damage gives.

Offsets (docs/frame.md): magic 0-3, version 4, codec id 5, dtype id 6, ndim 7,
param count 8, reserved 9-11, payload length 12-19, then shape, params, the
checksum and the payload. A reader checks length for the fixed part, magic,
version, counts, total length, checksum, then codec id and dtype, then the
codec's parameters and payload length.
"""

from __future__ import annotations

import struct

import pytest
import torch
import xxhash

from kvstore.compression import (
    CODECS,
    BadMagicError,
    BadParamsError,
    ChecksumError,
    FrameError,
    TruncatedFrameError,
    UnknownCodecError,
    UnsupportedVersionError,
    codec_of,
    decode,
    get_codec,
)
from kvstore.compression.frame import (
    DTYPE_IDS,
    FRAME_VERSION,
    MAGIC,
    MAX_NDIM,
    MAX_PARAMS,
    header_size,
    pack_frame,
    parse_frame,
)
from kvstore.compression.registry import CODEC_CLASSES

FIXED = 20  # magic .. payload length
VERSION, CODEC, DTYPE, NDIM, PCOUNT, RESERVED, PAYLOAD_LEN = 4, 5, 6, 7, 8, 9, 12
SHAPE = (2, 2, 9, 2, 16)


def kv(shape=SHAPE, dtype=torch.float16, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def frame_of(spec: str = "kivi4", x: torch.Tensor | None = None) -> bytearray:
    return get_codec(spec).encode(kv() if x is None else x)


def start_of_payload(frame: bytes) -> int:
    return header_size(frame[NDIM], frame[PCOUNT])


def refresh_checksum(frame: bytearray) -> bytearray:
    """Recompute the checksum after editing a header field, as ``pack_frame`` computes it."""
    start = start_of_payload(frame)
    digest = xxhash.xxh3_64()
    digest.update(memoryview(frame)[:start - 8])
    digest.update(memoryview(frame)[start:])
    struct.pack_into("<Q", frame, start - 8, digest.intdigest())
    return frame


def edited(frame: bytearray, offset: int, value: int, fmt: str = "<B", fix: bool = True) -> bytearray:
    copy = bytearray(frame)
    struct.pack_into(fmt, copy, offset, value)
    return refresh_checksum(copy) if fix else copy


def set_param(frame: bytearray, index: int, value: int) -> bytearray:
    ndim = frame[NDIM]
    return edited(frame, FIXED + 8 * (ndim + index), value, "<q")


def rebuilt(frame: bytes, *, codec_id=None, dtype=None, shape=None, params=None, payload=None) -> bytearray:
    """The frame with some fields replaced, written (with a good checksum) by ``pack_frame``."""
    header, body = parse_frame(frame)
    return pack_frame(header.codec_id if codec_id is None else codec_id,
                      header.dtype if dtype is None else dtype,
                      header.shape if shape is None else shape,
                      header.params if params is None else params,
                      [bytes(body) if payload is None else payload])


def refused(frame: object, error: type[FrameError]) -> None:
    """``frame`` is refused with ``error`` by the registry and by a codec; an ``out`` given alongside
    (where the frame's header would accept it) is left as it was."""
    with pytest.raises(error):
        decode(frame)
    for name in ("raw", "kivi4"):  # a codec instance refuses it too (a codec error if it is not its own)
        with pytest.raises(FrameError):
            get_codec(name).decode(frame)
    try:
        header = parse_frame(frame)[0]
        fits = header.shape == SHAPE and header.dtype == torch.float16
    except FrameError:
        fits = True  # refused before out is looked at
    if fits:
        out = torch.full(SHAPE, 5.0, dtype=torch.float16)
        with pytest.raises(error):
            decode(frame, out=out)
        assert bool((out == 5).all()), "a refused frame wrote into out"


# -- a good frame ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CODECS))
def test_a_good_frame_parses_to_what_was_written(name):
    x = kv()
    codec = get_codec(name)
    frame = codec.encode(x)
    assert bytes(frame[:4]) == MAGIC and frame[VERSION] == FRAME_VERSION
    assert frame[CODEC] == codec.codec_id and frame[DTYPE] == DTYPE_IDS[torch.float16]
    assert frame[NDIM] == 5 and frame[PCOUNT] == len(codec.params())
    assert bytes(frame[RESERVED:RESERVED + 3]) == b"\0\0\0"
    header, payload = parse_frame(frame)
    assert header.codec_id == codec.codec_id and header.dtype == torch.float16
    assert header.shape == SHAPE and header.params == codec.params()
    assert header.numel == x.numel()
    assert header.payload_len == payload.nbytes == len(frame) - header_size(5, len(codec.params()))
    assert struct.unpack_from("<Q", frame, PAYLOAD_LEN)[0] == header.payload_len
    assert struct.unpack_from("<5Q", frame, FIXED) == SHAPE
    assert refresh_checksum(bytearray(frame)) == frame  # the checksum is computed as documented
    for kind in (bytes, bytearray, memoryview):  # read-only buffers decode too
        assert decode(kind(frame)).shape == x.shape


def test_header_sizes():
    assert header_size(5, 0) == 68
    assert header_size(5, 1) == 76  # int8
    assert header_size(5, 4) == 100  # kivi
    assert header_size(0, 0) == 28
    assert header_size(MAX_NDIM, MAX_PARAMS) == 28 + 8 * 24


def test_error_classes_are_value_errors():
    for error in (BadMagicError, UnsupportedVersionError, UnknownCodecError, TruncatedFrameError,
                  ChecksumError, BadParamsError):
        assert issubclass(error, FrameError) and issubclass(error, ValueError)


# -- magic, version ----------------------------------------------------------------------


@pytest.mark.parametrize("offset", range(4))
def test_bad_magic(offset):
    frame = bytearray(frame_of())
    frame[offset] ^= 0x20
    refused(frame, BadMagicError)
    refused(refresh_checksum(frame), BadMagicError)


@pytest.mark.parametrize("data", [b"", b"X", b"KVSB" + bytes(100), b"\0" * 200, b"PK\x03\x04" + bytes(60)])
def test_not_a_frame_at_all(data):
    refused(data, BadMagicError)


@pytest.mark.parametrize("version", [0, 2, 255])
@pytest.mark.parametrize("fix", [True, False], ids=["checksum-fixed", "checksum-stale"])
def test_other_versions_are_refused_before_the_checksum(version, fix):
    frame = edited(frame_of(), VERSION, version, fix=fix)
    refused(frame, UnsupportedVersionError)


# -- codec id, dtype id --------------------------------------------------------------------


@pytest.mark.parametrize("codec_id", [6, 99, 255])
def test_unknown_codec_id(codec_id):
    assert codec_id not in CODEC_CLASSES
    frame = edited(frame_of(), CODEC, codec_id)
    parse_frame(frame)  # a sound frame of a codec this kvstore does not have
    refused(frame, UnknownCodecError)
    for name in CODECS:
        with pytest.raises(UnknownCodecError):
            get_codec(name).decode(frame)
    # without the checksum fixed, it is damage
    refused(edited(frame_of(), CODEC, codec_id, fix=False), ChecksumError)


def test_codec_id_of_another_known_codec():
    """A kivi frame relabelled raw: the payload length does not match the shape, so it is refused."""
    frame = rebuilt(frame_of("kivi4"), codec_id=0, params=())
    refused(frame, BadParamsError)
    frame = edited(frame_of("int8"), CODEC, 1)  # int8's one param is not zstd's two
    refused(frame, BadParamsError)
    frame = edited(frame_of("kivi4"), CODEC, 1)  # nor are kivi's four
    refused(frame, BadParamsError)


@pytest.mark.parametrize("dtype_id", [0, 14, 200])
def test_unknown_dtype_id(dtype_id):
    assert dtype_id not in DTYPE_IDS.values()
    frame = edited(frame_of(), DTYPE, dtype_id)
    refused(frame, UnknownCodecError)
    with pytest.raises(UnknownCodecError):
        parse_frame(frame)
    refused(edited(frame_of(), DTYPE, dtype_id, fix=False), ChecksumError)


def test_dtype_id_of_another_width_is_refused_by_the_codec():
    """A kivi fp16 frame relabelled fp32: its scales would be 4 bytes, so the payload is too short."""
    frame = edited(frame_of("kivi4"), DTYPE, DTYPE_IDS[torch.float32])
    refused(frame, BadParamsError)
    frame = edited(frame_of("raw"), DTYPE, DTYPE_IDS[torch.float32])
    refused(frame, BadParamsError)


def test_dtype_id_of_the_same_width_reinterprets_raw_bytes():
    """raw trusts the dtype in the frame: fp16 bytes relabelled bf16 decode as those bits in bf16."""
    x = kv()
    frame = edited(frame_of("raw", x), DTYPE, DTYPE_IDS[torch.bfloat16])
    y = decode(frame)
    assert y.dtype == torch.bfloat16 and torch.equal(y.view(torch.int16), x.view(torch.int16))


# -- counts and lengths ---------------------------------------------------------------------


@pytest.mark.parametrize("ndim, fix", [(MAX_NDIM + 1, True), (MAX_NDIM + 1, False), (100, True), (255, False)])
def test_too_many_dims(ndim, fix):
    refused(edited(frame_of(), NDIM, ndim, fix=fix), BadParamsError)


@pytest.mark.parametrize("count", [MAX_PARAMS + 1, 255])
def test_too_many_params(count):
    refused(edited(frame_of(), PCOUNT, count, fix=False), BadParamsError)


@pytest.mark.parametrize("ndim", [0, 4, 6, MAX_NDIM])
def test_other_ndim_changes_the_header_length(ndim):
    refused(edited(frame_of(), NDIM, ndim, fix=False), TruncatedFrameError)


@pytest.mark.parametrize("delta", [1, -1, 8, -8, 1 << 40])
def test_payload_length_that_does_not_match(delta):
    frame = frame_of()
    length = struct.unpack_from("<Q", frame, PAYLOAD_LEN)[0]
    refused(edited(frame, PAYLOAD_LEN, length + delta, "<Q", fix=False), TruncatedFrameError)
    refused(edited(frame, PAYLOAD_LEN, length + delta, "<Q", fix=True), TruncatedFrameError)


def test_truncated_frames():
    frame = bytes(frame_of())
    head = start_of_payload(frame)
    for length in (3, 4, 10, FIXED - 1, FIXED, FIXED + 1, head - 1, head, head + 1, len(frame) - 1):
        refused(frame[:length], TruncatedFrameError)
    refused(frame[:0], BadMagicError)
    refused(frame[:2], TruncatedFrameError)  # b"KV": the start of a frame
    refused(b"KX", BadMagicError)
    refused(frame + b"\0", TruncatedFrameError)
    refused(frame + frame, TruncatedFrameError)


# -- checksum -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("name", list(CODECS))
def test_a_flipped_payload_bit_is_a_checksum_error(name, where):
    frame = bytearray(frame_of(name))
    start = start_of_payload(frame)
    at = {"first": start, "middle": (start + len(frame)) // 2, "last": len(frame) - 1}[where]
    frame[at] ^= 0x10
    refused(frame, ChecksumError)


def test_flipped_bits_in_shape_params_reserved_and_checksum():
    frame = frame_of("kivi4")
    start = start_of_payload(frame)
    for at in (RESERVED, RESERVED + 2, FIXED, FIXED + 39, FIXED + 40, start - 9, start - 8, start - 1,
               CODEC, DTYPE):
        damaged = bytearray(frame)
        damaged[at] ^= 0x01
        refused(damaged, ChecksumError)


def test_every_single_bit_flip_is_refused_with_the_documented_error():
    """Exhaustive: each bit of a small frame flipped; nothing decodes, and each field gives its own error."""
    frame = frame_of("kivi4", kv((1, 2, 3, 1, 4), torch.float16))
    start = start_of_payload(frame)
    for at in range(len(frame)):
        for bit in range(8):
            damaged = bytearray(frame)
            damaged[at] ^= 1 << bit
            if at < 4:
                expected = BadMagicError
            elif at == VERSION:
                expected = UnsupportedVersionError
            elif at in (NDIM, PCOUNT):
                expected = BadParamsError if damaged[NDIM] > MAX_NDIM or damaged[PCOUNT] > MAX_PARAMS \
                    else TruncatedFrameError
            elif PAYLOAD_LEN <= at < FIXED:
                expected = TruncatedFrameError
            else:
                expected = ChecksumError
            with pytest.raises(expected):
                decode(damaged)
    assert start < len(frame)


# -- parameters and payload the codec refuses -----------------------------------------------


@pytest.mark.parametrize("spec, index, value", [
    ("kivi4", 0, 0),  # bits
    ("kivi4", 0, 9),
    ("kivi4", 1, 0),  # group
    ("kivi4", 2, -1),  # residual
    ("kivi4", 3, 20),  # zstd
    ("int8", 0, -1),
    ("zstd", 0, 0),  # level
    ("zstd", 1, 2),  # planes
    ("rq3", 0, 0),  # bits
    ("rq3", 1, -5),  # seed
])
def test_bad_params_written_with_a_good_checksum(spec, index, value):
    frame = set_param(frame_of(spec), index, value)
    parse_frame(frame)  # the frame itself is sound
    refused(frame, BadParamsError)
    with pytest.raises(BadParamsError):
        get_codec(spec).decode(frame)
    with pytest.raises(BadParamsError):
        codec_of(frame)


@pytest.mark.parametrize("name", list(CODECS))
def test_wrong_number_of_params(name):
    frame = frame_of(name)
    params = parse_frame(frame)[0].params
    every = codec_of(frame)[0].PARAMS  # optional trailing parameters (written only when set) may be present
    refused(rebuilt(frame, params=params + (0,) * (len(every) - len(params) + 1)), BadParamsError)
    if params:
        refused(rebuilt(frame, params=params[:-1]), BadParamsError)


@pytest.mark.parametrize("name", list(CODECS))
def test_payload_shorter_or_longer_than_the_params_imply(name):
    frame = frame_of(name)
    body = bytes(parse_frame(frame)[1])
    refused(rebuilt(frame, payload=body[:-1]), BadParamsError)
    if name != "zstd":  # zstd's payload length is not implied by the shape (zstandard ignores trailing bytes)
        refused(rebuilt(frame, payload=body + b"\0"), BadParamsError)
    refused(rebuilt(frame, payload=b""), BadParamsError)


@pytest.mark.parametrize("name", ["zstd", "int8:zstd=3", "kivi2:zstd=1", "rq4:zstd=3"])
def test_zstd_payload_that_does_not_decompress(name):
    frame = frame_of(name)
    refused(rebuilt(frame, payload=b"\x28\xb5\x2f\xfd" + bytes(20)), BadParamsError)
    refused(rebuilt(frame, payload=b"not zstd at all"), BadParamsError)


def test_zstd_payload_of_the_wrong_size():
    import zstandard

    x = kv()
    frame = frame_of("zstd", x)
    short = zstandard.ZstdCompressor().compress(x.view(torch.uint8).numpy().tobytes()[:-2])
    refused(rebuilt(frame, payload=short), BadParamsError)
    frame = frame_of("kivi4:zstd=3", x)
    body = zstandard.ZstdDecompressor().decompress(bytes(parse_frame(frame)[1]))
    refused(rebuilt(frame, payload=zstandard.ZstdCompressor().compress(body[:-1])), BadParamsError)


def test_shapes_a_codec_cannot_have():
    kivi = frame_of("kivi4")
    refused(rebuilt(kivi, shape=(2, 9, 2, 16, 1, 1)), BadParamsError)
    refused(rebuilt(kivi, shape=(36, 16)), BadParamsError)
    rq = frame_of("rq3")
    refused(rebuilt(rq, shape=(2, 2, 9, 2 * 16, 1)), BadParamsError)  # head dim 1
    refused(rebuilt(rq, shape=(2, 2, 9, 4, 16)), BadParamsError)  # more elements than the payload holds


def test_a_shape_with_more_elements_than_the_payload():
    frame = frame_of("raw")
    refused(rebuilt(frame, shape=(2, 2, 10, 2, 16)), BadParamsError)
    refused(rebuilt(frame, shape=(1 << 20,)), BadParamsError)


@pytest.mark.parametrize("shape", [(1 << 63,), (1 << 62,), (1 << 31, 1 << 31, 4), ((1 << 40) + 1,)])
def test_an_absurd_shape_is_refused_before_allocating(shape):
    """A sound frame whose shape promises more than any tensor: BadParamsError, not TypeError or a huge allocation."""
    for codec_id, params in ((0, ()), (2, (0,))):
        frame = pack_frame(codec_id, torch.float16, shape, params, [b"ab"])
        with pytest.raises(BadParamsError):
            decode(frame)


# -- empty tensors -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CODECS))
def test_frame_of_an_empty_tensor(name):
    x = torch.empty((2, 2, 0, 2, 16), dtype=torch.bfloat16)
    frame = get_codec(name).encode(x)
    head = header_size(5, len(get_codec(name).params()))
    assert len(frame) == head
    header, payload = parse_frame(frame)
    assert header.shape == x.shape and header.numel == 0 and payload.nbytes == 0
    assert decode(frame).shape == x.shape
    refused(bytes(frame[:-1]), TruncatedFrameError)
    refused(bytes(frame) + b"\0", TruncatedFrameError)
    damaged = bytearray(frame)
    damaged[-1] ^= 0x80  # the checksum's last byte
    refused(damaged, ChecksumError)


def test_pack_frame_refuses_what_it_cannot_write():
    with pytest.raises(ValueError, match="dtype"):
        pack_frame(0, torch.bool, (1,), (), [b"\0"])
    with pytest.raises(ValueError, match="dims"):
        pack_frame(0, torch.uint8, (1,) * (MAX_NDIM + 1), (), [b"\0"])
    with pytest.raises(ValueError, match="params"):
        pack_frame(0, torch.uint8, (1,), (0,) * (MAX_PARAMS + 1), [b"\0"])
