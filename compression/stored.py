"""How a tier below host RAM stores a block: the raw bytes, or a codec's frame.

The block header says which (``BlockHeader.encoding``: raw, or the codec id
of a frame); nothing is guessed from the payload, so raw KV whose bytes
happen to form a valid frame is served as the raw KV it is, and a frame
is never served as raw KV.

A tier with a codec writes frames; a lossy one writes a block holding NaN or
infinity as an exact frame (quantising it would spread the non-finite value
over its group or channel, onto finite values). Every tier reads raw blocks and lossless
frames, because a directory may hold blocks written under another config
(or by another process sharing it). A lossy frame is decoded only by a tier
configured with that same codec: a store that did not opt into a lossy
codec never gets approximate bytes, whatever another process wrote into a
shared tier; and a shared tier stores a lossy form under names of its own
(``BlockEncoding.stored_name``), so stores of other codecs never meet its blocks.
A frame of a codec id this kvstore does not know (a newer kvstore's) is a
miss. Tiers delete what they read as ``OTHER_CODEC`` (counted ``stale``), so
the next put of that prefix stores it again in the tier's own form.
"""

from __future__ import annotations

import hashlib
import struct

import torch
import xxhash

from kvstore.blockformat import ENCODING_RAW
from kvstore.compression.codec import FrameCodec, as_uint8, host_bytes
from kvstore.compression.frame import FrameError, UnknownCodecError, UnsupportedVersionError, frame_codec_id
from kvstore.compression.lossless import RawCodec
from kvstore.compression.registry import CODEC_CLASSES, codec_of
from kvstore.layout import KVLayout

# Verdicts of ``decode_into``.
INTACT, OTHER_SIZE, OTHER_CODEC, CORRUPT = "intact", "other-size", "other-codec", "corrupt"
_EXACT = RawCodec()  # stateless


def frame_encoding(codec: FrameCodec) -> int:
    """The header's ``encoding`` for a payload that is a frame of ``codec``."""
    return codec.codec_id + 1


# The largest magnitude a lossy codec is given, per dtype: past it their float arithmetic overflows (rq's
# centring in fp16 at |x| = 60,000, ec's squares in fp32 at 1e19, rq's norms at 1e38), and a finite block
# decoded into NaN, which an attention spreads over the whole request. Real KV stays far below.
LOSSY_MAX_ABS = {torch.float16: torch.finfo(torch.float16).max / 4, torch.bfloat16: 1e15, torch.float32: 1e15}


def codable(block: torch.Tensor) -> bool:
    """Whether a lossy codec may approximate ``block``: finite, and within ``LOSSY_MAX_ABS`` of zero. Other
    blocks are stored exact: quantising one NaN or infinity spread it over its group or channel (kivi4 turned
    31 finite values into NaN, rq4 a whole head), and huge values overflowed the codecs' arithmetic."""
    if block.numel() == 0:
        return True
    low, high = torch.aminmax(block)  # NaN if any value is: never within a limit; no copy of the block
    limit = LOSSY_MAX_ABS.get(block.dtype, 0.0)
    return bool(-limit <= low) and bool(high <= limit)


