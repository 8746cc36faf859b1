"""Which model's KV this is: a digest of the weights, not the path they were loaded from.

Stored KV is only valid for the exact weights that computed it. Naming the
model by its path is wrong both ways: the same weights under two paths (two
mount points, a copy per node) share nothing, and two different fine-tunes
at one path over time would share wrong KV. So the default model id is a
digest of the files that determine the KV (weights and ``config.json``):

* a file that is a Hugging Face cache link (``.../blobs/<sha256>``) is named
  by its blob, which is the content's sha256 already: free;
* any other file is hashed once (sha256, about 1-2 GB/s) and the digest is
  kept in ``$XDG_CACHE_HOME/kvstore/weight-digests.json`` keyed by the
  file's real path, size, mtime and inode, so later starts cost a stat.

A model vLLM names by hub id is looked up in the local Hugging Face cache;
if its files cannot be found (weights streamed from object storage, say)
the id is ``name@revision``. An explicit ``model_id`` skips all of this.

Engine settings that change the KV computed from the same weights (vLLM's
``--hf-overrides``, SGLang's ``--json-model-override-args``, a quantization
applied at load) are bound too, by ``bind_engine_settings``: one checkpoint
served with another RoPE base or scaling must never share KV.
"""

from __future__ import annotations

import functools
import hashlib
import json
import marshal
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_BLOB = re.compile(r"[0-9a-f]{64}")
_CHUNK = 16 << 20


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvstore" / "weight-digests.json"


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.name == "config.json" or path.name.endswith(WEIGHT_SUFFIXES):
            if path.is_file():
                yield path


def _content_id(path: Path, cache: dict[str, str]) -> str:
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _BLOB.fullmatch(real.name):
        return real.name  # a Hugging Face cache blob is named by its content's sha256
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if key not in cache:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        cache[key] = h.hexdigest()
    return cache[key]


def _load_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
    except (OSError, ValueError, AttributeError):
        return {}


def _save_cache(path: Path, cache: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".weight-digests-")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)  # atomic: ranks hashing side by side never read half a file
    except OSError as exc:
        log.info("could not keep weight digests in %s (%s); they are recomputed next start", path, exc)


def folder_digest(folder: str | os.PathLike[str]) -> str | None:
    """``weights-sha256:<hex>`` of a model folder's weights and config, or None if it has no weight file."""
    folder = Path(folder)
    cache_path = _cache_file()
    cache = _load_cache(cache_path)
    before = dict(cache)
    h = hashlib.sha256()
    weights = 0
    for path in _files(folder):
        weights += path.name != "config.json"
        h.update(f"{path.relative_to(folder).as_posix()}\0{_content_id(path, cache)}\n".encode())
    if cache != before:
        _save_cache(cache_path, cache)
    return f"weights-sha256:{h.hexdigest()[:32]}" if weights else None


def _hub_folder(name: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:
        return None


def default_model_id(model: str, revision: str | None = None) -> str:
    """The model id of the weights vLLM or SGLang loads as ``model`` (a folder or a hub id); see module docstring."""
    folder = Path(model) if os.path.isdir(model) else _hub_folder(model, revision)
    if folder is not None:
        try:
            digest = folder_digest(folder)
        except OSError as exc:
            log.warning("could not read the weights of %s to name them (%s); naming the model by %r instead",
                        folder, exc, model)
            digest = None
        if digest is not None:
            return digest
    return f"{model}@{revision or 'default'}"


_MAX_DEPTH = 16


def _canonical(value: object, depth: int = 0) -> object:
    """``value`` as JSON-able data, the same in every process: a function by its code, defaults and closure
    (what it reads from its module's globals is not seen), a ``functools.partial`` with its arguments."""
    if depth > _MAX_DEPTH:  # a function whose closure holds itself, a structure holding itself
        return f"deep:{type(value).__name__}"
    depth += 1
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, depth) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, depth) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, functools.partial):
        return {"partial": _canonical(value.func, depth), "args": _canonical(list(value.args), depth),
                "keywords": _canonical(dict(value.keywords), depth)}
    if callable(value):
        name = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
        code = getattr(value, "__code__", None)
        if code is None:  # an object with __call__: its class and its state
            return {"callable": name, "state": _canonical(getattr(value, "__dict__", {}), depth)}
        cells = []
        for cell in value.__closure__ or ():
            try:
                cells.append(_canonical(cell.cell_contents, depth))
            except ValueError:  # a cell not filled yet
                cells.append(None)
        # Its code (two lambdas, one edited function), defaults and closure: not its name alone, under which
        # two overrides that set other RoPE values shared one id.
        return {"function": name, "code": hashlib.sha256(marshal.dumps(code)).hexdigest(),
                "defaults": _canonical(getattr(value, "__defaults__", None), depth),
                "kwdefaults": _canonical(getattr(value, "__kwdefaults__", None), depth), "closure": cells}
    return repr(value)


def bind_engine_settings(model_id: str, settings: Mapping[str, object]) -> str:
    """``model_id`` with a digest of the engine ``settings`` that change the KV the same weights compute
    (overrides of the model's config, a quantization applied at load); unchanged when none is set, so the
    ids of plain deployments stay as they were."""
    present = {name: _canonical(value) for name, value in settings.items() if value not in (None, "", {}, [], "{}")}
    if not present:
        return model_id
    text = json.dumps(present, sort_keys=True, separators=(",", ":"))
    return f"{model_id}|engine-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
