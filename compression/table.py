"""The codec comparison ``kvstore codecs`` prints: size, fidelity and speed of every codec, one run.

Each row round-trips the same synthetic KV (``fidelity.synthetic_kv``, with
the structure fitted to SmolLM2's KV: ``fidelity.SMOLLM2_SPEC``) and
the same small Llama's prefix cache (``fidelity.ModelCheck``). Speeds are
GB/s of 16-bit input on one CPU core (torch limited to one thread while
timing), next to ``Tensor.copy_`` of the same tensor measured in the same run.
Peers (transformers' ``QuantizedCache`` with the quanto backend) are rows of
the same table when ``optimum-quanto`` is installed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvstore.compression import fidelity
from kvstore.compression.registry import get_codec
from kvstore.validation import check_counts

DEFAULT_SPECS = ("raw", "zstd", "zstd:level=9", "int8", "kivi4", "kivi4:group=64", "kivi2", "rq4", "rq3", "rq2",
                 "int8:zstd=3", "kivi4:group=64,zstd=3", "kivi4:group=128,zstd=3", "kivi4:value_bits=3,zstd=3",
                 "kivi4:value_bits=2,zstd=3", "kivi2:zstd=3", "rq3:zstd=3", "ec4", "ec5", "ec4:rope=100000",
                 "ec5:rope=100000")
COLUMNS = ("codec", "ratio", "k_rel_err", "v_rel_err", "attn_cos_diffuse", "attn_cos_peaked", "attn_cos_min",
           "top1_agree", "kl_mean", "encode_gbps", "decode_gbps")


@dataclass(frozen=True)
class TableSettings:
    """What ``codec_table`` measures on: synthetic KV size (tokens x layers x heads x head_dim), dtype, repeats."""

    layers: int = 4
    heads: int = 8
    tokens: int = 512
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16
    repeats: int = 3
    model: bool = True
    peers: bool = True
    text: "Any" = None  # a text_check.TextCheck: the real model's columns (delta_ppl, top1_text, ...)
    spec: fidelity.SyntheticSpec = fidelity.SMOLLM2_SPEC  # the synthetic KV's structure: fitted to a real model

    def __post_init__(self) -> None:
        check_counts(self, ("layers", "heads", "tokens", "head_dim", "repeats"))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread while inside (the per-core figures), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call, seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _row(name: str, kv: torch.Tensor, stored_bytes: int, decoded: torch.Tensor,
         roundtrip: Callable[[torch.Tensor], torch.Tensor], check: fidelity.ModelCheck | None,
         text: Any = None, size_of: Callable[[torch.Tensor], int] | None = None) -> dict[str, object]:
    """Size and fidelity of one codec: ``decoded`` is ``kv`` after it, ``roundtrip`` runs it on the models' KV,
    ``size_of(block)`` the bytes it keeps for a block of the real model's KV."""
    row: dict[str, object] = {"codec": name, "ratio": kv.numel() * 2 / stored_bytes}
    row.update(fidelity.kv_metrics(kv, decoded))
    if check is not None:
        model = check.run(roundtrip)
        row.update(top1_agree=model["top1_agree"], kl_mean=model["kl_mean"])
    if text is not None:
        real = text.run(roundtrip)
        row.update(delta_ppl=real["delta_ppl"], top1_text=real["top1_agree"], top1_confident=real["top1_confident"],
                   kl_text=real["kl_mean"], ratio_text=text.stored_ratio(size_of) if size_of else float("nan"))
    return row


