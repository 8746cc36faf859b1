"""A caller's bad argument is a ValueError before any tier is touched: no tier blamed, nothing stored lost."""

from __future__ import annotations

import pytest
import torch

from conftest import make_kv, tiny_layout
from kvstore import KeyChain, KVLayout, KVStore, LoadPlan, StoreConfig
from kvstore.keys import token_bytes
from kvstore.validation import check_device, may_overlap

TIERS = {
    "host": lambda tmp: dict(host_bytes="64KiB"),
    "lmdb": lambda tmp: dict(host_bytes=0, disk_dir=str(tmp / "lmdb"), disk_bytes="1MiB"),
    "files": lambda tmp: dict(host_bytes=0, files_dir=str(tmp / "files"), files_bytes="1MiB"),
    "host+lmdb+files": lambda tmp: dict(host_bytes="64KiB", disk_dir=str(tmp / "lmdb"), disk_bytes="1MiB",
                                        files_dir=str(tmp / "files"), files_bytes="1MiB"),
}
TOKENS = list(range(1, 41))  # 2 full blocks of 16 and a tail of 8


def _overlapping_outs(layout, num_tokens):
    shape = layout.shape(num_tokens)
    yield "expanded", torch.zeros((1,) * 5, dtype=layout.dtype).expand(*shape)
    contiguous = torch.empty(shape, dtype=layout.dtype).stride()
    half = (contiguous[0], contiguous[1], contiguous[2] // 2, contiguous[3], contiguous[4])  # tokens share memory
    yield "partly overlapping", torch.zeros(contiguous[0] * shape[0], dtype=layout.dtype).as_strided(shape, half)


@pytest.fixture(params=sorted(TIERS))
def store(request, tmp_path):
    layout = tiny_layout()
    with KVStore(layout, StoreConfig(model_id="m", **TIERS[request.param](tmp_path))) as store:
        store.put(TOKENS, make_kv(layout, len(TOKENS)))
        store.flush()
        yield store


def _intact(store) -> None:
    """Every tier still serves, and the stored prompt comes back exact."""
    layout = store.layout
    tiers = store.stats()["tiers"]
    assert all(tier["state"] == "healthy" and tier["errors"] == 0 for tier in tiers.values()), tiers
    assert store.lookup(TOKENS) == len(TOKENS)
    assert torch.equal(store.get(TOKENS).view(torch.int16), make_kv(layout, len(TOKENS)).view(torch.int16))


# The reads that write into a caller's ``out``: call name -> (read, tokens ``out`` holds).
READS_INTO = {
    "get_into": (lambda store, out: store.get_into(TOKENS, out), len(TOKENS)),
    "load": (lambda store, out: store.load(TOKENS, out=out), len(TOKENS)),
    "get_keyed": (lambda store, out: store.get_keyed(["a"], [out]), 16),
}


@pytest.mark.parametrize("call", sorted(READS_INTO))
def test_an_out_whose_elements_share_memory_is_refused_before_any_tier(store, call):
    read, num_tokens = READS_INTO[call]
    for what, out in _overlapping_outs(store.layout, num_tokens):
        with pytest.raises(ValueError, match="do not share memory"):
            read(store, out)
        _intact(store)


@pytest.mark.parametrize("call", sorted(READS_INTO))
def test_an_inference_tensor_out_of_inference_mode_is_refused_before_any_tier(store, call):
    """Every tier raised "Inplace update to inference tensor outside InferenceMode" inside its copy, was blamed
    and bypassed: later valid reads missed too."""
    read, num_tokens = READS_INTO[call]
    with torch.inference_mode():
        out = torch.empty(store.layout.shape(num_tokens), dtype=store.layout.dtype)
    with pytest.raises(ValueError, match="inference tensor .* outside inference mode"):
        read(store, out)
    _intact(store)
    if call == "get_into":
        with torch.inference_mode():  # inside inference mode it is an ordinary output
            assert store.get_into(TOKENS, out) == len(TOKENS)


def test_outs_that_share_no_memory_pass_in_any_layout(store):
    layout, n = store.layout, len(TOKENS)
    ref = make_kv(layout, n).view(torch.int16)
    for out in (torch.empty(layout.shape(n), dtype=layout.dtype),
                torch.empty(layout.shape(n)[::-1], dtype=layout.dtype).permute(4, 3, 2, 1, 0),
                torch.empty(layout.shape(2 * n), dtype=layout.dtype)[:, :, ::2],
                torch.empty(layout.shape(n), dtype=layout.dtype).flip(2)):
        assert store.get_into(TOKENS, out) == n and torch.equal(out.view(torch.int16), ref)


def test_a_tensor_with_a_pending_negation_is_refused(store):
    layout = store.layout
    kv = make_kv(layout, 16)
    with pytest.raises(ValueError, match="pending negation"):
        store.put(list(range(100, 116)), torch._neg_view(kv))
    with pytest.raises(ValueError, match="pending negation"):
        store.get_into(TOKENS[:16], torch._neg_view(torch.empty(layout.shape(16), dtype=layout.dtype)))
    assert store.lookup(list(range(100, 116))) == 0
    _intact(store)


@pytest.mark.parametrize("kwargs, message", [
    (dict(plan=5), "plan: expected a LoadPlan"),
    (dict(prefetch=object()), "prefetch: expected a PrefetchHandle"),
    (dict(plan=LoadPlan(num_tokens=40, found=40, load_tokens=-5)), "plan: expected load_tokens between 0 and 40"),
    (dict(plan=LoadPlan(num_tokens=40, found=40, load_tokens=41)), "plan: expected load_tokens between 0 and 40"),
    (dict(layer_wise="yes"), "layer_wise: expected True or False"),
])
def test_bad_load_arguments_are_value_errors(store, kwargs, message):
    with pytest.raises(ValueError, match=message):
        store.load(TOKENS, **kwargs)
    _intact(store)


@pytest.mark.parametrize("names, message", [
    ([5], "name: expected a str or bytes, got int"),
    ([[104, 105]], "name: expected a str or bytes, got list"),
    ("abc", "names: expected a list or tuple of engine keys, got str 'abc'"),
])
def test_engine_keys_are_str_or_bytes_only(store, names, message):
    """``bytes(5)`` is five zero bytes and ``bytes([104, 105])`` is ``b'hi'``: other names' keys."""
    with pytest.raises(ValueError, match=message):
        store.lookup_keyed(names)
    with pytest.raises(ValueError, match=message):
        store.get_keyed(names, [torch.empty(store.layout.block_shape, dtype=store.layout.dtype)] * len(names))
    if not isinstance(names, str):
        with pytest.raises(ValueError, match=message):
            store.put_keyed([(name, make_kv(store.layout, 16)) for name in names])
    assert store.lookup_keyed([bytes(5)]) == store.lookup_keyed(["hi"]) == 0


@pytest.mark.parametrize("item", [("a",), {"a": 1}, "ab", ("a", None, 3)])
def test_a_put_keyed_item_that_is_not_a_pair_names_what_was_expected(store, item):
    with pytest.raises(ValueError, match="items: expected \\(name, block\\) pairs"):
        store.put_keyed([("good", make_kv(store.layout, 16)), item])
    assert store.lookup_keyed(["good"]) == 0  # nothing of the batch was stored


@pytest.mark.parametrize("parts", [True, 2.0, "2", 3])
def test_kv_parts_is_one_or_two_as_an_int(parts):
    with pytest.raises(ValueError, match="kv_parts: expected 2"):
        KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float16, block_tokens=4, kv_parts=parts)


