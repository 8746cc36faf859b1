"""The benchmark suites step of ``kvstore bench``: its JSON lands where the report asked, from any folder."""

from __future__ import annotations

import json
from pathlib import Path

from kvbench.suites import run_suites


def test_a_relative_report_folder_gets_the_suites_json(tmp_path, monkeypatch):
    """``python bench/run_bench.py --out bench-report`` from a checkout: the suites run in bench/ (so the
    repository's kvstore/ folder does not shadow the package), and the JSON must still land in
    ./bench-report, not in bench/bench-report."""
    monkeypatch.chdir(tmp_path)
    out = Path("bench-report")
    out.mkdir()
    ran, tail = run_suites(out / "suites.json", quick=True, select="test_copy_ceiling", timeout=300)
    assert ran, tail
    names = [b["name"] for b in json.loads((tmp_path / "bench-report" / "suites.json").read_text())["benchmarks"]]
    assert names and all("copy_ceiling" in name for name in names)
