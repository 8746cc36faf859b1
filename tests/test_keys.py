"""Keys: the documented vectors, the encoding spelled out with hashlib, and input handling."""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import KeyChain, KVLayout
from kvstore.keys import HASHES, token_bytes

DOC = Path(__file__).resolve().parents[1] / "docs" / "keys.md"
TOKENS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


def _doc_values() -> dict[str, str]:
    text = DOC.read_text()
    blocks = re.findall(r"```text\n(.*?)```", text, flags=re.S)
    values = {}
    for block in blocks:
        for line in block.splitlines():
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def doc_chain() -> tuple[KVLayout, KeyChain]:
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_tokens=4)
    return layout, KeyChain("llama-3-8b", layout.fingerprint, 4, "sha256")


def test_docs_worked_example_matches(doc_chain):
    layout, chain = doc_chain
    doc = _doc_values()
    assert layout.describe() == doc["layout"]
    assert layout.fingerprint.hex() == doc["fingerprint"]
    assert chain.root().hex() == doc["root"]
    blocks = chain.blocks(TOKENS)
    assert [(b.start, b.end) for b in blocks] == [(0, 4), (4, 8), (8, 10)]
    assert [b.key.hex() for b in blocks] == [doc["key[0]"], doc["key[1]"], doc["tail"]]
    salted = chain.blocks(TOKENS, salt="tenant-a")
    assert chain.root("tenant-a").hex() == doc["salt_root"]
    assert [b.key.hex() for b in salted] == [doc["salt_key[0]"], doc["salt_key[1]"], doc["salt_tail"]]


def test_docs_python_snippet_runs():
    snippet = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(snippet) == 1
    exec(compile(snippet[0], str(DOC), "exec"), {})


def test_encoding_recomputed_with_hashlib(doc_chain):
    layout, chain = doc_chain
    model = b"llama-3-8b"
    root_input = (b"kvstore/root/v1\x00" + struct.pack("<I", len(model)) + model
                  + struct.pack("<I", 16) + layout.fingerprint + b"\x00")
    assert chain.root() == hashlib.sha256(root_input).digest()
    salt = "tenant-a".encode()
    salted_input = root_input[:-1] + b"\x01" + struct.pack("<I", len(salt)) + salt
    assert chain.root("tenant-a") == hashlib.sha256(salted_input).digest()


def test_token_forms_agree(doc_chain):
    _, chain = doc_chain
    expected = [b.key for b in chain.blocks(TOKENS)]
    for form in (tuple(TOKENS), np.array(TOKENS, dtype=np.int64), np.array(TOKENS, dtype=np.uint32),
                 torch.tensor(TOKENS, dtype=torch.int64), torch.tensor(TOKENS, dtype=torch.int32)):
        assert [b.key for b in chain.blocks(form)] == expected


def test_full_and_partial_keys_follow_the_spec(doc_chain):
    _, chain = doc_chain
    root = chain.root()
    full, tail = chain.blocks([7, 8, 9, 10, 11])
    assert full.key == hashlib.sha256(root + struct.pack("<4I", 7, 8, 9, 10)).digest()
    assert tail.key == hashlib.sha256(b"P" + full.key + struct.pack("<I", 11)).digest()
    (short,) = chain.blocks([7, 8, 9])
    assert short.key == hashlib.sha256(b"P" + root + struct.pack("<3I", 7, 8, 9)).digest()
    assert (short.start, short.end) == (0, 3)


def test_hashes_give_different_keys(doc_chain):
    layout, _ = doc_chain
    keys = {name: KeyChain("m", layout.fingerprint, 4, name).blocks(TOKENS)[0].key
            for name in ("sha256", "blake2b", "xxh3_128")}
    assert len(set(keys.values())) == 3
    assert len(keys["xxh3_128"]) == 16 and len(keys["sha256"]) == 32


