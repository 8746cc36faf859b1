"""The workloads through the transformers model and a real store: what is loaded on each pass."""

from __future__ import annotations

import pytest
from kvbench.serving import CONFIGS, ServingSettings, config_label, run_serving
from kvbench.workloads import WorkloadSettings, generate

QUICK = ServingSettings.quick()
WORKLOADS = WorkloadSettings(vocab_size=QUICK.model.vocab_size).scaled(0.1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    arrivals = {name: generate(name, WORKLOADS) for name in ("agent", "no_reuse")}
    notes = []
    # A slow prefill rate (1 token/s): every stored block is worth loading, whatever the machine. The planner's
    # measured rate let a loaded CI machine recompute a warm prompt (0 tokens loaded) instead.
    slow = {name: (lambda s, d, r, build=build: build(s, d, r).replace(prefill_tokens_per_second=1.0), remote)
            for name, (build, remote) in CONFIGS.items()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("kvbench.serving.CONFIGS", slow)
        rows = run_serving(arrivals, ["host", "host+nvme+codec"], QUICK, tmp_path_factory.mktemp("stores"), None,
                           notes.append)
    return arrivals, rows, notes


def test_first_pass_loads_what_earlier_requests_left_and_the_warm_pass_everything(served):
    arrivals, rows, _ = served
    block = QUICK.block_tokens
    for result in rows:
        assert [r["name"] for r in result["requests"]] == [a.name for a in arrivals[result["workload"]]]
        for request, arrival in zip(result["requests"], arrivals[result["workload"]]):
            assert request["prompt_tokens"] == len(arrival.tokens)
            assert request["loaded_first"] == arrival.reusable_tokens // block * block
            assert request["loaded_warm"] == len(arrival.tokens) - 1  # every block, the last token computed
            assert request["ttft_cold"] > 0 and request["ttft_first"] > 0 and request["ttft_warm"] > 0


def test_every_workload_runs_on_every_named_config_with_the_same_cold_figures(served):
    _, rows, notes = served
    assert [(r["workload"], r["config"]) for r in rows] == [
        ("agent", "host"), ("agent", "host+nvme+ec4"), ("no_reuse", "host"), ("no_reuse", "host+nvme+ec4")]
    by_workload = {}
    for r in rows:
        by_workload.setdefault(r["workload"], []).append([q["ttft_cold"] for q in r["requests"]])
    assert all(a == b for a, b in by_workload.values())  # the bare model ran once per workload
    assert "lmdb" in rows[1]["tiers"] and "lmdb" not in rows[0]["tiers"]
    assert notes[0] == f"agent: full prefill of {len(served[0]['agent'])} requests" and len(notes) == 6


def test_config_labels_name_the_codec():
    assert [config_label(name, QUICK) for name in CONFIGS] == ["host", "host+nvme", "host+nvme+ec4", "remote"]
