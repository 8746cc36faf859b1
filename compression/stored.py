"""How a tier below host RAM stores a block: the raw bytes, or a codec's frame.

A tier with a codec writes frames; every tier reads both forms, because a
directory may hold blocks written under another config (or by another
process sharing it). A payload is a frame when it starts with the frame
magic and parses with a good checksum; otherwise it is raw bytes, with one
exception: magic followed by a version (or codec id) this kvstore does not
know reads as a miss, since it may be a newer kvstore's frame and a frame
must never be served as KV (a raw block that starts that way by chance, a
few bit patterns in 2^32, is then a miss, never wrong data). Lossless
frames are always decoded; a lossy frame only by a tier configured with that
same codec, so turning a lossy codec off stops lossy blocks being served.
Tiers delete what they read as ``OTHER_CODEC`` (counted ``stale``), so the
next put of that prefix stores it again in the tier's own form.
"""

from __future__ import annotations

import torch

from kvstore.compression.codec import FrameCodec, as_uint8, host_bytes
from kvstore.compression.frame import MAGIC, FrameError, UnknownCodecError, UnsupportedVersionError
from kvstore.compression.lossless import RawCodec
from kvstore.compression.registry import codec_of
from kvstore.layout import KVLayout

# Verdicts of ``decode_into``.
INTACT, OTHER_SIZE, OTHER_CODEC, CORRUPT = "intact", "other-size", "other-codec", "corrupt"


class BlockEncoding:
    """Encodes blocks for one tier (``codec`` None or ``raw``: plain bytes) and decodes what it reads."""

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

    def encode(self, block: torch.Tensor) -> object:
        """The bytes-like payload to store for ``block``."""
        return host_bytes(block) if self.codec is None else self.codec.encode(block)

    def decode_into(self, payload: object, out: torch.Tensor) -> str:
        """Write the block ``payload`` holds into ``out``; a verdict (``INTACT`` only if ``out`` is valid).

        ``payload`` has passed its block header's checksum, so ``CORRUPT``
        means a damaged frame inside sound storage (or a wrong raw length).
        """
        view = memoryview(payload).cast("B")
        return self._decode(view, self._frame(view), out)

    @staticmethod
    def _frame(view: memoryview) -> tuple | str | None:
        """(codec, header, body) of the frame in ``view``; None for raw bytes; ``OTHER_CODEC`` if unreadable here."""
        if view.nbytes < len(MAGIC) or view[:len(MAGIC)] != MAGIC:
            return None
        try:
            return codec_of(view)
        except (UnsupportedVersionError, UnknownCodecError):
            return OTHER_CODEC  # written by a newer kvstore: not ours to judge or delete
        except FrameError:
            return None  # raw bytes that happen to start like a frame

    def _decode(self, view: memoryview, frame: tuple | str | None, out: torch.Tensor) -> str:
        """``decode_into`` once ``_frame`` has looked at the payload."""
        if frame == OTHER_CODEC:
            return OTHER_CODEC
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
        expected = out.numel() * out.element_size()
        if view.nbytes != expected:
            valid = 0 < view.nbytes <= self._layout.block_bytes and view.nbytes % self._layout.token_bytes == 0
            return OTHER_SIZE if valid else CORRUPT
        if expected:
            out.copy_(as_uint8(view).view(out.dtype).view(out.shape))
        return INTACT

    def decode_new(self, payload: object) -> torch.Tensor | None:
        """The block in ``payload`` as a new CPU tensor, or None if it cannot be read here."""
        view = memoryview(payload).cast("B")
        frame = self._frame(view)
        if frame is None:
            tokens = view.nbytes // self._layout.token_bytes
        elif frame == OTHER_CODEC:
            return None
        else:
            shape = frame[1].shape
            tokens = shape[2] if len(shape) == 5 else -1
        if not 0 < tokens <= self._layout.block_tokens:
            return None
        out = torch.empty(self._layout.shape(tokens), dtype=self._layout.dtype)
        return out if self._decode(view, frame, out) == INTACT else None
