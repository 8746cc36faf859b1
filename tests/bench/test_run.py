"""The whole report harness end to end on tiny sizes (``python bench/run_bench.py --smoke``): every section written."""

from __future__ import annotations

import json

import pytest
from kvbench.run import BenchSettings, run


@pytest.mark.slow
def test_a_smoke_run_writes_the_report_and_its_results(tmp_path):
    settings = BenchSettings(out_dir=str(tmp_path / "report"), quick=True, suites=False, peers=False,
                             workloads=("agent",), configs=("host", "host+nvme"))
    lines = []
    report = run(settings, echo=lines.append)
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert report == tmp_path / "report" / "report.md" and lines[-1] == f"report: {report}"
    assert {r["path"] for r in results["comparisons"]} >= {"host tier, contiguous chunk", "local disk",
                                                          "cache server on loopback"}
    assert [(w["workload"], w["config"]) for w in results["workloads"]] == [("agent", "host"), ("agent", "host+nvme")]
    assert results["fidelity"] and results["skipped"]["tiers"] == "suites not run (--no-suites)"
    text = report.read_text()
    for heading in ("## Machine", "## Side by side with peers", "## Workloads", "## Cost"):
        assert heading in text
    assert (tmp_path / "report" / "ttft_agent.png").stat().st_size > 1000
    assert not (tmp_path / "report" / "data").exists()  # scratch stores removed


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"^workloads: expected some of \['agent', 'chat', 'no_reuse', 'rag'\], "
                                         r"got \['batch'\]$"):
        BenchSettings(workloads=("batch",))
    with pytest.raises(ValueError, match=r"^gpu_price_per_hour: expected a number > 0, got 0$"):
        BenchSettings(gpu_price_per_hour=0)
