"""BlockEncoding: how a tier below host RAM writes a block (raw bytes or a frame) and what it reads back."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_same_kv, make_kv, tiny_layout
from kvstore.compression import RawCodec, get_codec
from kvstore.blockformat import ENCODING_RAW
from kvstore.compression.frame import MAGIC, FrameError, pack_frame, parse_frame
from kvstore.compression.registry import codec_of
from kvstore.compression.stored import CORRUPT, INTACT, OTHER_CODEC, OTHER_SIZE, BlockEncoding, frame_encoding

LAYOUT = tiny_layout()  # [2, 2, 16, 2, 16] fp16 blocks of 4096 bytes


def fresh(tokens: int = 16, layout=LAYOUT) -> torch.Tensor:
    return torch.full(layout.shape(tokens), 9.0, dtype=layout.dtype)


def written_as(payload: object) -> int:
    """The header encoding a writer gives ``payload`` (a test helper: the store never looks at the bytes)."""
    try:
        codec, _, _ = codec_of(payload)
    except FrameError:
        return ENCODING_RAW
    return frame_encoding(codec)


def read(encoding: BlockEncoding, payload: object, tokens: int = 16,
         header: int | None = None) -> tuple[str, torch.Tensor]:
    out = fresh(tokens)
    return encoding.decode_into(payload, out, written_as(payload) if header is None else header), out


def decode_new(encoding: BlockEncoding, payload: object, header: int | None = None) -> torch.Tensor | None:
    return encoding.decode_new(payload, written_as(payload) if header is None else header)


# -- raw --------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [None, RawCodec(), get_codec("raw")], ids=["none", "RawCodec", "spec"])
def test_raw_encoding_round_trip(codec):
    encoding = BlockEncoding(LAYOUT, codec)
    assert encoding.codec is None and encoding.name == "raw"
    block = make_kv(LAYOUT, 16)
    payload = encoding.encode(block)
    assert memoryview(payload).nbytes == LAYOUT.block_bytes
    assert bytes(memoryview(payload).cast("B")[:16]) == block.view(torch.uint8).numpy().tobytes()[:16]
    verdict, out = read(encoding, payload)
    assert verdict == INTACT
    assert_same_kv(out, block)


def test_raw_partial_block_and_strided_input():
    encoding = BlockEncoding(LAYOUT)
    kv = make_kv(LAYOUT, 40, seed=3)
    tail = kv[:, :, 32:40]  # a strided view: encoded by value
    payload = encoding.encode(tail)
    assert memoryview(payload).nbytes == 8 * LAYOUT.token_bytes
    verdict, out = read(encoding, payload, tokens=8)
    assert verdict == INTACT
    assert_same_kv(out, tail.contiguous())
    assert_same_kv(decode_new(encoding, payload), tail.contiguous())


def test_raw_bytes_of_another_length():
    encoding = BlockEncoding(LAYOUT)
    payload = encoding.encode(make_kv(LAYOUT, 8))
    verdict, out = read(encoding, payload, tokens=16)
    assert verdict == OTHER_SIZE
    # not a whole number of tokens, empty, or more than a block: damage
    assert read(encoding, bytes(100))[0] == CORRUPT
    assert read(encoding, b"")[0] == CORRUPT
    assert read(encoding, bytes(LAYOUT.block_bytes + LAYOUT.token_bytes))[0] == CORRUPT


# -- frames -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["kivi4", "kivi2:group=8", "rq3", "int8", "zstd", "zstd:level=5"])
def test_frame_of_the_tiers_codec_is_decoded(spec):
    codec = get_codec(spec)
    encoding = BlockEncoding(LAYOUT, codec)
    assert encoding.codec == codec and encoding.name == codec.name
    block = make_kv(LAYOUT, 16, seed=1)
    payload = encoding.encode(block)
    assert bytes(payload[:4]) == MAGIC
    assert len(payload) == len(codec.encode(block))
    verdict, out = read(encoding, payload)
    assert verdict == INTACT
    assert torch.equal(out, codec.decode(payload))
    if codec.lossless:
        assert_same_kv(out, block)
    else:
        assert not torch.equal(out, block)
        assert float((out.float() - block.float()).norm() / block.float().norm()) < 0.25


@pytest.mark.parametrize("spec", ["zstd", "zstd:level=19,planes=0", "raw"])
@pytest.mark.parametrize("tier", [None, "kivi4", "rq3", "zstd"])
def test_lossless_frames_are_decoded_by_every_tier(spec, tier):
    encoding = BlockEncoding(LAYOUT, get_codec(tier) if tier else None)
    block = make_kv(LAYOUT, 16, seed=2)
    verdict, out = read(encoding, get_codec(spec).encode(block))
    assert verdict == INTACT
    assert_same_kv(out, block)


@pytest.mark.parametrize("frame_spec, tier", [
    ("kivi4", None),
    ("kivi4", "zstd"),
    ("kivi4", "kivi2"),
    ("kivi4", "rq3"),
    ("kivi4", "kivi4:group=16"),  # same codec, other parameters: another codec for the tier
    ("kivi4:zstd=3", "kivi4"),
    ("rq3", "rq3:seed=1"),
    ("rq3", "int8"),
    ("int8", None),
])
def test_lossy_frame_of_another_codec_is_other_codec(frame_spec, tier):
    encoding = BlockEncoding(LAYOUT, get_codec(tier) if tier else None)
    payload = get_codec(frame_spec).encode(make_kv(LAYOUT, 16))
    verdict, out = read(encoding, payload)
    assert verdict == OTHER_CODEC
    assert bool((out == 9).all())  # untouched
    assert decode_new(encoding, payload) is None
    # the tier configured with that codec reads it
    assert read(BlockEncoding(LAYOUT, get_codec(frame_spec)), payload)[0] == INTACT


@pytest.mark.parametrize("spec", ["kivi4", "zstd", "rq3"])
def test_frame_of_another_shape_or_dtype_is_other_size(spec):
    encoding = BlockEncoding(LAYOUT, get_codec(spec))
    short = encoding.encode(make_kv(LAYOUT, 8))
    assert read(encoding, short, tokens=16)[0] == OTHER_SIZE
    verdict, out = read(encoding, short, tokens=8)
    assert verdict == INTACT
    other_dtype = get_codec(spec).encode(make_kv(tiny_layout(dtype=torch.bfloat16), 16))
    assert read(encoding, other_dtype)[0] == OTHER_SIZE
    other_heads = get_codec(spec).encode(make_kv(tiny_layout(num_kv_heads=1), 16))
    assert read(encoding, other_heads)[0] == OTHER_SIZE


def test_damaged_frame_inside_sound_storage_is_corrupt():
    """A frame that parses (good checksum) but whose payload the codec refuses."""
    encoding = BlockEncoding(LAYOUT, get_codec("kivi4"))
    frame = encoding.encode(make_kv(LAYOUT, 16))
    header, body = parse_frame(frame)
    bad = pack_frame(header.codec_id, header.dtype, header.shape, header.params, [bytes(body)[:-1]])
    assert read(encoding, bad)[0] == CORRUPT
    zstd = BlockEncoding(LAYOUT, get_codec("zstd"))
    frame = zstd.encode(make_kv(LAYOUT, 16))
    header, body = parse_frame(frame)
    bad = pack_frame(header.codec_id, header.dtype, header.shape, header.params, [b"garbage"])
    assert read(zstd, bad)[0] == CORRUPT
    assert read(BlockEncoding(LAYOUT), bad)[0] == CORRUPT  # lossless: every tier judges it


def test_frame_from_a_newer_kvstore_is_other_codec_not_corrupt():
    encoding = BlockEncoding(LAYOUT, get_codec("kivi4"))
    frame = bytearray(encoding.encode(make_kv(LAYOUT, 16)))
    newer_version = bytearray(frame)
    newer_version[4] = 2
    kivi = frame_encoding(get_codec("kivi4"))
    assert read(encoding, newer_version, header=kivi)[0] == OTHER_CODEC
    header, body = parse_frame(frame)
    unknown_codec = pack_frame(77, header.dtype, header.shape, header.params, [bytes(body)])
    assert read(encoding, unknown_codec, header=78)[0] == OTHER_CODEC


# -- raw bytes that look like a frame --------------------------------------------------------


def kvcf_block(fifth_byte: int) -> torch.Tensor:
    """A raw fp16 block whose bytes start with b"KVCF" (values 100.7, 6.26: plausible key outliers)."""
    block = make_kv(LAYOUT, 16, seed=5)
    raw = block.view(torch.uint8).view(-1)
    raw[:6] = torch.tensor(list(MAGIC) + [fifth_byte, 0x3C], dtype=torch.uint8)
    return block


@pytest.mark.parametrize("fifth", [0x00, 0x01, 0x02, 0x05])
def test_raw_bytes_starting_with_the_magic_are_still_raw(fifth):
    """The header says raw: whatever the bytes look like, they are served as the raw KV they are."""
    block = kvcf_block(fifth)
    for encoding in (BlockEncoding(LAYOUT), BlockEncoding(LAYOUT, get_codec("kivi4")),
                     BlockEncoding(LAYOUT, get_codec("zstd"))):
        payload = BlockEncoding(LAYOUT).encode(block)
        assert bytes(memoryview(payload)[:4]) == MAGIC
        verdict, out = read(encoding, payload, header=ENCODING_RAW)
        assert verdict == INTACT, fifth
        assert_same_kv(out, block)
        assert_same_kv(decode_new(encoding, payload, ENCODING_RAW), block)


def test_a_valid_frame_stored_as_raw_is_not_decoded():
    """Crafted: a zstd frame of zeros whose bytes fill exactly one fp16 block, stored as raw KV."""
    frame = bytes(get_codec("zstd").encode(torch.zeros(LAYOUT.shape(16), dtype=LAYOUT.dtype)))
    payload = (frame + bytes(LAYOUT.block_bytes))[:LAYOUT.block_bytes]
    as_raw = torch.frombuffer(bytearray(payload), dtype=LAYOUT.dtype).view(LAYOUT.shape(16))
    for encoding in (BlockEncoding(LAYOUT), BlockEncoding(LAYOUT, get_codec("zstd"))):
        verdict, out = read(encoding, payload, header=ENCODING_RAW)
        assert verdict == INTACT
        assert torch.equal(out.view(torch.int16), as_raw.view(torch.int16))  # the raw bytes, not zeros


def test_raw_bytes_announced_as_a_frame_are_corrupt():
    block = make_kv(LAYOUT, 16)
    payload = BlockEncoding(LAYOUT).encode(block)
    assert read(BlockEncoding(LAYOUT), payload, header=frame_encoding(get_codec("zstd")))[0] == CORRUPT
    frame = get_codec("zstd").encode(block)  # a frame of another codec than the header says
    assert read(BlockEncoding(LAYOUT), frame, header=frame_encoding(get_codec("int8")))[0] == CORRUPT


# -- decode_new ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, "zstd", "kivi4", "rq3"])
def test_decode_new(spec):
    encoding = BlockEncoding(LAYOUT, get_codec(spec) if spec else None)
    for tokens in (16, 5, 1):
        block = make_kv(LAYOUT, tokens, seed=tokens)
        got = decode_new(encoding, encoding.encode(block))
        assert got is not None
        assert got.shape == LAYOUT.shape(tokens) and got.dtype == LAYOUT.dtype and got.device.type == "cpu"
        expected = block if spec in (None, "zstd") else get_codec(spec).decode(encoding.encode(block))
        assert_same_kv(got, expected)


def test_decode_new_refuses_what_the_tier_cannot_read():
    encoding = BlockEncoding(LAYOUT)
    assert decode_new(encoding, b"") is None
    assert decode_new(encoding, bytes(LAYOUT.block_bytes + LAYOUT.token_bytes)) is None  # more than a block
    assert decode_new(encoding, bytes(100)) is None  # not whole tokens
    assert decode_new(encoding, get_codec("rq3").encode(make_kv(LAYOUT, 16))) is None  # lossy, not ours
    # a frame of a layer or of more tokens than a block
    assert decode_new(encoding, get_codec("zstd").encode(make_kv(LAYOUT, 16)[0])) is None
    assert decode_new(encoding, get_codec("zstd").encode(make_kv(LAYOUT, 17))) is None
    # a frame of another dtype
    assert decode_new(encoding, get_codec("zstd").encode(make_kv(tiny_layout(dtype=torch.float32), 4))) is None


def test_encoding_refuses_a_non_codec():
    with pytest.raises(ValueError, match="codec"):
        BlockEncoding(LAYOUT, "kivi4")


# -- hostile frames: bounded memory, finite parameters -------------------------------------------------


def rle_zstd(declared: int | None, blocks: int) -> bytes:
    """A zstd frame made by hand (RFC 8878): ``blocks`` RLE blocks of 128 KiB of zeros, 4 bytes each, so a
    few KB expand to many MiB; its header declares ``declared`` bytes of content, or none."""
    import struct
    if declared is None:
        out = bytearray(struct.pack("<I", 0xFD2FB528)) + bytes([0, 0x58])  # no size; a 128 MiB window
    else:
        out = bytearray(struct.pack("<I", 0xFD2FB528)) + bytes([0xE0]) + struct.pack("<Q", declared)
    for i in range(blocks):
        header = (i == blocks - 1) | (1 << 1) | ((128 << 10) << 3)  # last flag, RLE type, block size
        out += struct.pack("<I", header)[:3] + b"\x00"
    return bytes(out)


def _with_body(frame: object, body: bytes) -> bytes:
    header, _ = parse_frame(frame)
    return pack_frame(header.codec_id, header.dtype, header.shape, header.params, [body])


@pytest.mark.parametrize("spec", ["zstd", "int8:zstd=3", "kivi4:zstd=3", "rq4:zstd=3"])
@pytest.mark.parametrize("declared, blocks", [(1 << 40, 1), (256 << 20, 2048), (None, 512)],
                         ids=["declares-1TiB", "expands-256MiB", "undeclared-64MiB"])
def test_a_zstd_bomb_in_a_frame_is_corrupt_in_memory_bounded_by_the_block(spec, declared, blocks):
    """A frame with a sound checksum whose zstd part declares or expands to far more than the block: a miss,
    never a MemoryError (which blamed the tier and bypassed it) nor hundreds of MiB decompressed to learn it."""
    import tracemalloc
    encoding = BlockEncoding(LAYOUT, get_codec(spec))
    bomb = _with_body(encoding.encode(make_kv(LAYOUT, 16)), rle_zstd(declared, blocks))
    tracemalloc.start()
    try:
        verdict, _ = read(encoding, bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert verdict == CORRUPT
    assert peak < 8 << 20, f"{peak >> 20} MiB to judge a 4 KiB block"
    if spec == "zstd":  # lossless: a tier without the codec judges it too
        assert read(BlockEncoding(LAYOUT), bomb)[0] == CORRUPT