def codec_table(specs: Sequence[str] = DEFAULT_SPECS, settings: TableSettings | None = None,
                progress: Callable[[str], None] | None = None) -> tuple[list[dict[str, object]], dict[str, float]]:
    """(one dict per codec with ``COLUMNS``, context: the copy ceiling in GB/s and the KV shape)."""
    settings = settings or TableSettings()
    codecs = [(spec, get_codec(spec)) for spec in specs]  # bad specs fail before any measuring
    kv = fidelity.synthetic_kv(settings.layers, settings.heads, settings.tokens, settings.head_dim,
                               dtype=settings.dtype, spec=settings.spec)
    input_bytes = kv.nbytes
    check = fidelity.ModelCheck(fidelity.ModelCheckSettings(kv_dtype=settings.dtype)) if settings.model else None
    with one_thread():
        out = torch.empty_like(kv)
        copy_gbps = input_bytes / best_seconds(lambda: out.copy_(kv), settings.repeats) / 1e9
    rows = []
    for spec, codec in codecs:
        if progress is not None:
            progress(spec)
        frame = codec.encode(kv)
        row = _row(spec, kv, len(frame), codec.decode(frame), lambda t, c=codec: c.decode(c.encode(t)), check,
                   settings.text, lambda t, c=codec: len(c.encode(t)))
        with one_thread():
            row["encode_gbps"] = input_bytes / best_seconds(lambda: codec.encode(kv), settings.repeats) / 1e9
            row["decode_gbps"] = input_bytes / best_seconds(lambda: codec.decode(frame), settings.repeats) / 1e9
        rows.append(row)
    if settings.peers:
        rows.extend(_peer_rows(kv, check, settings, progress))
    return rows, {"copy_gbps": copy_gbps, "input_bytes": float(input_bytes)}


def _peer_rows(kv: torch.Tensor, check: fidelity.ModelCheck | None, settings: TableSettings,
               progress: Callable[[str], None] | None) -> list[dict[str, object]]:
    """transformers ``QuantizedCache(backend="quanto")`` at 4 and 2 bits, if optimum-quanto is installed."""
    import importlib.util

    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        return []
    rows = []
    for bits in (4, 2):
        name = f"transformers quanto {bits}-bit"
        if progress is not None:
            progress(name)
        quanto = fidelity.QuantoSettings(bits=bits)
        result = fidelity.quanto_quantize(kv, quanto)
        row = _row(name, kv, result.stored_bytes, result.decoded,
                   lambda t, q=quanto: fidelity.quanto_quantize(t, q).decoded, check, settings.text,
                   lambda t, q=quanto: fidelity.quanto_quantize(t, q).stored_bytes)
        with one_thread():
            seconds = best_seconds(lambda: fidelity.quanto_quantize(kv, quanto), settings.repeats)
        row["encode_gbps"] = kv.nbytes / seconds / 1e9  # quantize + dequantize together
        row["decode_gbps"] = float("nan")
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, object]], context: dict[str, float]) -> str:
    """A Markdown table of ``rows`` (as ``codec_table`` returns them) with a line on the ceiling; the real
    model's columns (SmolLM2 on real text) first when the rows have them, the synthetic ones beside."""
    real = any("delta_ppl" in row for row in rows)
    header = "| codec | ratio vs 16-bit (synthetic) | "
    if real:
        header += ("ratio on SmolLM2's KV | SmolLM2 ΔPPL | SmolLM2 top-1 | top-1 where it leads by ≥ 1 nat | "
                   "SmolLM2 KL (nats) | ")
    header += ("K rel err | V rel err | attn cos diffuse | attn cos peaked | attn cos min | random-model top-1 | "
               "random-model KL (nats) | encode GB/s | decode GB/s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cells = [str(row["codec"]), f"{row['ratio']:.2f}x"]
        if real:
            cells += [f"{row['ratio_text']:.2f}x", f"{row['delta_ppl'] * 100:+.2f}%", f"{row['top1_text'] * 100:.1f}%",
                      f"{row['top1_confident'] * 100:.1f}%", f"{row['kl_text']:.2e}"] if "delta_ppl" in row \
                else ["-"] * 5
        cells += [f"{row[k]:.4f}" for k in ("k_rel_err", "v_rel_err")]
        cells += [f"{row[k]:.5f}" for k in ("attn_cos_diffuse", "attn_cos_peaked", "attn_cos_min")]
        cells += [f"{row['top1_agree'] * 100:.1f}%" if "top1_agree" in row else "-"]
        cells += [f"{row['kl_mean']:.2e}" if "kl_mean" in row else "-"]
        cells += [_speed(row.get("encode_gbps")), _speed(row.get("decode_gbps"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Speeds on one CPU core; Tensor.copy_ of the same {context['input_bytes'] / 2**20:.0f} MiB "
                 f"in the same run: {context['copy_gbps']:.1f} GB/s. Peer rows time quantize + dequantize together.")
    return "\n".join(lines)


def _speed(value: object) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"
