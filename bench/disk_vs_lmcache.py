"""The files tier against LMCache's local disk, run after run in turn: medians and spreads of the ratios.

``kvstore bench``'s report measures each side once; on a machine whose page
cache and disk drift from one minute to the next, one pair of figures can
swing either way by half. Here each run measures LMCache's side
(``bench/peers/lmcache_peer.py --paths disk``, in the Python that has
``lmcache``) and then kvstore's (``kvbench.compare.disk_rows``: the files
tier alone, no fsync, the same 2,048-token prompts of Llama-3-8B-shaped
chunks and the same three prompts of capacity, so later rounds evict),
each in its own process; the ratio of each run is LMCache's seconds over
kvstore's (above 1: kvstore is faster), printed with both sides' milliseconds. Run from the checkout::

    python bench/disk_vs_lmcache.py --runs 5 --lmcache-python .venv-lmcache/bin/python
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KVSTORE_SIDE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from kvbench.compare import disk_rows
from kvstore.compression.table import one_thread
with one_thread():
    rows = list(disk_rows(5, 2048, Path(sys.argv[2])))
print(json.dumps([{"op": r["op"], "chunk_tokens": r["chunk_tokens"], "seconds": r["seconds"]} for r in rows]))
"""


def kvstore_seconds(workdir: Path) -> dict[tuple[str, int], float]:
    """(op, chunk tokens) -> kvstore's median seconds for one prompt, measured in a fresh process."""
    done = subprocess.run([sys.executable, "-c", KVSTORE_SIDE, str(HERE), str(workdir)], check=True,
                          capture_output=True, text=True)
    return {(r["op"], r["chunk_tokens"]): r["seconds"] for r in json.loads(done.stdout.splitlines()[-1])}


def lmcache_seconds(python: str, workdir: Path) -> dict[tuple[str, int], float]:
    """The same for LMCache's local disk; empty if the peer was skipped (no lmcache in ``python``)."""
    out = workdir / "lmcache.json"
    subprocess.run([python, str(HERE / "peers" / "lmcache_peer.py"), "--paths", "disk", "--out", str(out),
                    "--workdir", str(workdir / "lmcache")], check=True, capture_output=True, text=True)
    rows = json.loads(out.read_text()).get("rows", [])
    return {(r["op"], r["chunk_tokens"]): r["seconds"] for r in rows if r.get("path") == "disk"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each side, in turn (default 5)")
    parser.add_argument("--lmcache-python", default=".venv-lmcache/bin/python",
                        help="a Python with lmcache==0.5.6 (default .venv-lmcache/bin/python)")
    parser.add_argument("--workdir", default=None, help="where the files go (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs: expected at least 1, got {args.runs}")
    if not Path(args.lmcache_python).exists():
        parser.error(f"--lmcache-python: no such file: {args.lmcache_python} (scripts/engine-venvs.sh lmcache)")
    root = Path(tempfile.mkdtemp(prefix="disk-vs-lmcache-", dir=args.workdir))
    ratios: dict[tuple[str, int], list[float]] = {}
    try:
        for run in range(args.runs):
            theirs = lmcache_seconds(args.lmcache_python, root)
            if not theirs:
                print(f"LMCache's side was skipped: no lmcache in {args.lmcache_python}", file=sys.stderr)
                return 1
            ours = kvstore_seconds(root)
            for name, seconds in ours.items():
                if name in theirs:
                    ratios.setdefault(name, []).append(theirs[name] / seconds)
            print(f"run {run + 1}: " + ", ".join(f"{op} {tokens} tokens {theirs[(op, tokens)] / s:.2f}x "
                                                  f"({1e3 * theirs[(op, tokens)]:.0f} ms / {1e3 * s:.0f} ms)"
                                                  for (op, tokens), s in ours.items() if (op, tokens) in theirs),
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for (op, tokens), values in sorted(ratios.items()):
        print(f"{op:>8} chunks of {tokens:>3} tokens: {statistics.median(values):.2f}x LMCache "
              f"(median of {len(values)}; {min(values):.2f}-{max(values):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
