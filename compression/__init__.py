"""Codecs for KV blocks: self-describing frames, lossless and quantized, and the fidelity harness."""

from kvstore.compression.codec import Codec, FrameCodec
from kvstore.compression.entropy import EntropyCodec
from kvstore.compression.frame import (
    BadMagicError,
    BadParamsError,
    ChecksumError,
    FrameError,
    TruncatedFrameError,
    UnknownCodecError,
    UnsupportedVersionError,
)
from kvstore.compression.lossless import RawCodec, ZstdCodec
from kvstore.compression.quant import Int8Codec, KiviCodec
from kvstore.compression.registry import CODECS, codec_of, decode, get_codec, parse_spec
from kvstore.compression.rotation import RotationCodec

__all__ = [
    "CODECS", "BadMagicError", "BadParamsError", "ChecksumError", "Codec", "EntropyCodec", "FrameCodec", "FrameError",
    "Int8Codec", "KiviCodec", "RawCodec", "RotationCodec", "TruncatedFrameError", "UnknownCodecError",
    "UnsupportedVersionError", "ZstdCodec", "codec_of", "decode", "get_codec", "parse_spec",
]
