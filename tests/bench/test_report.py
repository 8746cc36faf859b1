"""The benchmark report renderer on a canned results JSON: tables, verdicts, cost figures, charts, validation.

Nothing is measured here: every expected figure is recomputed from the canned
JSON in the test, so a change of formula in the renderer shows up as a diff.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbench.report import load_results, render

CANNED = Path(__file__).with_name("canned_results.json")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHARTS = ("tiers.png", "ttft_chat.png", "ttft_rag.png", "hit_rate.png", "compression.png")
DELETE = object()  # a mutation that removes the key instead of setting it


@pytest.fixture
def results() -> dict:
    return json.loads(CANNED.read_text())


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The canned results rendered once for the module (charts take about a second each render)."""
    return render(json.loads(CANNED.read_text()), tmp_path_factory.mktemp("report"))


@pytest.fixture
def report(rendered: Path) -> str:
    return rendered.read_text()


def _row(report: str, *leading: str) -> str:
    """The one markdown table row whose first cells are ``leading``."""
    prefix = "| " + " | ".join(leading) + " |"
    rows = [line for line in report.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return rows[0]


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip("|").split(" | ")]


def _mutate(results: dict, path: tuple, value: Any) -> dict:
    target = results
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return results


def test_report_opens_with_the_machine_table(results: dict, report: str) -> None:
    machine = results["machine"]
    assert report.startswith("# kvstore benchmark report")
    assert f"created {results['created']}" in report
    assert report.index("## Machine") < report.index("## Tier throughput")
    assert _row(report, "CPU") == f"| CPU | {machine['cpu']} |"
    assert _row(report, "cores") == f"| cores | {machine['cores']} |"
    assert _row(report, "memory") == f"| memory | {machine['memory_bytes'] / 2**30:.1f} GiB |"
    for label, key in (("disk", "disk"), ("OS", "os"), ("Python", "python")):
        assert _row(report, label) == f"| {label} | {machine[key]} |"
    for name, version in machine["libraries"].items():
        assert _row(report, f"library {name}") == f"| library {name} | {version} |"


def test_every_tier_row_has_its_ratio_to_the_ceiling_and_verdict(results: dict, report: str) -> None:
    verdicts = []
    for tier in results["tiers"]:
        ratio = tier["ceiling_seconds"] / tier["seconds"]
        cells = _cells(_row(report, tier["tier"], tier["op"], f"{tier['chunk_bytes'] / 2**20:g}"))
        assert cells[3] == f"{tier['chunk_bytes'] / tier['seconds'] / 1e9:.2f}"
        assert cells[4:7] == [tier["ceiling"], f"{tier['chunk_bytes'] / tier['ceiling_seconds'] / 1e9:.2f}",
                              f"{ratio:.2f}"]
        verdicts.append(cells[8])
        if tier["target"] is None:
            assert cells[7:] == ["-", "no target"]
        else:
            assert cells[7:] == [f">= {tier['target']:.2f}", "met" if ratio >= tier["target"] else "**MISSED**"]
    assert {"met", "**MISSED**", "no target"} <= set(verdicts)  # the canned run has all three
    assert "![ratio to ceiling per tier](tiers.png)" in report


def test_peer_rows_show_the_factor_in_kvstores_favour(results: dict, report: str) -> None:
    for comparison in results["comparisons"]:
        cells = _cells(_row(report, comparison["path"], comparison["op"]))
        assert cells[4] == comparison["peer"]
        if comparison["peer_value"] is None:
            target = f"{comparison['target']} (factor {comparison['target_factor']:g})"
            assert cells[6:9] == ["-", target, "peer not measured"]
            continue
        kv, peer = comparison["kvstore"], comparison["peer_value"]
        factor = kv / peer if comparison["better"] == "higher" else peer / kv
        assert cells[6] == f"{factor:.2f}x"
        assert cells[8] == ("met" if factor >= comparison["target_factor"] else "**MISSED**")
    assert _cells(_row(report, "files tier, warm read"))[8] == "**MISSED**"  # 1.6 / 2.1 = 0.76 < 0.95
    assert _cells(_row(report, "prefix lookup, 4096 tokens"))[6] == f"{0.00035 / 0.00021:.2f}x"  # lower is better


def test_workload_rows_have_hit_rates_and_ttft_percentiles(results: dict, report: str) -> None:
    section = report[report.index("## Workloads"):report.index("## Compression")]
    for workload in results["workloads"]:
        requests = workload["requests"]
        prompt = sum(r["prompt_tokens"] for r in requests)
        first, warm = (sum(r[f"loaded_{p}"] for r in requests) for p in ("first", "warm"))
        reuse, ttft = (_cells(row) for row in section.splitlines()
                       if row.startswith(f"| {workload['workload']} | {workload['config']} | "))
        assert reuse[2:] == [str(len(requests)), str(prompt), f"{first / prompt:.1%}", f"{warm / prompt:.1%}",
                             str(first), str(warm)]
        p = {(name, q): float(np.percentile([r[f"ttft_{name}"] for r in requests], q))
             for name in ("cold", "first", "warm") for q in (50, 90)}
        assert ttft[2:8] == [f"{seconds * 1e3:.1f}" for seconds in p.values()]
        assert ttft[8:] == [f"{p['cold', 50] / p['first', 50]:.2f}x", f"{p['cold', 50] / p['warm', 50]:.2f}x"]


