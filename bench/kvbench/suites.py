"""Run the pytest-benchmark suites under ``bench/`` and turn their JSON into the report's tier rows.

Every suite times its ceiling in the same run (a ``*_ceiling`` benchmark in
the same group: ``Tensor.copy_``, a raw file write+fsync or read, a raw
socket, raw redis-py). A tier row is a subject of such a group: its median
against the ceiling's median, or, where the suite paired each round with
its own ceiling round (the server suite: ``extra_info["ratio"]``), that
paired ratio. ``GROUPS`` says which groups are tier throughput (target 0.8
of the ceiling, the issue's) and which are shown for reference only.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1]
MIB = 1 << 20
TIER_TARGET = 0.8

# group name pattern -> (what the report calls the tier, target or None for a reference figure)
GROUPS: dict[str, tuple[str, float | None]] = {
    r"^host$": ("host RAM", TIER_TARGET),
    r"^disk-write$": ("LMDB, fsync", TIER_TARGET),
    r"^disk-read$": ("LMDB, warm", TIER_TARGET),
    r"^files-write$": ("files, fsync", TIER_TARGET),
    r"^files-read$": ("files, warm", TIER_TARGET),
    r"^(put|get)-\d+MiB-": ("cache server", TIER_TARGET),
    r"^redis-": ("Redis", TIER_TARGET),
    r"^cascade-put": ("host + LMDB + files", None),
    r"^load$": ("engine load", None),
    r"^paged-": ("paged adapter", None),
    r"^codec-": ("codec", None),
}


def run_suites(json_path: Path, quick: bool, timeout: float = 1800.0, select: str | None = None
               ) -> tuple[bool, str]:
    """``pytest bench/ --benchmark-only --benchmark-json=json_path`` in a subprocess; (ran, output tail).
    ``select``: a ``-k`` expression (all suites when None)."""
    # Absolute: the subprocess runs in bench/, and a relative path would land the JSON there instead.
    json_path = Path(json_path).resolve()
    cmd = [sys.executable, "-m", "pytest", str(BENCH_DIR), "--benchmark-only", f"--benchmark-json={json_path}",
           "-p", "no:cacheprovider", "-q", "-x"] + (["-k", select] if select else [])
    if quick:
        cmd += ["--benchmark-min-rounds=2", "--benchmark-max-time=0.05"]
    # cwd: bench/, not the repository root, whose kvstore/ folder would shadow the installed package
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=BENCH_DIR)
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
    return done.returncode == 0 and json_path.exists(), tail


def _chunk_bytes(group: str, name: str) -> int:
    """The block size a benchmark moved: named in the group or test id, else the suites' 32 MiB block."""
    found = re.search(r"(\d+)MiB", f"{group} {name}")
    return int(found.group(1)) * MIB if found else 32 * MIB


def _kind(group: str) -> tuple[str, float | None] | None:
    for pattern, kind in GROUPS.items():
        if re.search(pattern, group):
            return kind
    return None


def tier_rows(suites: dict) -> list[dict]:
    """One row per subject of every group that has a ceiling (``*_ceiling``) and a known kind."""
    groups: dict[str, list[dict]] = {}
    for bench in suites.get("benchmarks", []):
        groups.setdefault(bench.get("group") or "", []).append(bench)
    rows = []
    for group, benches in groups.items():
        kind = _kind(group)
        ceilings = [b for b in benches if "_ceiling" in b["name"]]
        if kind is None or not ceilings:
            continue
        ceiling = ceilings[0]
        label, target = kind
        for bench in benches:
            if bench is ceiling or bench["name"].startswith("test_raw_"):
                continue  # other raw variants are ceilings' own studies, not a tier
            seconds = bench["stats"]["median"]
            paired = bench.get("extra_info", {}).get("ratio")
            ceiling_seconds = seconds * paired if paired else ceiling["stats"]["median"]
            op = bench["name"].removeprefix("test_")
            rows.append({"tier": f"{label} ({group})", "op": op, "chunk_bytes": _chunk_bytes(group, bench["name"]),
                         "seconds": seconds, "ceiling": re.sub(r"^test_|\[.*\]$", "", ceiling["name"]),
                         "ceiling_seconds": ceiling_seconds, "target": target})
    return rows


def load_suites(json_path: Path) -> dict:
    return json.loads(json_path.read_text())
