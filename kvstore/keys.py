"""Prefix-chained block keys.

A key names a block of tokens *and its whole prefix*, so equal keys mean
equal KV and dedup across requests, processes and machines is safe. The byte
encoding is specified in ``docs/keys.md``; nothing here depends on
``PYTHONHASHSEED``, the process, the machine or the Python version.
"""

from __future__ import annotations

import array
import hashlib
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Union

import numpy as np
import torch
import xxhash

from kvstore.keymemo import KeyMemo

Tokens = Union[Sequence[int], np.ndarray, torch.Tensor]
Salt = Union[str, bytes, None]

ROOT_TAG = b"kvstore/root/v1\x00"
# One byte in front of a trailing partial block's message. Full-block messages
# are ``digest || 4*n bytes``; a partial one is one byte longer modulo 4, so
# the two can never be the same byte string.
PARTIAL_TAG = b"P"
# In front of a key an engine computed itself (``KeyChain.engine_key``).
ENGINE_TAG = b"E"
MAX_TOKEN_ID = 2**32 - 1

# Hash registry: name -> constructor of a hashlib-like object with update/digest,
# taking the first bytes to hash as its optional argument (one call a block).
HASHES: dict[str, Callable[..., "hashlib._Hash"]] = {
    "sha256": hashlib.sha256,
    "blake2b": lambda data=b"": hashlib.blake2b(data, digest_size=32),
    # Not collision resistant: only for single-tenant caches you fully trust.
    "xxh3_128": xxhash.xxh3_128,
}

_INTEGER_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
                             torch.uint32, torch.uint64})
_ARRAY_CODE = "I" if array.array("I").itemsize == 4 else "L"


def _bad_token_error(values: Sequence[object]) -> ValueError:
    for position, value in enumerate(values):
        if not isinstance(value, (int, np.integer)):
            return ValueError(f"tokens: expected integer token ids, got {value!r} at position {position}")
        if not 0 <= int(value) <= MAX_TOKEN_ID:
            return ValueError(
                f"tokens: expected token ids 0 <= id < 2**32, got {int(value)} at position {position}"
            )
    return ValueError("tokens: expected integer token ids 0 <= id < 2**32")


def token_bytes(tokens: Tokens) -> bytes:
    """Validate ``tokens`` and return them as little-endian u32 bytes (4 bytes a token).

    Accepts a list/tuple of ints, a 1-D integer numpy array or a 1-D integer
    torch tensor (any device). Raises ``ValueError`` naming the first bad id.
    In a list, ``True``/``False`` are the Python ints 1/0 they are (checking
    every element's type would cost more than hashing the prompt).
    """
    return packed_tokens(tokens).tobytes()


def packed_tokens(tokens: Tokens) -> memoryview:
    """``token_bytes`` as a byte view of a private copy, for the hashing paths.

    A lookup of 131,072 listed tokens spent 0.5 ms of its 1.2 ms in the final
    ``tobytes``: a second 512 KiB buffer, whose pages this VM faults in anew
    every call. The view's bytes are the caller's tokens as they were at the
    call, whatever the caller does to its list or array afterwards.
    """
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype not in _INTEGER_DTYPES:  # floats, bools, complex and quantized types
            raise ValueError(f"tokens: expected an integer tensor, got dtype {tokens.dtype}")
        if tokens.layout != torch.strided or tokens.device.type == "meta":
            raise ValueError(f"tokens: expected a dense tensor that holds data, got layout {tokens.layout} "
                             f"on device {tokens.device}")
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray):
        if isinstance(tokens, np.ma.MaskedArray):  # its min and max skip masked values the cast then wraps
            raise ValueError("tokens: expected a plain integer array, got a masked array (masked entries are no "
                             "token ids)")
        if tokens.ndim != 1:
            raise ValueError(f"tokens: expected a 1-D array, got shape {list(tokens.shape)}")
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens: expected an integer array, got dtype {tokens.dtype}")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > MAX_TOKEN_ID):
            raise _bad_token_error(tokens.tolist())
        return memoryview(np.array(tokens, dtype="<u4")).cast("B")  # always a copy, C-contiguous
    if not isinstance(tokens, (list, tuple)):
        raise ValueError(
            f"tokens: expected a list of ints, a 1-D numpy array or a 1-D torch tensor, "
            f"got {type(tokens).__name__}"
        )
    packed = array.array(_ARRAY_CODE)
    try:  # fromlist converts a list about a third faster than the constructor does
        packed.fromlist(tokens if isinstance(tokens, list) else list(tokens))
    except Exception:  # OverflowError, TypeError; or whatever an element's own __index__ raises
        raise _bad_token_error(tokens) from None
    if sys.byteorder == "big":
        packed.byteswap()
    return memoryview(packed).cast("B")


def _length_prefixed(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def salt_bytes(salt: Salt) -> bytes:
    if salt is None:
        return b"\x00"
    if isinstance(salt, str):
        try:
            salt = salt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"salt: expected a string that is valid UTF-8, got {salt!r} ({error.reason} at "
                             f"position {error.start})") from None
    if not isinstance(salt, (bytes, bytearray)):
        raise ValueError(f"salt: expected None, str or bytes, got {type(salt).__name__}")
    return b"\x01" + _length_prefixed(bytes(salt))


class BlockRef(NamedTuple):
    """One block of a token sequence: its key and the token range it covers."""

    key: bytes
    start: int  # first token (inclusive)
    end: int  # last token (exclusive)

    @property
    def num_tokens(self) -> int:
        """Tokens the block covers (``end - start``): ``block_tokens``, or fewer for a prompt's tail."""
        return self.end - self.start


