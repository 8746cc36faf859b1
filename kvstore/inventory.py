"""``kvstore info``: a store's configuration and what its persistent tiers hold, read without opening a KVStore.

Nothing here allocates a pool, takes a directory's lock or writes: the host
and device tiers are reported by their configured size (their pools live in
the engine's process), the LMDB tier by a read-only snapshot of its ``meta``
records (``kvstore.tiers.lmdb.inspect_directory``), the files tier by a
walk of ``<files_dir>/xx/*.kvb`` (and ``xx/yy/*.kvb``, the older layout) with ``lstat``, and the shared tiers by
their URL alone (no connection is made; ``kvstore stats --url`` asks a
cache server). So it works while an engine has the store open.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Any


from kvstore.config import HIDDEN, StoreConfig, hide_password
from kvstore.layout import KVLayout
from kvstore.sizes import format_size
from kvstore.tiers.fanout import SUFFIX, TEMP_SUFFIX, is_fanout
from kvstore.tiers.lmdb import inspect_directory

_SECRETS = ("remote_token",)


def load_config(path: str | None, environ: dict[str, str] | None = None) -> tuple[StoreConfig, str]:
    """``StoreConfig.load(path)`` and a description of where it came from.

    A file that cannot be read or does not parse is a ``ValueError`` naming
    it (``read_settings_file``).
    """
    environ = dict(os.environ) if environ is None else environ
    source = path if path is not None else environ.get("KVSTORE_CONFIG")
    config = StoreConfig.load(path, environ)
    env_vars = sorted(v for v in environ if v.startswith("KVSTORE_") and v != "KVSTORE_CONFIG"
                      and not v.startswith("KVSTORE_SERVER_"))
    parts = [f"file {source}"] if source else ["defaults"]
    if env_vars:
        parts.append(f"environment ({', '.join(env_vars)})")
    return config, " + ".join(parts)


def redacted(config: StoreConfig) -> dict[str, Any]:
    """The settings, with secrets (the remote token, passwords in URLs) hidden."""
    values = dataclasses.asdict(config)
    for name in _SECRETS:
        if values.get(name) is not None:
            values[name] = HIDDEN
    for name in ("remote_url", "redis_url"):
        if values.get(name) is not None:
            values[name] = hide_password(values[name])
    return values


def _subdirs(path: str, root: str) -> list[str]:
    """The two-character fan-out directories directly under ``path`` (not following links)."""
    try:
        with os.scandir(path) as entries:
            return sorted(e.path for e in entries if is_fanout(e))
    except FileNotFoundError:
        if path == root and os.path.lexists(root):  # a dangling link
            raise NotADirectoryError(f"files_dir {root}: not a directory") from None
        return []  # not created yet, or removed by another process meanwhile
    except NotADirectoryError:
        if path == root:
            raise NotADirectoryError(f"files_dir {root}: not a directory") from None
        return []
    except OSError as exc:
        raise OSError(f"files_dir {root}: cannot read {path}: {exc.strerror or exc}") from None


def files_usage(path: str | os.PathLike[str]) -> dict[str, int]:
    """Block files under a ``FilesTier`` directory: ``blocks``, ``used_bytes``, ``temp_files`` (writes in flight).

    Only regular files named ``<hex key>.kvb`` in a fan-out directory count (``lstat``:
    links are not followed). A directory that does not exist holds 0 blocks.
    """
    root = os.path.abspath(os.fspath(path))
    usage = {"blocks": 0, "used_bytes": 0, "temp_files": 0}
    for level1 in _subdirs(root, root):
        for directory in (level1, *_subdirs(level1, root)):  # the two-level layout's files count until moved up
            try:
                with os.scandir(directory) as it:
                    entries = list(it)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise OSError(f"files_dir {root}: cannot read {directory}: {exc.strerror or exc}") from None
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    usage["temp_files"] += name.endswith(TEMP_SUFFIX)
                    continue
                if not name.endswith(SUFFIX):
                    continue
                try:
                    bytes.fromhex(name[:-len(SUFFIX)])
                    st = entry.stat(follow_symlinks=False)
                except ValueError:
                    continue  # not a hex name: not a block
                except FileNotFoundError:
                    continue  # evicted by another process meanwhile
                if stat.S_ISREG(st.st_mode):
                    usage["blocks"] += 1
                    usage["used_bytes"] += st.st_size
    return usage


def tier_inventory(config: StoreConfig) -> dict[str, dict[str, Any]]:
    """Each configured tier, fastest first: what it is configured to hold and, for the persistent ones, holds."""
    tiers: dict[str, dict[str, Any]] = {}
    if config.device_bytes:
        tiers["device"] = {"kind": "pool", "device": config.device, "capacity_bytes": config.device_bytes}
    if config.host_bytes:
        tiers["host"] = {"kind": "pool", "capacity_bytes": config.host_bytes}
    if config.disk_dir is not None:
        tiers["lmdb"] = {"kind": "persistent", "path": os.path.abspath(config.disk_dir),
                         "exists": os.path.isdir(config.disk_dir), "capacity_bytes": config.disk_bytes,
                         "codec": config.disk_codec, **inspect_directory(config.disk_dir)}
    if config.files_dir is not None:
        tiers["files"] = {"kind": "persistent", "path": os.path.abspath(config.files_dir),
                          "exists": os.path.isdir(config.files_dir), "capacity_bytes": config.files_bytes,
                          "codec": config.files_codec, **files_usage(config.files_dir)}
    if config.remote_url is not None:
        tiers["remote"] = {"kind": "shared", "url": hide_password(config.remote_url), "contacted": False}
    if config.redis_url is not None:
        tiers["redis"] = {"kind": "shared", "url": hide_password(config.redis_url),
                          "namespace": config.redis_namespace, "contacted": False}
    return tiers


def inventory(config: StoreConfig, source: str, layout: KVLayout) -> dict[str, Any]:
    """Everything ``kvstore info`` shows, as plain data (its ``--json``)."""
    return {"config_source": source, "config": redacted(config),
            "layout": {"describe": layout.describe(), "block_bytes": layout.block_bytes},
            "tiers": tier_inventory(config)}


def format_inventory(info: dict[str, Any]) -> str:
    """``inventory`` for people."""
    lines = [f"config (from {info['config_source']}):"]
    lines += [f"  {name} = {value!r}" for name, value in info["config"].items()]
    layout = info["layout"]
    lines.append(f"layout: {layout['describe']} ({format_size(layout['block_bytes'])} per block)")
    lines.append("tiers (read without opening the store):")
    for name, tier in info["tiers"].items():
        if tier["kind"] == "pool":
            where = f" on {tier['device']}" if name == "device" else ""
            lines.append(f"  {name}: {format_size(tier['capacity_bytes'])} pool{where}, held in the memory of the "
                         f"process running the store (not allocated here)")
        elif tier["kind"] == "persistent":
            line = (f"  {name}: {tier['blocks']} blocks, {format_size(tier['used_bytes'])} used of "
                    f"{format_size(tier['capacity_bytes'])}")
            if tier.get("unreadable"):
                line += f", {tier['unreadable']} unreadable (another format version, or damaged)"
            line += f" ({tier['path']}{'' if tier['exists'] else ': not created yet'})"
            lines.append(line)
        else:
            lines.append(f"  {name}: {tier['url']} (not contacted)")
    if not info["tiers"]:
        lines.append("  none")
    return "\n".join(lines)
