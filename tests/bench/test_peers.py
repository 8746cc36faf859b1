"""kvstore's rows beside the peer's: matching, the peer's figure in kvstore's unit, the issue's targets."""

from __future__ import annotations

import pytest
from kvbench.peers import comparisons, run_lmcache
from kvbench.suites import tier_rows

MIB = 1 << 20
PEER = {"peer": "lmcache", "version": "0.5.6", "rows": [
    {"path": "cpu", "op": "store", "chunk_tokens": 256, "seconds": 0.025, "bytes": 256 * MIB,
     "ceiling_seconds": 0.020, "note": "real connector"},
    {"path": "cpu", "op": "store", "chunk_tokens": 256, "seconds": 0.0002, "bytes": 256 * MIB, "note": "mock"},
    {"path": "lookup", "op": "lookup", "chunk_tokens": 16, "seconds": 0.016},
    {"path": "remote", "op": "store", "chunk_tokens": 256, "seconds": 0.4, "bytes": 256 * MIB},
    {"path": "server", "op": "store", "chunk_tokens": 256, "seconds": 0.2, "bytes": 256 * MIB}]}
OURS = [
    {"path": "cpu", "op": "store", "chunk_bytes": 32 * MIB, "chunk_tokens": 256, "unit": "ratio_to_ceiling",
     "kvstore": 0.9},
    {"path": "lookup", "op": "lookup", "chunk_bytes": None, "chunk_tokens": 16, "unit": "seconds", "kvstore": 0.0001},
    {"path": "server", "op": "store", "chunk_bytes": 32 * MIB, "chunk_tokens": 256, "unit": "GB/s", "kvstore": 1.5},
    {"path": "disk", "op": "store", "chunk_bytes": 2 * MIB, "chunk_tokens": 16, "unit": "GB/s", "kvstore": 0.5}]


def test_each_row_meets_its_peer_in_kvstores_unit_with_the_issues_target():
    rows = comparisons(OURS, PEER)
    assert [(r["op"], r["peer"]) for r in rows] == [
        ("store", "LMCache 0.5.6"), ("lookup", "LMCache 0.5.6"),
        ("store", "LMCache 0.5.6 legacy server over TCP (lm://)"),
        ("store", "LMCache 0.5.6 lmcache server, shared memory (lmcache_driven)"), ("store", "LMCache 0.5.6")]
    cpu, lookup, tcp, shm, disk = rows
    assert cpu["peer_value"] == pytest.approx(0.8)  # the first row of a kind (the mock row is a variant)
    assert (cpu["target_factor"], cpu["better"], cpu["target"]) == (0.95, "higher", ">= 0.95x LMCache")
    assert lookup["peer_value"] == 0.016 and (lookup["better"], lookup["target_factor"]) == ("lower", 4.0)
    assert tcp["peer_value"] == pytest.approx(256 * MIB / 0.4 / 1e9) and tcp["target_factor"] == 2.0
    assert shm["peer_value"] == pytest.approx(256 * MIB / 0.2 / 1e9)
    assert (tcp["target_factor"], shm["target_factor"]) == (2.0, 1.0)  # each LMCache server has its own bar
    assert disk["peer_value"] is None  # the peer has no such row: reported as not measured


def test_no_lmcache_is_a_skip_with_the_way_to_get_it():
    result = run_lmcache(None, quick=True)
    assert result["rows"] == []
    assert "scripts/engine-venvs.sh lmcache" in result["skipped"]["lmcache"]


def _bench(group: str, name: str, median: float, **extra) -> dict:
    return {"group": group, "name": name, "stats": {"median": median}, "extra_info": extra}


def test_suite_groups_with_a_ceiling_become_tier_rows():
    suites = {"benchmarks": [
        _bench("host", "test_copy_ceiling", 0.010), _bench("host", "test_put[host_store]", 0.0125),
        _bench("put-2MiB-uvloop", "test_raw_put_ceiling[uvloop-2MiB]", 0.001),
        _bench("put-2MiB-uvloop", "test_raw_put_fresh_numpy[uvloop-2MiB]", 0.002, ratio=0.5),
        _bench("put-2MiB-uvloop", "test_conn_put[uvloop-2MiB]", 0.002, ratio=0.8),
        _bench("lookup-131k", "test_lookup[hits-numpy]", 0.001)]}  # no ceiling: not a tier row
    rows = tier_rows(suites)
    assert [(r["tier"], r["op"], r["chunk_bytes"]) for r in rows] == [
        ("host RAM (host)", "put[host_store]", 32 * MIB), ("cache server (put-2MiB-uvloop)", "conn_put[uvloop-2MiB]",
                                                           2 * MIB)]
    host, server = rows
    assert host["ceiling_seconds"] / host["seconds"] == pytest.approx(0.8) and host["target"] == 0.8
    assert server["ceiling_seconds"] / server["seconds"] == pytest.approx(0.8)  # the suite's paired ratio