def test_cost_view_prices_the_first_pass_of_the_best_config(results: dict, report: str) -> None:
    cost = results["cost"]
    rag = [w for w in results["workloads"] if w["workload"] == "rag"]
    best = max(rag, key=lambda w: sum(r["loaded_first"] for r in w["requests"]))
    assert best["config"] == "host+nvme"
    requests = best["requests"]
    saved = sum(r["loaded_first"] for r in requests) / len(requests)  # 3072 / 3 = 1024 tokens per request
    hours = saved * 1e6 / cost["prefill_tokens_per_second"] / 3600
    share = 1 - sum(r["ttft_first"] for r in requests) / sum(r["ttft_cold"] for r in requests)
    prompt = sum(r["prompt_tokens"] for r in requests) / len(requests)
    measured = share * prompt
    measured_hours = measured * 1e6 / cost["prefill_tokens_per_second"] / 3600
    price = cost["gpu_price_per_hour"]
    assert _cells(_row(report, "rag", "host+nvme", f"{prompt:.1f}")) == [
        "rag", "host+nvme", f"{prompt:.1f}", f"{saved:.1f}", f"{hours:.2f}", f"${hours * price:,.2f}",
        f"{share:.1%}", f"{measured:.1f}", f"{measured_hours:.2f}", f"${measured_hours * price:,.2f}"]
    assert (f"{hours:.2f}", f"${hours * 2.49:,.2f}") == ("18.96", "$47.22")  # hand-checked
    assert f"{cost['gpu']} at $2.49 per GPU-hour, prefilling 15,000 tokens/s" in report
    assert "**first pass**" in report and "1 - sum(ttft_first) / sum(ttft_cold)" in report


def test_charts_are_real_pngs_linked_from_the_report(rendered: Path, report: str) -> None:
    for name in CHARTS:
        data = (rendered.parent / name).read_bytes()
        width, height = struct.unpack(">II", data[16:24])  # IHDR follows the magic and chunk header
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", name
        assert len(data) > 10_000 and width >= 400 and height >= 200, (name, len(data), width, height)
        assert f"]({name})" in report


def test_compression_table_and_exact_error(results: dict, report: str) -> None:
    for row in results["fidelity"]:
        cells = _cells(_row(report, row["method"]))
        assert cells[2:5] == [f"{row['compression_ratio']:.2f}x", f"{row['kl_mean']:.3g}",
                              f"{row['top1_agreement']:.1%}"]
    assert _cells(_row(report, "transformers QuantizedCache quanto int4"))[5:] == ["-", "-"]


def test_absent_optional_sections_say_not_measured(results: dict, tmp_path: Path) -> None:
    for key in ("tiers", "comparisons"):
        del results[key]
    results["fidelity"] = None
    results["skipped"] = {"peers": "lmcache not installed"}
    report = render(results, tmp_path).read_text()
    assert "not measured: lmcache not installed" in report  # reason under the "peers" alias
    assert report.count("not measured: no results in this run and no reason given") == 2  # tiers, fidelity
    assert "- **peers**: lmcache not installed" in report
    assert "- **tiers**: no results in this run and no reason given" in report
    assert not (tmp_path / "tiers.png").exists() and not (tmp_path / "compression.png").exists()
    assert (tmp_path / "hit_rate.png").exists()


def test_not_measured_section_lists_skipped_reasons(results: dict, report: str) -> None:
    section = report[report.index("## Not measured"):]
    for key, reason in results["skipped"].items():
        assert f"- **{key}**: {reason}" in section
    assert "- **redis tier** (get, redis-py 5.0.1 raw GET): peer not measured; no redis server reachable" in section


@pytest.mark.parametrize(("path", "value", "message"), [
    (("workloads", 1, "requests", 0, "ttft_warm"), "x",
     "workloads[1].requests[0].ttft_warm: expected a number >= 0, got 'x'"),
    (("cost",), DELETE, "cost: expected an object, got nothing (key missing)"),
    (("machine", "cores"), True, "machine.cores: expected an integer >= 1, got True"),
    (("comparisons", 0, "better"), "more", "comparisons[0].better: expected one of 'higher', 'lower', got 'more'"),
    (("workloads", 0, "requests", 1, "loaded_first"), 700,
     "workloads[0].requests[1].loaded_first: expected an integer <= prompt_tokens (640), got 700"),
    (("tiers",), {"host": 1}, "tiers: expected a list, got an object"),
    (("workloads", 2, "requests"), [], "workloads[2].requests: expected a non-empty list, got a list of 0"),
])
def test_malformed_results_name_the_key_path(results: dict, tmp_path: Path, path: tuple, value: Any,
                                             message: str) -> None:
    source = tmp_path / "results.json"
    source.write_text(json.dumps(_mutate(results, path, value)))
    with pytest.raises(ValueError) as loading:
        load_results(source)
    assert str(loading.value) == message
    with pytest.raises(ValueError) as rendering:
        render(results, tmp_path / "out")
    assert str(rendering.value) == message
    assert not (tmp_path / "out" / "report.md").exists()


def test_canned_results_load_unchanged(results: dict) -> None:
    assert load_results(CANNED) == results
