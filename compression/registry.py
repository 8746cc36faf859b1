"""Codecs by name (for configs) and by frame id (for decoding anything a frame names).

A spec is a name, optionally with parameters: ``"kivi4"``,
``"kivi2:group=64,residual=128"``, ``"rq3:zstd=3"``, ``"zstd:level=9"``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch

from kvstore.compression.codec import FrameCodec
from kvstore.compression.entropy import PRESETS as EC_PRESETS
from kvstore.compression.entropy import EntropyCodec
from kvstore.compression.frame import FrameHeader, UnknownCodecError, parse_frame
from kvstore.compression.lossless import RawCodec, ZstdCodec
from kvstore.compression.quant import Int8Codec, KiviCodec
from kvstore.compression.rotation import RotationCodec

_INTEGER = re.compile(r"[-+]?[0-9]+")

# Frame codec id -> class; ids are on disk: never renumber, only append.
CODEC_CLASSES: dict[int, type[FrameCodec]] = {
    cls.codec_id: cls for cls in (RawCodec, ZstdCodec, Int8Codec, KiviCodec, RotationCodec, EntropyCodec)
}

# Names a config may use -> factory (taking the spec's parameters).
CODECS: dict[str, Callable[..., FrameCodec]] = {
    "raw": RawCodec,
    "zstd": ZstdCodec,
    "int8": Int8Codec,
    "kivi4": functools.partial(KiviCodec, bits=4),
    "kivi2": functools.partial(KiviCodec, bits=2),
    "rq4": functools.partial(RotationCodec, bits=4),
    "rq3": functools.partial(RotationCodec, bits=3),
    "rq2": functools.partial(RotationCodec, bits=2),
    **{name: functools.partial(EntropyCodec, key_step=k, value_step=v) for name, (k, v) in EC_PRESETS.items()},
}


def parse_spec(spec: str) -> tuple[str, dict[str, int]]:
    """(name, parameters) of ``"name"`` or ``"name:key=value,key=value"``; ValueError if malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"codec: expected a name such as {sorted(CODECS)}, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    if name not in CODECS:
        raise ValueError(f"codec: expected one of {sorted(CODECS)}, got {name!r}")
    params: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not _INTEGER.fullmatch(value):  # int() also took "1_0" and other digits
            raise ValueError(f"codec {spec!r}: expected parameters as key=integer, got {item!r}")
        if key in params:
            raise ValueError(f"codec {spec!r}: expected each parameter once, got {key!r} twice")
        params[key] = int(value)
    return name, params


def get_codec(spec: str, **params: int) -> FrameCodec:
    """The codec ``spec`` names, with its parameters (and ``params``) applied; ValueError if unknown."""
    name, parsed = parse_spec(spec)
    parsed.update(params)
    fixed = getattr(CODECS[name], "keywords", {}).get("bits")
    if fixed is not None and "bits" in parsed:  # 'kivi4:bits=2' made a kivi2 under kivi4's name
        raise ValueError(f"codec {spec!r}: the name sets bits={fixed}; expected no bits parameter (the names "
                         f"with other bits: {sorted(n for n in CODECS if n.rstrip('0123456789') == name.rstrip('0123456789'))})")
    try:
        return CODECS[name](**parsed)
    except TypeError:
        raise ValueError(f"codec {spec!r}: unknown parameter in {sorted(parsed)}") from None


def codec_of(frame: object) -> tuple[FrameCodec, FrameHeader, memoryview]:
    """The codec a frame was written with, its header and payload; raises a ``FrameError``."""
    header, payload = parse_frame(frame)
    cls = CODEC_CLASSES.get(header.codec_id)
    if cls is None:
        raise UnknownCodecError(f"frame: expected a codec id in {sorted(CODEC_CLASSES)}, got {header.codec_id}")
    return cls.from_params(header.params), header, payload


def decode(frame: object, out: torch.Tensor | None = None,
           device: torch.device | str | None = None) -> torch.Tensor:
    """Decode a frame of any codec; ``out`` (same shape and dtype) is written if given."""
    codec, header, payload = codec_of(frame)
    return codec.decode_payload(header, payload, out, device)