@pytest.mark.parametrize("tokens, message", [
    ([torch.tensor(1, device="meta")], "expected integer token ids"),
    ([1, type("Bad", (), {"__index__": lambda self: 1 // 0})()], "expected integer token ids"),
    (torch.tensor([1], dtype=torch.int8).view(torch.quint8) if hasattr(torch, "quint8") else torch.ones(1),
     "expected an integer tensor"),
])
def test_odd_token_elements_are_value_errors(tokens, message):
    with pytest.raises(ValueError, match=message):
        token_bytes(tokens)
    with pytest.raises(ValueError, match=message):
        list(KeyChain("m", b"f", 4).iter_keys(tokens))


@pytest.mark.parametrize("device", ["xla", "mps", "privateuseone", "meta", "cuda:0"])
def test_a_device_that_cannot_hold_a_tensor_here_is_a_value_error(device):
    if device == "cuda:0" and torch.cuda.is_available():
        pytest.skip("CUDA is here")
    with pytest.raises(ValueError, match="device: expected"):
        check_device(device)


@pytest.mark.parametrize("shape, strides, overlaps", [
    ((2, 3, 4), (12, 4, 1), False),
    ((2, 3, 4), (1, 2, 6), False),  # a permuted contiguous tensor
    ((4, 3), (6, 2), False),  # every other column
    ((3, 3), (0, 1), True),  # expanded
    ((2, 5), (2, 1), True),  # rows overlap
    ((1, 5, 1), (0, 1, 0), False),  # dimensions of one element never overlap
    ((2, 2), (3, 2), False),  # offsets 0, 2, 3, 5
    ((3, 2), (2, 3), True),  # offsets 0, 2, 4, 3, 5, 7 share nothing, but interleave: refused, as documented
])
def test_may_overlap_judges_by_sizes_and_strides(shape, strides, overlaps):
    assert may_overlap(torch.zeros(64).as_strided(shape, strides)) is overlaps