@pytest.mark.parametrize("bad, fragment", [
    ([1, -1], "got -1 at position 1"),
    ([2**32], "got 4294967296 at position 0"),
    ([1, 2.0], "got 2.0 at position 1"),
    (np.zeros((2, 2), dtype=np.int64), "1-D array, got shape [2, 2]"),
    (np.array([1.0]), "integer array, got dtype float64"),
    (np.array([-5], dtype=np.int64), "got -5 at position 0"),
    (torch.tensor([1.0]), "integer tensor, got dtype torch.float32"),
    ("abc", "got str"),
    # its min and max skip masked entries, which the cast to u32 then wrapped: -1 became [..., 4294967295]'s key
    (np.ma.array([1, 2, 3, -1], mask=[0, 0, 0, 1]), "got a masked array"),
])
def test_bad_tokens_raise(bad, fragment):
    with pytest.raises(ValueError) as info:
        token_bytes(bad)
    assert fragment in str(info.value)


def test_unknown_hash_and_empty_model_rejected():
    with pytest.raises(ValueError, match="hash: expected one of"):
        KeyChain("m", b"\x00" * 16, 4, "md5")
    with pytest.raises(ValueError, match="model_id"):
        KeyChain("", b"\x00" * 16, 4)


@pytest.mark.parametrize("args, message", [
    (("m", b"fp", -1), "block_tokens: expected an integer >= 1, got -1"),  # gave no keys, no error
    (("m", b"fp", 0), "block_tokens: expected an integer >= 1, got 0"),
    (("m", b"fp", "4"), "block_tokens: expected an integer >= 1, got '4'"),
    (("m", b"fp", True), "block_tokens: expected an integer >= 1, got True"),
    (("m", "fp", 4), "fingerprint: expected bytes"),
    (("\ud800", b"fp", 4), "model_id: expected a string of valid UTF-8"),
])
def test_a_key_chain_refuses_bad_settings_when_made(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        KeyChain(*args)


SPELLED_OUT = {  # each registered hash, fed the way docs/keys.md spells it: update(parent), update(block)
    "sha256": hashlib.sha256,
    "blake2b": lambda: hashlib.blake2b(digest_size=32),
    "xxh3_128": xxhash.xxh3_128,
}


def _spelled_out_keys(chain: KeyChain, name: str, tokens: list[int]) -> list[bytes]:
    keys, parent, n = [], chain.root(), chain.block_tokens
    for start in range(0, len(tokens), n):
        h = SPELLED_OUT[name]()
        block = tokens[start:start + n]
        if len(block) < n:
            h.update(b"P")
        h.update(parent)
        h.update(struct.pack(f"<{len(block)}I", *block))
        parent = h.digest()
        keys.append(parent)
    return keys


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(SPELLED_OUT)), block_tokens=st.integers(1, 9),
       tokens=st.lists(st.integers(0, 2**32 - 1), max_size=40))
def test_keys_follow_the_spec_for_every_hash(name, block_tokens, tokens):
    chain = KeyChain("m", b"\x01" * 16, block_tokens, name)
    expected = _spelled_out_keys(chain, name, tokens)
    blocks = chain.blocks(tokens)
    assert [b.key for b in blocks] == expected
    assert list(chain.iter_keys(tokens)) == expected
    assert [(b.start, b.end) for b in blocks] == [(s, min(s + block_tokens, len(tokens)))
                                                  for s in range(0, len(tokens), block_tokens)]


def test_key_registry_covers_every_hash():
    assert set(SPELLED_OUT) == set(HASHES)


@pytest.mark.parametrize("form", ["list", "numpy uint32", "numpy int64", "tensor"])
def test_lazy_keys_are_of_the_tokens_as_they_were_when_asked(doc_chain, form):
    """``iter_keys`` draws keys lazily; a caller changing its tokens meanwhile must not change them."""
    _, chain = doc_chain
    tokens = list(range(1, 17))
    values = {"list": lambda: list(tokens), "numpy uint32": lambda: np.array(tokens, dtype=np.uint32),
              "numpy int64": lambda: np.array(tokens, dtype=np.int64),
              "tensor": lambda: torch.tensor(tokens, dtype=torch.int32)}[form]()
    expected = [b.key for b in chain.blocks(tokens)]
    keys = chain.iter_keys(values)
    first = next(keys)
    values[4:] = values[4:] * 0 + 99 if form != "list" else [99] * 12
    assert [first, *keys] == expected
