"""Every codec: shapes, dtypes, ``out=``, exactness of the lossless ones, error bounds and sizes of the lossy ones."""

from __future__ import annotations

import math

import pytest
import torch

from kvstore.compression import (
    CODECS,
    FrameError,
    Int8Codec,
    KiviCodec,
    RawCodec,
    RotationCodec,
    UnknownCodecError,
    ZstdCodec,
    codec_of,
    decode,
    get_codec,
    parse_spec,
)
from kvstore.compression.bitpack import packed_bytes
from kvstore.compression.bounds import RQ_REL_RMS, ec_bound, int8_bound, kivi_bound
from kvstore.compression.entropy import EntropyCodec
from kvstore.compression.frame import header_size, parse_frame

NAMES = list(CODECS)
D = 128  # the head dim of most tests: every rq codebook is fitted once per (head dim, bits), ~0.2 s each
LOSSLESS = ("raw", "zstd")
LOSSY = tuple(n for n in NAMES if n not in LOSSLESS)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kv(shape, dtype=torch.float16, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t``: equal iff the bytes are equal (NaN payloads and -0.0 included)."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


def rel_rms(y: torch.Tensor, x: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float((y - x).norm() / x.norm())


def check_values(name: str, x: torch.Tensor, y: torch.Tensor, codec=None) -> None:
    """``y`` is what ``name`` may return for ``x``: exact, within the per-element bound, or the rq RMS bound."""
    assert y.shape == x.shape and y.dtype == x.dtype
    codec = codec or get_codec(name)
    if x.numel() == 0:
        return
    if codec.lossless:
        assert torch.equal(bits_of(y), bits_of(x)), name
        return
    err = (y.float() - x.float()).abs()
    if isinstance(codec, Int8Codec):
        assert bool((err <= int8_bound(x)).all()), (name, float((err - int8_bound(x)).max()))
    elif isinstance(codec, KiviCodec):
        bound = kivi_bound(x, codec.bits, codec.group, codec.residual, codec.value_bits)
        assert bool((err <= bound).all()), (name, float((err - bound).max()))
    elif isinstance(codec, EntropyCodec):
        bound = ec_bound(x, codec.key_step, codec.value_step, codec.key_power, codec.sinks)
        assert bool((err <= bound).all()), (name, float((err - bound).max()))
    else:
        assert rel_rms(y, x) <= RQ_REL_RMS[codec.bits], (name, rel_rms(y, x))


def round_trip(name: str, x: torch.Tensor, **params) -> torch.Tensor:
    codec = get_codec(name, **params)
    frame = codec.encode(x)
    assert isinstance(frame, bytearray)
    y = codec.decode(frame)
    assert tuple(y.shape) == tuple(x.shape), name
    assert y.dtype == x.dtype, name
    assert y.device.type == "cpu"
    check_values(name, x, y, codec)
    return y


# -- shapes and dtypes -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_block_round_trip_keeps_shape_dtype_and_bounds(name, dtype):
    round_trip(name, kv((2, 2, 17, 2, D), dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_layer_round_trip(name, dtype):
    """One layer ``[P, T, H, D]`` is encoded as well as a block."""
    x = kv((2, 33, 2, D), dtype, seed=1)
    y = round_trip(name, x)
    if name.startswith("kivi"):  # a layer is the block of one layer
        codec = get_codec(name)
        assert torch.equal(codec.decode(codec.encode(x.unsqueeze(0)))[0], y)


@pytest.mark.parametrize("name", NAMES)
def test_latent_cache_with_one_kv_part(name):
    round_trip(name, kv((2, 1, 17, 2, D), torch.bfloat16, seed=2))
    round_trip(name, kv((1, 9, 1, D), torch.float16, seed=3))


@pytest.mark.parametrize("tokens", [1, 3, 17, 33])
@pytest.mark.parametrize("name", NAMES)
def test_odd_token_counts(name, tokens):
    round_trip(name, kv((2, 2, tokens, 2, D), torch.float16, seed=tokens))


@pytest.mark.parametrize("dim", [2, 6, 12, 80])
@pytest.mark.parametrize("name", ["raw", "zstd", "int8", "kivi4", "kivi2", "rq3"])
def test_odd_head_dims(name, dim):
    round_trip(name, kv((2, 2, 5, 2, dim), torch.bfloat16, seed=dim))


@pytest.mark.parametrize("name", ["kivi4", "kivi2"])
def test_kivi_groups_larger_than_tokens_or_head_dim(name):
    x = kv((2, 2, 5, 2, 6), torch.float16)
    round_trip(name, x, group=64)
    round_trip(name, x, group=1)
    round_trip(name, x, group=4)  # 5 tokens, 6 channels: a partial last group both ways
    round_trip(name, kv((1, 2, 40, 2, 16), torch.float32), group=16, residual=3)


@pytest.mark.parametrize("name", NAMES)
def test_empty_tensor_round_trips(name):
    codec = get_codec(name)
    for shape in ((2, 2, 0, 2, D), (2, 0, 2, D)):
        x = torch.empty(shape, dtype=torch.bfloat16)
        frame = codec.encode(x)
        header, payload = parse_frame(frame)
        assert header.shape == shape and payload.nbytes == 0
        assert len(frame) == header_size(len(shape), len(codec.params()))
        y = codec.decode(frame)
        assert y.shape == x.shape and y.dtype == x.dtype
        out = torch.empty(shape, dtype=torch.bfloat16)
        assert codec.decode(frame, out=out) is out
        assert decode(frame).shape == x.shape


@pytest.mark.parametrize("name", NAMES)
def test_decode_to_a_device(name):
    codec = get_codec(name)
    x = kv((1, 2, 4, 2, D))
    y = codec.decode(codec.encode(x), device="cpu")
    assert y.device.type == "cpu" and y.shape == x.shape
    z = decode(codec.encode(x), device=torch.device("cpu"))
    assert torch.equal(bits_of(z), bits_of(y))


# -- out= --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_out_contiguous_is_written_in_place(name):
    codec = get_codec(name)
    x = kv((2, 2, 9, 2, D), torch.bfloat16)
    frame = codec.encode(x)
    expected = codec.decode(frame)
    out = torch.full(x.shape, 7.0, dtype=x.dtype)
    pointer = out.data_ptr()
    result = codec.decode(frame, out=out)
    assert result is out and out.data_ptr() == pointer
    assert torch.equal(bits_of(out), bits_of(expected))
    # the registry's decode honours out as well
    out2 = torch.full(x.shape, 7.0, dtype=x.dtype)
    assert decode(frame, out=out2) is out2
    assert torch.equal(bits_of(out2), bits_of(expected))


@pytest.mark.parametrize("view", ["token-slice", "transpose", "layer-slice"])
@pytest.mark.parametrize("name", NAMES)
def test_out_strided_view_of_a_bigger_tensor(name, view):
    codec = get_codec(name)
    shape = (2, 2, 9, 2, D)
    x = kv(shape, torch.float16, seed=4)
    frame = codec.encode(x)
    expected = codec.decode(frame)
    if view == "token-slice":
        big = torch.full((2, 2, 15, 2, D), -3.0, dtype=x.dtype)
        out = big[:, :, 4:13]
    elif view == "transpose":
        big = torch.full((2, 2, 2, 9, D), -3.0, dtype=x.dtype)
        out = big.transpose(2, 3)
    else:
        big = torch.full((3, 2, 9, 2, D), -3.0, dtype=x.dtype)
        out = big[1:]
    assert tuple(out.shape) == shape
    sentinel = big.clone()
    result = codec.decode(frame, out=out)
    assert result is out
    assert torch.equal(bits_of(out.contiguous()), bits_of(expected))
    mask = torch.ones(big.shape, dtype=torch.bool)
    if view == "token-slice":
        mask[:, :, 4:13] = False
    elif view == "transpose":
        mask[:] = False
    else:
        mask[1:] = False
    assert torch.equal(big[mask], sentinel[mask]), "decode wrote outside out"


@pytest.mark.parametrize("name", NAMES)
def test_out_of_wrong_shape_or_dtype_is_a_value_error(name):
    codec = get_codec(name)
    x = kv((2, 2, 9, 2, D), torch.float16)
    frame = codec.encode(x)
    for out in (torch.empty((2, 2, 8, 2, D), dtype=torch.float16),
                torch.empty((2, 2, 9, 2, D), dtype=torch.bfloat16),
                torch.empty((2, 9, 2, D), dtype=torch.float16),
                torch.empty((2 * 2 * 9 * 2 * D,), dtype=torch.float16)):
        with pytest.raises(ValueError, match="out"):
            codec.decode(frame, out=out)
        with pytest.raises(ValueError, match="out"):
            decode(frame, out=out)


# -- lossless: bit for bit ---------------------------------------------------------------


SPECIALS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-8, -1e-30, 65504.0, -3.5]


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("spec", ["raw", "zstd", "zstd:level=19", "zstd:planes=0"])
def test_lossless_is_byte_exact_with_nan_inf_and_negative_zero(spec, dtype):
    x = kv((2, 2, 7, 2, D), dtype)
    flat = x.view(-1)
    flat[:len(SPECIALS)] = torch.tensor(SPECIALS, dtype=torch.float64).to(dtype)
    flat[-1] = float("nan")
    # a NaN with a non-default payload survives too
    bits = bits_of(x).view(-1)
    bits[20] = bits[0] | 1
    codec = get_codec(spec)
    y = codec.decode(codec.encode(x))
    assert torch.equal(bits_of(y), bits_of(x))
    assert torch.signbit(y.view(-1)[3]) and y.view(-1)[3] == 0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_codecs_take_integer_tensors(name, dtype):
    x = torch.arange(-60, 60, dtype=torch.int64).to(dtype).view(2, 3, 20)
    codec = get_codec(name)
    y = codec.decode(codec.encode(x))
    assert y.dtype == dtype and torch.equal(y, x)


def test_raw_frame_is_header_plus_the_bytes():
    x = kv((2, 2, 5, 2, D), torch.bfloat16)
    frame = RawCodec().encode(x)
    assert len(frame) == header_size(5, 0) + x.numel() * 2
    assert bytes(frame[header_size(5, 0):]) == x.view(torch.uint8).numpy().tobytes()


def test_raw_encodes_a_strided_tensor_by_value():
    big = kv((2, 2, 10, 2, D))
    x = big[:, :, 3:8].transpose(0, 1)
    for name in LOSSLESS:
        codec = get_codec(name)
        assert torch.equal(bits_of(codec.decode(codec.encode(x))), bits_of(x))


def test_zstd_compresses_16_bit_kv():
    x = kv((2, 2, 64, 4, 128), torch.bfloat16)
    raw = x.numel() * 2
    planes = len(get_codec("zstd").encode(x))
    flat = len(get_codec("zstd:planes=0").encode(x))
    assert raw / planes >= 1.3, raw / planes
    assert planes < flat  # splitting the byte planes is what makes it work


# -- lossy: error bounds, exact cases ----------------------------------------------------


@pytest.mark.parametrize("name", ["kivi4", "kivi2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kivi_of_a_constant_block_is_exact(name, dtype):
    codec = get_codec(name)
    for value in (0.0, 1.5, -2.75, 1000.0):
        x = torch.full((2, 2, 17, 2, D), value, dtype=dtype)
        assert torch.equal(codec.decode(codec.encode(x)), x), value
    # constant per key channel and per value group is exact as well
    x = torch.arange(D, dtype=torch.float32).repeat(2, 2, 17, 2, 1).to(dtype)
    x[:, 1] = torch.arange(17 * 2, dtype=torch.float32).view(17, 2, 1).to(dtype)
    assert torch.equal(codec.decode(codec.encode(x)), x)


@pytest.mark.parametrize("name", ["int8", "rq4", "rq2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zeros_decode_to_zeros(name, dtype):
    codec = get_codec(name)
    x = torch.zeros((2, 2, 5, 2, D), dtype=dtype)
    y = codec.decode(codec.encode(x))
    assert torch.equal(y, x)
    if name == "int8":  # a zero vector among others stays zero (its own scale is 0)
        x = kv((2, 2, 5, 2, D), dtype)
        x[1, 0, 3, 1] = 0
        y = codec.decode(codec.encode(x))
        assert bool((y[1, 0, 3, 1] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_error_is_at_most_half_a_step_per_vector(dtype):
    x = kv((2, 2, 33, 2, D), dtype)
    x[0, 0, 0, 0, 3] = 300  # one outlier only widens its own vector's step
    codec = Int8Codec()
    y = codec.decode(codec.encode(x.clone()))
    err = (y.float() - x.float()).abs()
    assert bool((err <= int8_bound(x)).all())
    assert float(err[0, 0, 1].max()) < 0.05  # the other vectors keep their fine steps
    # the absmax of each vector is reproduced (its code is +-127 of a scale rounded up)
    absmax = x.float().abs().amax(-1)
    assert torch.allclose(y.float().abs().amax(-1), absmax, rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kivi_error_is_at_most_half_a_step_per_group(bits, dtype):
    x = kv((2, 2, 40, 2, D), dtype, seed=bits)
    x[:, 0, :, :, 5] *= 20  # a key outlier channel: its own groups, not its neighbours', widen
    codec = KiviCodec(bits=bits)
    y = codec.decode(codec.encode(x))
    err = (y.float() - x.float()).abs()
    bound = kivi_bound(x, bits)
    assert bool((err <= bound).all()), float((err - bound).max())


def test_kivi_keeps_residual_tokens_exact():
    x = kv((2, 2, 40, 2, D), torch.bfloat16)
    codec = get_codec("kivi2:residual=8")
    y = codec.decode(codec.encode(x))
    assert torch.equal(bits_of(y[:, :, 32:]), bits_of(x[:, :, 32:]))
    assert not torch.equal(y[:, :, :32], x[:, :, :32])
    err = (y.float() - x.float()).abs()
    assert bool((err <= kivi_bound(x, 2, residual=8)).all())
    # residual longer than the sequence: everything exact (nothing quantized)
    short = x[:, :, :5].contiguous()
    assert torch.equal(codec.decode(codec.encode(short)), short)


def test_more_bits_means_less_error():
    x = kv((2, 2, 64, 2, D), torch.float32, seed=9)

    def error(spec):
        codec = get_codec(spec)
        return rel_rms(codec.decode(codec.encode(x.clone())), x)

    kivi2, kivi4, int8 = error("kivi2"), error("kivi4"), error("int8")
    rq2, rq3, rq4 = error("rq2"), error("rq3"), error("rq4")
    assert kivi2 > kivi4 > int8 > 0
    assert rq2 > rq3 > rq4 > 0
    assert kivi4 < 0.12 and kivi2 < 0.6
    for bits, err in ((4, rq4), (3, rq3), (2, rq2)):
        assert err <= RQ_REL_RMS[bits]


def test_rq_relative_error_survives_outlier_channels():
    """Keys' outlier channels (same sign on every token, 20x) do not raise rq's relative error."""
    x = kv((2, 2, 32, 2, D), torch.float32, seed=5)
    x[:, 0, :, :, 7] = x[:, 0, :, :, 7].abs() * 20 + 20
    x[:, 0, :, :, 90] = -x[:, 0, :, :, 90].abs() * 20 - 20
    codec = get_codec("rq4")
    assert rel_rms(codec.decode(codec.encode(x)), x) <= RQ_REL_RMS[4]


def test_rq_is_deterministic_for_a_seed():
    x = kv((2, 2, 9, 2, D), torch.bfloat16)
    a, b = RotationCodec(bits=3, seed=7), RotationCodec(bits=3, seed=7)
    frame = a.encode(x)
    assert a.encode(x) == frame
    assert b.encode(x) == frame
    assert torch.equal(b.decode(frame), a.decode(frame))


def test_rq_seed_changes_the_frame_and_both_decode():
    x = kv((2, 2, 9, 2, D), torch.float32)
    zero, other = get_codec("rq3"), get_codec("rq3:seed=12345")
    f0, f1 = zero.encode(x), other.encode(x)
    assert f0 != f1
    y0, y1 = zero.decode(f0), other.decode(f1)
    assert not torch.equal(y0, y1)
    for y in (y0, y1):
        assert rel_rms(y, x) <= RQ_REL_RMS[3]
    # the seed travels in the frame: any rq codec (and the registry) decodes either frame
    assert torch.equal(zero.decode(f1), y1)
    assert torch.equal(decode(f1), y1)
    assert codec_of(f1)[0] == other


def test_frame_of_other_params_of_the_same_codec_decodes():
    x = kv((2, 2, 40, 2, D), torch.float16)
    frame = get_codec("kivi2:group=8,residual=4").encode(x)
    assert torch.equal(get_codec("kivi4").decode(frame), get_codec("kivi2:group=8,residual=4").decode(frame))
    assert codec_of(frame)[0] == KiviCodec(bits=2, group=8, residual=4)


@pytest.mark.parametrize("name", [n for n in LOSSY if "zstd" in get_codec(n).PARAMS])  # ec entropy-codes itself
def test_zstd_post_pass_decodes_to_the_same_tensor(name):
    x = kv((2, 2, 33, 2, D), torch.bfloat16, seed=3)
    plain, packed = get_codec(name), get_codec(f"{name}:zstd=3")
    f_plain, f_packed = plain.encode(x), packed.encode(x)
    assert f_plain != f_packed
    expected = plain.decode(f_plain)
    assert torch.equal(bits_of(packed.decode(f_packed)), bits_of(expected))
    assert torch.equal(bits_of(decode(f_packed)), bits_of(expected))
    assert torch.equal(bits_of(plain.decode(f_packed)), bits_of(expected))  # zstd is a frame parameter


def test_zstd_post_pass_shrinks_redundant_codes():
    x = torch.zeros((2, 2, 64, 2, D), dtype=torch.bfloat16)
    x[..., 0] = 1
    for name in ("int8", "rq4", "kivi4"):
        assert len(get_codec(f"{name}:zstd=3").encode(x)) < len(get_codec(name).encode(x)), name


@pytest.mark.parametrize("cls, bits", [(KiviCodec, 5), (KiviCodec, 6), (KiviCodec, 7), (RotationCodec, 6)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_lossy_codecs_with_5_to_7_bits(cls, bits):
    x = kv((2, 2, 16, 2, D), torch.float32, seed=bits)
    codec = cls(bits=bits)
    y = codec.decode(codec.encode(x))
    four = cls(bits=4)
    assert rel_rms(y, x) < rel_rms(four.decode(four.encode(x)), x)  # more bits, less error


# -- sizes -------------------------------------------------------------------------------


REALISTIC = (2, 2, 256, 4, 128)  # a 256-token block of 2 layers, 4 KV heads of 128


def expected_frame_bytes(spec: str, shape=REALISTIC, element=2) -> int:
    """The frame length each codec's format (docs/frame.md) implies; ``element``: bytes of a scale or norm."""
    codec = get_codec(spec)
    numel = math.prod(shape)
    rows = numel // shape[-1]
    head = header_size(len(shape), len(codec.params()))
    if isinstance(codec, RawCodec):
        return head + numel * element
    if isinstance(codec, Int8Codec):
        return head + rows * element + numel
    if isinstance(codec, RotationCodec):
        # a centering rq stores each channel's mean over the tokens (dim -3) first
        means = numel // shape[-3] if getattr(codec, "center", 0) and len(shape) >= 3 else 0
        return head + (means + rows) * element + packed_bytes(numel, codec.bits)
    assert isinstance(codec, KiviCodec)
    L, P, T, H, D_ = shape
    tq = max(0, T - codec.residual)
    gk = max(1, min(codec.group, tq))
    nk = -(-tq // gk)
    gv = min(codec.group, D_)
    v_groups = (P - 1) * tq * H * (-(-D_ // gv))
    params = 2 * L * (nk * H * D_ + v_groups) * element  # a minimum and a scale per group
    residual = L * P * (T - tq) * H * D_ * element
    return head + params + residual + packed_bytes(L * (nk * gk * H * D_ + v_groups * gv), codec.bits)


@pytest.mark.parametrize("spec, least_ratio", [
    ("raw", 0.99), ("int8", 1.9), ("kivi4", 3.15), ("kivi2", 5.0), ("rq4", 3.5), ("rq3", 5.0), ("rq2", 7.0),
    ("kivi4:group=64", 3.5), ("kivi2:group=16,residual=16", 3.0), ("rq3:seed=3", 5.0),
])
def test_compression_ratio_and_exact_frame_length(spec, least_ratio):
    x = kv(REALISTIC, torch.bfloat16)
    frame = get_codec(spec).encode(x)
    assert len(frame) == expected_frame_bytes(spec), (spec, len(frame), expected_frame_bytes(spec))
    assert x.numel() * 2 / len(frame) >= least_ratio, (spec, x.numel() * 2 / len(frame))


def test_kivi4_costs_five_bits_an_element():
    """4-bit codes plus a 16-bit minimum and scale per 32 elements: 4 + 2 * 16 / 32 = 5 bits (3.2x of 16)."""
    numel = math.prod(REALISTIC)
    assert expected_frame_bytes("kivi4") == header_size(5, 4) + numel * 5 // 8 == 327780


@pytest.mark.parametrize("spec", ["int8", "kivi4", "kivi2:group=8,residual=3", "rq4", "rq2"])
def test_float32_params_are_four_bytes(spec):
    shape = (2, 2, 8, 2, D)
    frame = get_codec(spec).encode(kv(shape, torch.float32))
    assert len(frame) == expected_frame_bytes(spec, shape, element=4)
    assert len(get_codec(spec).encode(kv(shape, torch.bfloat16))) == expected_frame_bytes(spec, shape, element=2)


@pytest.mark.parametrize("spec", ["raw", "int8", "kivi4", "rq3"])
def test_frame_length_of_odd_shapes(spec):
    for shape in ((1, 1, 1, 1, 2), (2, 2, 3, 3, 6), (2, 1, 33, 2, 12)):
        frame = get_codec(spec).encode(kv(shape, torch.float16))
        assert len(frame) == expected_frame_bytes(spec, shape), (spec, shape)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.float64, torch.bool], ids=str)
def test_lossy_codecs_refuse_non_float_dtypes(name, dtype):
    with pytest.raises(ValueError, match="dtype") as info:
        get_codec(name).encode(torch.zeros((1, 2, 4, 2, D), dtype=dtype))
    assert "float16" in str(info.value) and str(dtype) in str(info.value)


@pytest.mark.parametrize("shape", [(2, 4, 16), (4, 16), (16,), (1, 1, 2, 4, 2, 16), ()])
@pytest.mark.parametrize("name", ["kivi4", "kivi2"])
def test_kivi_refuses_other_ranks(name, shape):
    with pytest.raises(ValueError, match=r"\[L, P, T, H, D\]"):
        get_codec(name).encode(torch.zeros(shape, dtype=torch.float16))


@pytest.mark.parametrize("name", ["rq4", "rq3", "rq2"])
def test_rq_refuses_a_head_dim_below_two(name):
    for shape in ((1, 2, 4, 2, 1), ()):
        with pytest.raises(ValueError, match="head"):
            get_codec(name).encode(torch.zeros(shape, dtype=torch.float16))


def test_int8_refuses_a_scalar_and_everyone_a_non_tensor():
    with pytest.raises(ValueError, match="dim"):
        Int8Codec().encode(torch.tensor(1.0))
    for name in NAMES:
        with pytest.raises(ValueError, match="torch.Tensor"):
            get_codec(name).encode([1.0, 2.0])


def test_raw_refuses_dtypes_the_frame_cannot_name():
    with pytest.raises(ValueError, match="dtype"):
        RawCodec().encode(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dtype"):
        ZstdCodec().encode(torch.zeros(4, dtype=torch.complex64))


@pytest.mark.parametrize("spec", [
    "nope", "", "   ", "KIVI4", "kivi3", "rq5", "raw2",
])
def test_get_codec_unknown_name_names_the_codecs(spec):
    with pytest.raises(ValueError) as info:
        get_codec(spec)
    assert "kivi4" in str(info.value) and "rq3" in str(info.value)


@pytest.mark.parametrize("spec, params, match", [
    ("kivi4:foo=1", {}, "foo"),
    ("raw:level=3", {}, "level"),
    ("kivi4:group", {}, "key=integer"),
    ("kivi4:group=abc", {}, "key=integer"),
    ("kivi4:=3", {}, "key=integer"),
    ("kivi4:group=0", {}, "group"),
    ("kivi4:bits=9", {}, "bits"),
    ("kivi4:bits=0", {}, "bits"),
    ("kivi4:residual=-1", {}, "residual"),
    ("rq3:zstd=20", {}, "zstd"),
    ("rq3:seed=-1", {}, "seed"),
    ("zstd:level=0", {}, "level"),
    ("zstd:level=20", {}, "level"),
    ("zstd:planes=2", {}, "planes"),
    ("int8:zstd=-1", {}, "zstd"),
    ("kivi4", {"group": 0}, "group"),
    ("kivi4", {"bogus": 1}, "bogus"),
    ("kivi4", {"bits": True}, "bits"),
    ("zstd:level=1,level=2", {}, "each parameter once"),  # the last one won
    ("kivi4:bits=2", {}, "the name sets bits=4"),  # a kivi2 under kivi4's name
    ("rq4:bits=1", {}, "the name sets bits=4"),
    ("zstd:level=1_0", {}, "key=integer"),  # int() reads 10
    ("zstd:level=\u0663", {}, "key=integer"),  # an Arabic-Indic 3, which int() reads as 3
])
def test_get_codec_bad_params(spec, params, match):
    with pytest.raises(ValueError, match=match):
        get_codec(spec, **params)


def test_get_codec_specs_and_equality():
    assert get_codec("kivi2:group=64,residual=8") == KiviCodec(bits=2, group=64, residual=8)
    assert get_codec(" kivi2:group=64, residual=8 ") == KiviCodec(bits=2, group=64, residual=8)
    assert get_codec("kivi4", group=16) == KiviCodec(bits=4, group=16)
    assert get_codec("kivi4:group=8", group=16).group == 16  # keyword parameters win
    assert get_codec("rq3:zstd=3") == RotationCodec(bits=3, zstd=3)
    assert get_codec("zstd:level=9") == ZstdCodec(level=9)
    assert get_codec("rq3") != get_codec("rq3:seed=1")
    assert get_codec("kivi4") != get_codec("kivi4:zstd=1")
    assert hash(get_codec("int8")) == hash(Int8Codec())
    assert parse_spec("kivi2:group=64,residual=8") == ("kivi2", {"group": 64, "residual": 8})
    assert parse_spec("raw") == ("raw", {})
    for name in NAMES:
        codec = get_codec(name)
        assert codec.name == name
        assert codec.lossless == (name in LOSSLESS)


# -- cross-codec decoding ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_registry_decodes_any_codecs_frame(name):
    x = kv((2, 2, 9, 2, D), torch.bfloat16)
    codec = get_codec(name)
    frame = codec.encode(x)
    found, header, _ = codec_of(frame)
    assert found == codec and header.shape == tuple(x.shape) and header.dtype == x.dtype
    assert torch.equal(bits_of(decode(frame)), bits_of(codec.decode(frame)))
    assert torch.equal(bits_of(decode(bytes(frame))), bits_of(codec.decode(memoryview(frame))))


@pytest.mark.parametrize("writer", NAMES)
def test_a_codec_refuses_another_codecs_frame(writer):
    x = kv((2, 2, 9, 2, D), torch.bfloat16)
    frame = get_codec(writer).encode(x)
    writer_cls = type(get_codec(writer))
    for reader in NAMES:
        codec = get_codec(reader)
        if type(codec) is writer_cls:
            continue
        with pytest.raises(UnknownCodecError, match="kvstore.compression.decode"):
            codec.decode(frame)
        with pytest.raises(FrameError):
            codec.decode(frame, out=torch.empty_like(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_encode_does_not_modify_the_input(name, dtype):
    x = kv((2, 2, 17, 2, D), dtype)
    before = x.clone()
    get_codec(name).encode(x)
    assert torch.equal(bits_of(x), bits_of(before)), name


@pytest.mark.parametrize("spec", ["int8", "kivi4", "kivi2", "rq4", "rq3", "rq2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lossy_codecs_keep_the_largest_finite_values_finite(spec, dtype):
    """A value a rounding step past the dtype's largest finite one must not read back as inf."""
    big = torch.finfo(dtype).max
    block = torch.zeros(2, 2, 4, 2, 8, dtype=dtype)
    block[0, 0, 1, 0, 3], block[1, 1, 2, 1, 1] = big, -big
    decoded = get_codec(spec).decode(get_codec(spec).encode(block))
    assert bool(torch.isfinite(decoded).all())
    if dtype == torch.float16:  # (bf16's max overflows the rotation codecs' float32 norms: finite, not close)
        assert decoded[0, 0, 1, 0, 3] > 0.5 * big and decoded[1, 1, 2, 1, 1] < -0.5 * big


@pytest.mark.parametrize("value_bits", [2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kivi_values_with_their_own_bits(value_bits, dtype):
    """Keys at 4 bits, values at ``value_bits``: each within its own half step, keys exactly as kivi4 makes them,
    and the frame as small as the two widths say."""
    x = kv((2, 2, 64, 2, D), dtype, seed=value_bits)
    y = round_trip("kivi4", x, value_bits=value_bits)
    same = get_codec("kivi4")
    assert torch.equal(bits_of(y[:, 0]), bits_of(same.decode(same.encode(x))[:, 0]))
    codec = get_codec("kivi4", value_bits=value_bits)
    grown = len(codec.encode(x)) - len(same.encode(x))
    assert grown == packed_bytes(x[:, 1].numel(), value_bits) - packed_bytes(x[:, 1].numel(), 4) + 8  # one i64 more


def test_kivi_frames_without_value_bits_keep_their_layout():
    """A frame whose values use the keys' bits has the four parameters frames always had, so frames written
    before ``value_bits`` existed decode, and new ones decode in the same way."""
    x = kv((2, 2, 32, 2, D), torch.bfloat16)
    old_style = get_codec("kivi4").encode(x)
    assert len(parse_frame(old_style)[0].params) == 4
    assert len(parse_frame(get_codec("kivi4", value_bits=4).encode(x))[0].params) == 4  # equal to bits: unset
    assert len(parse_frame(get_codec("kivi4", value_bits=2).encode(x))[0].params) == 5
    with pytest.raises(ValueError, match="value_bits"):
        get_codec("kivi4", value_bits=9)


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("special", [float("inf"), float("-inf"), float("nan")])
def test_lossy_codecs_encode_blocks_holding_inf_or_nan(name, special):
    """rq turned a row holding inf or NaN into cell INT_MIN and raised IndexError in the encode: the store blamed
    the tier and bypassed it for every block. Such a block encodes and decodes."""
    x = kv((2, 2, 16, 2, 64))
    x[0, 1, 3, 1, 5] = special
    codec = get_codec(name)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bool(torch.isfinite(y[1]).all())  # the other layer's values are not touched by it
