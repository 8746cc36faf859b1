"""bench/gpu_check.py (the GPU check) runs here on the CPU: every section, every correctness row ok.

On a GPU machine the same script runs with ``--device cuda`` (scripts/gpu-check.sh); here
``--device cpu --quick`` covers its code paths (kvstore's device tier, layer-wise loader and codecs
run their CPU branches), in a subprocess from a temporary directory, as a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
SECTIONS = ("ceiling", "device_tier", "host_tier", "layer_wise", "codecs", "transformers", "copy_engine")
KEYS = {"section", "name", "value", "unit", "ratio_to_ceiling", "ok", "detail"}


def test_gpu_check_runs_on_the_cpu_and_every_check_passes(tmp_path):
    out = tmp_path / "gpu-check.json"
    # one thread: on a busy 2-core machine torch's spinning OpenMP workers cost more than they bring
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert all(set(r) == KEYS for r in rows), [r for r in rows if set(r) != KEYS]
    assert set(report["section_seconds"]) == set(SECTIONS)
    by_section = {name: [r for r in rows if r["section"] == name] for name in SECTIONS}
    assert all(by_section.values()), {name: len(found) for name, found in by_section.items()}

    failed = [r for r in rows if r["ok"] is False]
    assert not failed, failed
    for name in SECTIONS[:-1]:  # each has correctness rows (byte-exact, within a bound), all True
        assert any(r["ok"] is True for r in by_section[name]), by_section[name]
    # the copy engine's rows come from kvstore.integrations.vllm_copy.gpu_check, or one placeholder (None)
    assert all(r["ok"] in (True, None) for r in by_section["copy_engine"]), by_section["copy_engine"]

    # every codec of the registry, both 16-bit dtypes, checked and timed
    from kvstore.compression import CODECS

    names = {r["name"] for r in by_section["codecs"]}
    for codec in CODECS:
        for dtype in ("bfloat16", "float16"):
            assert names & {f"{codec}_{dtype}_exact", f"{codec}_{dtype}_bound"}, (codec, dtype)
            assert {f"{codec}_{dtype}_encode", f"{codec}_{dtype}_decode"} <= names, (codec, dtype)

    # speed figures are ratios to the copy_ ceiling of the same run (no wall-clock bound is asserted)
    speeds = [r for r in rows if r["unit"] == "GB/s"]
    assert speeds and all(r["ratio_to_ceiling"] is not None and r["ratio_to_ceiling"] > 0 for r in speeds), speeds
    assert "section" in done.stdout and "ratio" in done.stdout  # the table