def block_slices(kv: torch.Tensor, blocks: Sequence[BlockRef], block_tokens: int) -> Sequence[torch.Tensor]:
    """Each block's slice of ``kv`` (``[L, P, tokens, H, D]``, its token 0 is ``blocks[0].start``), in order.

    Consecutive blocks of one chain (the usual case) are cut with one
    ``split``: 128 slices of a 2,048-token prompt took 250 us one by one and
    90 us so, a few percent of a store's or read's copies of 2 MiB blocks.
    """
    if not blocks:
        return []
    offset = blocks[0].start
    if blocks[-1].start - offset == (len(blocks) - 1) * block_tokens:
        return kv[:, :, :blocks[-1].end - offset].split(block_tokens, dim=2)
    return [kv[:, :, b.start - offset:b.end - offset] for b in blocks]


class KeyChain:
    """Computes the prefix-chained keys of token sequences for one model and layout."""

    def __init__(self, model_id: str, fingerprint: bytes, block_tokens: int, hash_name: str = "sha256"):
        if hash_name not in HASHES:
            raise ValueError(f"hash: expected one of {sorted(HASHES)}, got {hash_name!r}")
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"model_id: expected a non-empty string, got {model_id!r}")
        try:
            model_name = model_id.encode()
        except UnicodeEncodeError:
            raise ValueError(f"model_id: expected a string of valid UTF-8, got {model_id!r}") from None
        if not isinstance(fingerprint, bytes):
            raise ValueError(f"fingerprint: expected bytes (KVLayout.fingerprint), got {type(fingerprint).__name__}")
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens: expected an integer >= 1, got {block_tokens!r}")
        self._new = HASHES[hash_name]
        self._root_prefix = ROOT_TAG + _length_prefixed(model_name) + _length_prefixed(fingerprint)
        self.block_tokens = block_tokens
        self.hash_name = hash_name
        self._memo = KeyMemo()
        self._unsalted_root = self._root_of(None)

    def root(self, salt: Salt = None) -> bytes:
        """Digest every chain starts from: domain tag, model id, layout fingerprint, salt."""
        return self._unsalted_root if salt is None else self._root_of(salt)

    def _root_of(self, salt: Salt) -> bytes:
        h = self._new()
        h.update(self._root_prefix + salt_bytes(salt))
        return h.digest()

    def engine_key(self, name: str | bytes, salt: Salt = None) -> bytes:
        """The store key of a block an engine names itself (SGLang's page hashes, for example).

        ``H(ENGINE_TAG || root(salt) || name)``: scoped to this model, layout
        and salt like every chain, and domain-separated from chained keys.
        """
        if not isinstance(name, (str, bytes, bytearray)):  # bytes(5) would be five zero bytes: another name's key
            raise ValueError(f"name: expected a str or bytes, got {type(name).__name__} {name!r:.80}")
        try:
            raw = name.encode() if isinstance(name, str) else bytes(name)
        except UnicodeEncodeError:
            raise ValueError(f"name: expected a str of valid UTF-8 or bytes, got {name!r}") from None
        if not raw:
            raise ValueError("name: expected a non-empty engine key, got an empty one")
        h = self._new()
        h.update(ENGINE_TAG + self.root(salt) + raw)
        return h.digest()

    def iter_blocks(self, tokens: Tokens, salt: Salt = None) -> Iterator[BlockRef]:
        """Yield the full blocks of ``tokens`` in order, then the trailing partial block if any.

        Lazy, so a caller that stops at the first miss hashes no further.
        """
        data = packed_tokens(tokens)
        return self._iter_packed(data, self.root(salt))

    def iter_keys(self, tokens: Tokens, salt: Salt = None) -> Iterator[bytes]:
        """The keys of ``iter_blocks`` alone (block ``i`` starts at token ``i * block_tokens``), as lazily.

        ``tokens`` are checked here, before the first key is drawn.
        """
        data = packed_tokens(tokens)
        return self._keys_of(data, self.root(salt))

    def blocks(self, tokens: Tokens, salt: Salt = None) -> list[BlockRef]:
        """All blocks of ``tokens`` (full ones, then the partial tail)."""
        return list(self.iter_blocks(tokens, salt))

    def _iter_packed(self, data: memoryview, parent: bytes) -> Iterator[BlockRef]:
        block_tokens = self.block_tokens
        num_tokens = len(data) // 4
        for start, key in zip(range(0, num_tokens, block_tokens), self._keys_of(data, parent)):
            yield BlockRef(key, start, min(start + block_tokens, num_tokens))

    def _keys_of(self, data: memoryview, parent: bytes) -> Iterator[bytes]:
        # H(parent || block) from a copy of one empty hash object: a lookup of
        # 512 blocks spent as long calling into hashlib as hashing, and a new
        # OpenSSL 3 object costs a quarter more than a copy (0.79 -> 0.60 ms).
        step = 4 * self.block_tokens
        full_end = len(data) // step * step
        root = parent
        keys = list(self._memo.known(root, data, step))  # the full blocks' keys drawn, the known ones first
        known = len(keys)
        try:
            yield from keys
            if keys:
                parent = keys[-1]
            empty = self._new()
            for offset in range(known * step, full_end, step):
                h = empty.copy()
                h.update(parent)
                h.update(data[offset:offset + step])
                parent = h.digest()
                keys.append(parent)
                yield parent
        finally:
            if len(keys) > known:
                self._memo.remember(root, data, step, keys)
        if full_end < len(data):
            h = self._new()
            h.update(PARTIAL_TAG + parent)
            h.update(data[full_end:])
            yield h.digest()
