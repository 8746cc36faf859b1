"""Peers measured in the same run: LMCache's storage layer, beside kvstore's rows of ``kvbench.compare``.

LMCache runs in a subprocess (``bench/peers/lmcache_peer.py``) with a Python
that has it: this one if ``lmcache`` imports here, else the checkout's
``.venv-lmcache`` (``scripts/engine-venvs.sh lmcache``), else the peer is
skipped with that reason. Its rows are matched to kvstore's by (path, op,
chunk size) and turned into the report's ``comparisons``, each with the
issue's target: kvstore's figure must be at least ``factor`` times the
peer's (higher is better) or the peer's divided by ``factor`` (lower is
better, for lookup times).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PEER_SCRIPT = Path(__file__).resolve().parents[1] / "peers" / "lmcache_peer.py"
PEER_VENV = Path(__file__).resolve().parents[2] / ".venv-lmcache" / "bin" / "python"
PEER_NAME = "LMCache"

# (path, op, chunk tokens) -> (factor, better, target as the report shows it); None: any chunk
TARGETS: dict[tuple[str, str, int | None], tuple[float, str, str]] = {
    ("cpu", "store", 256): (0.95, "higher", ">= 0.95x LMCache"),
    ("cpu", "retrieve", 256): (0.95, "higher", ">= 0.95x LMCache"),
    ("cpu", "store", 16): (1.2, "higher", ">= 1.2x LMCache"),
    ("cpu", "retrieve", 16): (1.2, "higher", ">= 1.2x LMCache"),
    ("paged", "store", None): (2.0, "higher", ">= 2x LMCache"),
    ("paged", "retrieve", None): (2.0, "higher", ">= 2x LMCache"),
    ("lookup", "lookup", None): (4.0, "lower", ">= 4x faster than LMCache"),
    ("disk", "store", None): (1.0, "higher", ">= LMCache (same durability: no fsync)"),
    ("disk", "retrieve", None): (1.5, "higher", ">= 1.5x LMCache"),
}
# (kvstore's path, the peer's path) -> target, for every op and chunk size: the cache server must beat each of
# LMCache's servers by its own factor (store and retrieve, 32 MiB and 2 MiB chunks).
PEER_PATH_TARGETS: dict[tuple[str, str], tuple[float, str, str]] = {
    ("server", "remote"): (2.0, "higher", ">= 2x LMCache's legacy server"),
    ("server", "server"): (1.0, "higher", ">= LMCache's server over shared memory"),
}
LABELS = {"cpu": "host tier, contiguous chunk", "paged": "paged (vLLM layout) <-> host tier",
          "lookup": "lookup, 131,072 tokens, nothing cached", "disk": "local disk",
          "server": "cache server on loopback"}
# kvstore's path -> the peer's paths it is compared with: LMCache has two servers, its legacy one over TCP
# (lm://, the transport kvstore's server also uses) and ``lmcache server``, which moves the KV through
# shared memory with a client on the same host (a row each).
PEER_PATHS = {"server": (("remote", "legacy server over TCP (lm://)"),
                         ("server", "lmcache server, shared memory (lmcache_driven)"))}


def lmcache_python(explicit: str | None = None) -> str | None:
    """The Python to run the LMCache peer with, or None when none has it."""
    if explicit:
        return explicit
    if importlib.util.find_spec("lmcache") is not None:
        return sys.executable
    return str(PEER_VENV) if PEER_VENV.exists() else None


def run_lmcache(python: str | None, quick: bool, timeout: float = 900.0) -> dict:
    """The peer script's JSON (``rows``, ``skipped``), or one whose ``skipped`` says why it did not run."""
    if python is None:
        return {"peer": "lmcache", "rows": [], "skipped": {
            "lmcache": "LMCache is not installed: pip install lmcache==0.5.6 here, or build .venv-lmcache with "
                       "scripts/engine-venvs.sh lmcache"}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lmcache.json"
        cmd = [python, str(PEER_SCRIPT), "--out", str(out)] + (["--quick"] if quick else [])
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"peer": "lmcache", "rows": [], "skipped": {"lmcache": f"the peer script ran over {timeout:.0f} s"}}
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return {"peer": "lmcache", "rows": [], "skipped": {
                "lmcache": f"the peer script exited {done.returncode}: {' | '.join(tail)}"}}
        return json.loads(out.read_text())


def _peer_value(row: dict, unit: str) -> float | None:
    seconds = row.get("seconds")
    if not seconds:
        return None
    if unit == "ratio_to_ceiling":
        return row["ceiling_seconds"] / seconds if row.get("ceiling_seconds") else None
    if unit == "GB/s":
        return row["bytes"] / seconds / 1e9 if row.get("bytes") else None
    return seconds


def _target(path: str, op: str, tokens: int | None) -> tuple[float, str, str]:
    return TARGETS.get((path, op, tokens)) or TARGETS.get((path, op, None)) or (1.0, "higher", "none set")


def _tokens(row: dict) -> int | None:
    if row.get("chunk_tokens") is not None:
        return int(row["chunk_tokens"])
    bytes_per_token = 32 * 2 * 8 * 128 * 2  # Llama-3-8B shaped chunks, bf16
    return int(row["chunk_bytes"]) // bytes_per_token if row.get("chunk_bytes") else None


def comparisons(kvstore_rows: list[dict], peer: dict) -> list[dict]:
    """One comparison per kvstore row, the peer's matching row beside it (``peer_value`` None if absent)."""
    version = peer.get("version", "")
    peer_rows: dict[tuple, dict] = {}
    for r in peer.get("rows", []):  # the peer's first row of a kind is its main figure (others are variants)
        peer_rows.setdefault((r["path"], r["op"], _tokens(r)), r)
    out = []
    for row in kvstore_rows:
        tokens = _tokens(row)
        for peer_path, kind in PEER_PATHS.get(row["path"], ((row["path"], ""),)):
            factor, better, target = (PEER_PATH_TARGETS.get((row["path"], peer_path))
                                      or _target(row["path"], row["op"], tokens))
            match = peer_rows.get((peer_path, row["op"], tokens))
            note = row.get("note", "")
            if match is not None and match.get("note"):
                note = f"{note}; {PEER_NAME}: {match['note']}" if note else f"{PEER_NAME}: {match['note']}"
            out.append({"path": LABELS.get(row["path"], row["path"]), "op": row["op"],
                        "chunk_bytes": row["chunk_bytes"], "chunk_tokens": tokens, "unit": row["unit"],
                        "kvstore": row["kvstore"], "peer": f"{PEER_NAME} {version} {kind}".strip(),
                        "peer_value": None if match is None else _peer_value(match, row["unit"]),
                        "better": better, "target": target, "target_factor": factor, "note": note})
    return out
