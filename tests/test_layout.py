"""KVLayout: shapes, byte sizes, fingerprint and validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_layout
from kvstore.layout import KVLayout, resolve_dtype


@pytest.mark.parametrize(
    "changes, block_shape, token_bytes, block_bytes",
    [
        (dict(dtype=torch.float16), (2, 2, 16, 2, 16), 256, 4096),
        (dict(dtype=torch.bfloat16), (2, 2, 16, 2, 16), 256, 4096),
        (dict(dtype=torch.float32), (2, 2, 16, 2, 16), 512, 8192),
        (dict(dtype=torch.float16, kv_parts=1), (2, 1, 16, 2, 16), 128, 2048),
        (dict(dtype=torch.float32, kv_parts=1), (2, 1, 16, 2, 16), 256, 4096),
        (dict(dtype=torch.float16, block_tokens=8), (2, 2, 8, 2, 16), 256, 2048),
        (dict(dtype=torch.float16, num_layers=3, num_kv_heads=4, head_dim=8), (3, 2, 16, 4, 8), 384, 6144),
    ],
)
def test_sizes(changes, block_shape, token_bytes, block_bytes):
    lay = tiny_layout(**changes)
    assert lay.block_shape == block_shape
    assert lay.token_bytes == token_bytes
    assert lay.block_bytes == block_bytes
    # The sizes agree with a real tensor of that shape.
    assert torch.empty(lay.block_shape, dtype=lay.dtype).nbytes == block_bytes
    assert lay.shape(5) == block_shape[:2] + (5,) + block_shape[3:]
    assert lay.layer_bytes(5) == token_bytes // lay.num_layers * 5


def test_defaults_and_dtype_names():
    lay = KVLayout(num_layers=1, num_kv_heads=1, head_dim=1)
    assert (lay.dtype, lay.block_tokens, lay.kv_parts, lay.tp_rank, lay.tp_size) == (torch.bfloat16, 256, 2, 0, 1)
    for name, dtype in [("float16", torch.float16), ("fp16", torch.float16), ("half", torch.float16),
                        ("bf16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16), ("FP32", torch.float32)]:
        assert resolve_dtype(name) is dtype
        assert tiny_layout(dtype=name).dtype is dtype
    assert tiny_layout(dtype="bf16") == tiny_layout(dtype=torch.bfloat16)


def test_fingerprint_stable_and_16_bytes():
    a, b = tiny_layout(), tiny_layout()
    assert a == b and a is not b
    assert a.fingerprint == b.fingerprint
    assert isinstance(a.fingerprint, bytes) and len(a.fingerprint) == 16
    # A dtype given by name is the same layout as the torch dtype.
    assert tiny_layout(dtype="float16").fingerprint == a.fingerprint
    # Pinned value: the fingerprint is persisted in every disk block, it must never drift.
    assert a.describe() == (
        "kvstore-layout/v1;layers=2;parts=2;heads=2;head_dim=16;dtype=float16;block_tokens=16;tp=0/1"
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_layers", 3),
        ("num_kv_heads", 4),
        ("head_dim", 32),
        ("dtype", torch.bfloat16),
        ("dtype", torch.float32),
        ("block_tokens", 32),
        ("kv_parts", 1),
        ("tp_rank", 1),
        ("tp_size", 2),
    ],
)
def test_fingerprint_changes_with_every_field(field, value):
    base = tiny_layout(tp_size=2) if field == "tp_rank" else tiny_layout()
    changed = dataclasses.replace(base, **{field: value})
    assert getattr(changed, field) == value
    assert changed.fingerprint != base.fingerprint
    assert changed != base


def test_all_fingerprints_distinct():
    variants = [
        tiny_layout(),
        tiny_layout(num_layers=3),
        tiny_layout(num_kv_heads=4),
        tiny_layout(head_dim=32),
        tiny_layout(dtype=torch.bfloat16),
        tiny_layout(dtype=torch.float32),
        tiny_layout(block_tokens=32),
        tiny_layout(kv_parts=1),
        tiny_layout(tp_size=2),
        tiny_layout(tp_rank=1, tp_size=2),
    ]
    assert len({v.fingerprint for v in variants}) == len(variants)


@pytest.mark.parametrize(
    "changes, field, actual",
    [
        (dict(num_layers=0), "num_layers", "0"),
        (dict(num_layers=-1), "num_layers", "-1"),
        (dict(num_kv_heads=0), "num_kv_heads", "0"),
        (dict(head_dim=0), "head_dim", "0"),
        (dict(block_tokens=0), "block_tokens", "0"),
        (dict(num_layers=2.0), "num_layers", "2.0"),
        (dict(num_layers=True), "num_layers", "True"),
        (dict(kv_parts=3), "kv_parts", "3"),
        (dict(kv_parts=0), "kv_parts", "0"),
        (dict(tp_size=0), "tp_size", "0"),
        (dict(tp_rank=-1), "tp_rank", "-1"),
        (dict(tp_rank=2, tp_size=2), "tp_rank", "2"),
        (dict(tp_rank=1, tp_size=1), "tp_rank", "1"),
        (dict(dtype="float64"), "dtype", "float64"),
        (dict(dtype="fp17"), "dtype", "fp17"),
        (dict(dtype=torch.float64), "dtype", "float64"),
        (dict(dtype=torch.int32), "dtype", "int32"),
        # A typo in a dimension: kvstore info printed "23841857910156.2 TiB per block".
        (dict(head_dim=99999999999999999999), "layout", "99999999999999999999"),
        (dict(block_tokens=1 << 40), "layout", str(1 << 40)),
    ],
)
def test_bad_values_name_the_field(changes, field, actual):
    with pytest.raises(ValueError) as info:
        tiny_layout(**changes)
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert actual in message, message


def test_check_kv(layout):
    layout.check_kv(torch.zeros(layout.shape(7), dtype=torch.float16), 7)
    with pytest.raises(ValueError, match=r"expected shape \[2, 2, 7, 2, 16\].*got \[2, 2, 8, 2, 16\]"):
        layout.check_kv(torch.zeros(layout.shape(8), dtype=torch.float16), 7)
    with pytest.raises(ValueError, match=r"expected dtype torch.float16, got torch.float32"):
        layout.check_kv(torch.zeros(layout.shape(7), dtype=torch.float32), 7)
    with pytest.raises(ValueError, match=r"expected a torch.Tensor, got ndarray"):
        layout.check_kv(torch.zeros(layout.shape(7)).numpy(), 7)