class BlockEncoding:
    """Encodes blocks for one tier (``codec`` None or ``raw``: plain bytes) and decodes what it reads.

    ``header_encoding(payload)`` is what goes into the header of a payload
    ``encode`` returned; ``lossy`` names the lossy codec this tier stores
    with (None: the tier is exact).
    """

    def __init__(self, layout: KVLayout, codec: FrameCodec | None = None):
        if codec is not None and not isinstance(codec, FrameCodec):
            raise ValueError(f"codec: expected a kvstore codec or None, got {type(codec).__name__}")
        self._layout = layout
        self.codec = None if codec is None or isinstance(codec, RawCodec) else codec
        if self.codec is not None:
            try:
                self.codec.check_tensor(torch.empty(layout.shape(1), dtype=layout.dtype))
            except ValueError as exc:
                raise ValueError(f"codec {self.codec.name}: cannot store this layout's blocks ({exc})") from None
        self.name = self.codec.name if self.codec is not None else "raw"
        self.lossy = None if self.codec is None or self.codec.lossless else self.codec.name
        # Names this tier's lossy form beside the header's codec id: kivi4 and kivi2 (or rq4 and rq3) share one.
        self.form = 0 if self.lossy is None else xxhash.xxh3_64_intdigest(
            struct.pack(f"<{1 + len(self.codec.params())}q", self.codec.codec_id, *self.codec.params()))

    def stored_name(self, key: bytes) -> bytes:
        """What block ``key`` is stored as in a shared tier (a files directory, a cache server, Redis): the key
        itself for exact forms, which every tier reads; another name of the same length for this tier's lossy
        form. Stores of other codecs sharing the tier then never meet each other's lossy blocks: each counted
        the other's as held and deleted it on reading, so neither got a hit."""
        if not self.form:
            return key
        return hashlib.blake2b(key, digest_size=len(key), key=self.form.to_bytes(8, "little")).digest()

    def form_of(self, payload: object) -> int:
        """``form`` if ``payload`` (from ``encode``) is in this tier's lossy form, else 0 (exact)."""
        return self.form if self.form and self.header_encoding(payload) == self.codec.codec_id + 1 else 0

    def foreign(self, encoding: int, form: int) -> bool:
        """Whether a block whose header says ``encoding``, written as ``form`` (``form_of``), is one this tier
        never serves (``OTHER_CODEC``): another codec's lossy form, this codec's with other parameters, or a
        codec this kvstore does not know. A tier that reads its headers at open drops it, so a put stores the
        block again instead of counting it as held."""
        if encoding == ENCODING_RAW:
            return False
        cls = CODEC_CLASSES.get(encoding - 1)
        return cls is None or not cls.lossless and (self.codec is None or cls.codec_id != self.codec.codec_id
                                                    or form != self.form)

    def encode(self, block: torch.Tensor) -> object:
        """The bytes-like payload to store for ``block`` (its header's encoding: ``header_encoding``)."""
        if self.codec is None:
            return host_bytes(block)
        if self.lossy is not None and not codable(block):
            return _EXACT.encode(block)
        return self.codec.encode(block)

    def header_encoding(self, payload: object) -> int:
        """The header's ``encoding`` for ``payload``, which ``encode`` returned: raw bytes, or the codec of
        the frame it made (the tier's, or an exact frame of a non-finite block)."""
        return ENCODING_RAW if self.codec is None else frame_codec_id(payload) + 1

    def decode_into(self, payload: object, out: torch.Tensor, encoding: int) -> str:
        """Write the block ``payload`` holds into ``out``; a verdict (``INTACT`` only if ``out`` is valid).

        ``encoding`` is the header's: raw bytes or a frame of one codec.
        ``payload`` has passed its block header's checksum, so ``CORRUPT``
        means a damaged frame inside sound storage (or a wrong raw length).
        """
        view = memoryview(payload).cast("B")
        return self._decode(view, self._frame(view, encoding), out)

    def _frame(self, view: memoryview, encoding: int) -> tuple | str | None:
        """(codec, header, body) of the frame the header announced; None for raw bytes; else a verdict."""
        if encoding == ENCODING_RAW:
            return None
        if encoding - 1 not in CODEC_CLASSES:
            return OTHER_CODEC  # written by a newer kvstore: not ours to judge
        try:
            frame = codec_of(view)
        except (UnsupportedVersionError, UnknownCodecError):
            return OTHER_CODEC
        except FrameError:
            return CORRUPT  # the header promised a frame
        if frame[0].codec_id != encoding - 1:
            return CORRUPT
        return frame

    def _decode(self, view: memoryview, frame: tuple | str | None, out: torch.Tensor) -> str:
        """``decode_into`` once ``_frame`` has looked at the payload."""
        if isinstance(frame, str):
            return frame
        if frame is not None:
            codec, header, body = frame
            if not (codec.lossless or codec == self.codec):
                return OTHER_CODEC
            if header.shape != tuple(out.shape) or header.dtype != out.dtype:
                return OTHER_SIZE
            try:
                codec.decode_payload(header, body, out, None)
            except FrameError:
                return CORRUPT
            return INTACT
        expected = out.nbytes
        if view.nbytes != expected:
            valid = 0 < view.nbytes <= self._layout.block_bytes and view.nbytes % self._layout.token_bytes == 0
            return OTHER_SIZE if valid else CORRUPT
        if expected:
            out.copy_(as_uint8(view).view(out.dtype).view(out.shape))
        return INTACT

    def decode_new(self, payload: object, encoding: int) -> torch.Tensor | None:
        """The block in ``payload`` (header ``encoding``) as a new CPU tensor, or None if it cannot be read here."""
        view = memoryview(payload).cast("B")
        frame = self._frame(view, encoding)
        if isinstance(frame, str):
            return None
        if frame is None:
            tokens = view.nbytes // self._layout.token_bytes
        else:
            shape = frame[1].shape
            tokens = shape[2] if len(shape) == 5 else -1
        if not 0 < tokens <= self._layout.block_tokens:
            return None
        out = torch.empty(self._layout.shape(tokens), dtype=self._layout.dtype)
        return out if self._decode(view, frame, out) == INTACT else None
