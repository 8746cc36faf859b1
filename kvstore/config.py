"""StoreConfig: every setting of a KVStore, from code, a TOML/YAML file or KVSTORE_* variables."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvstore.keys import HASHES
from kvstore.sizes import parse_size

WRITE_POLICIES = ("write_through", "write_back")
ENV_PREFIX = "KVSTORE_"
# Names under the prefix that are not settings.
ENV_RESERVED = frozenset({"KVSTORE_CONFIG"})


@dataclass(frozen=True)
class StoreConfig:
    """Settings of one KVStore. Sizes are bytes (int) or strings such as ``"4GiB"``.

    - ``model_id``: names the model in every key; two models never share KV.
    - ``host_bytes``: host-RAM pool, allocated once at start (0 = no host tier).
    - ``disk_dir`` / ``disk_bytes``: the LMDB directory on local NVMe and its
      byte budget (``disk_dir=None`` = no disk tier).
    - ``write_policy``: ``write_through`` writes every put to disk at once;
      ``write_back`` writes a block to disk when host RAM evicts it (and on close).
    - ``hash``: key hash; ``sha256`` (default) or ``blake2b`` are safe in a
      shared cache, ``xxh3_128`` only where every tenant is trusted.
    - ``promote``: copy a block found on disk up into host RAM.
    - ``disk_sync``: fdatasync every disk write before put returns.
    """

    model_id: str = "default"
    host_bytes: int | str = "1GiB"
    disk_dir: str | None = None
    disk_bytes: int | str = "16GiB"
    write_policy: str = "write_through"
    hash: str = "sha256"
    promote: bool = True
    disk_sync: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id: expected a non-empty string, got {self.model_id!r}")
        object.__setattr__(self, "host_bytes", parse_size(self.host_bytes, "host_bytes"))
        object.__setattr__(self, "disk_bytes", parse_size(self.disk_bytes, "disk_bytes"))
        if self.disk_dir is not None:
            if not isinstance(self.disk_dir, (str, os.PathLike)) or not str(self.disk_dir):
                raise ValueError(f"disk_dir: expected a directory path or None, got {self.disk_dir!r}")
            object.__setattr__(self, "disk_dir", os.fspath(self.disk_dir))
        if self.write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy: expected one of {list(WRITE_POLICIES)}, got {self.write_policy!r}")
        if self.hash not in HASHES:
            raise ValueError(f"hash: expected one of {sorted(HASHES)}, got {self.hash!r}")
        for name in ("promote", "disk_sync"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.host_bytes == 0 and self.disk_dir is None:
            raise ValueError("host_bytes: expected > 0 when no disk_dir is set (the store needs a tier), got 0")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "StoreConfig":
        """Build from a mapping; an unknown key is a ``ValueError`` naming it and ``source``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {unknown}; expected some of {sorted(fields)}")
        return cls(**dict(values))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "StoreConfig":
        """Load a ``.toml``, ``.yaml`` or ``.yml`` file (top level, or a ``[kvstore]`` table)."""
        path = Path(path)
        loader = _FILE_LOADERS.get(path.suffix.lower())
        if loader is None:
            raise ValueError(f"{path}: expected a file ending in {sorted(_FILE_LOADERS)}, got {path.suffix!r}")
        values = loader(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
        if set(values) == {"kvstore"} and isinstance(values["kvstore"], dict):
            values = values["kvstore"]
        return cls.from_dict(values, source=str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None,
             environ: Mapping[str, str] | None = None) -> "StoreConfig":
        """File settings (``path`` or ``$KVSTORE_CONFIG``), overridden by ``KVSTORE_*`` variables."""
        environ = os.environ if environ is None else environ
        path = path if path is not None else environ.get("KVSTORE_CONFIG")
        base = dataclasses.asdict(cls.from_file(path)) if path else {}
        base.update(_env_values(environ))
        return cls.from_dict(base, source="KVSTORE_* environment" if not path else f"{path} + environment")

    def replace(self, **changes: Any) -> "StoreConfig":
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: expected true/false/1/0, got {text!r}")


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from ``KVSTORE_<FIELD>`` variables, converted to each field's type."""
    types = {f.name: f.type for f in dataclasses.fields(StoreConfig)}
    values: dict[str, Any] = {}
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX) or var in ENV_RESERVED:
            continue
        name = var[len(ENV_PREFIX):].lower()
        if name not in types:
            raise ValueError(f"{var}: unknown setting {name!r}; expected KVSTORE_ plus one of {sorted(types)}")
        if types[name] == "bool":
            values[name] = _parse_bool(var, text)
        elif name == "disk_dir" and text.strip().lower() in ("", "none"):
            values[name] = None
        else:
            values[name] = text
    return values


_FILE_LOADERS: dict[str, Callable[[str], Any]] = {
    ".toml": tomllib.loads,
    ".yaml": yaml.safe_load,
    ".yml": yaml.safe_load,
}
