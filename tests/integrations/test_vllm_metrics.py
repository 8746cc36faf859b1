"""kvstore's vLLM stats, Prometheus metrics and KV cache events against vLLM's real classes (0.33; 0.32 too).

Stats travel as vLLM ships them: pickled from two workers, combined by the
real ``KVOutputAggregator``, merged with the scheduler's, msgspec-encoded in
``EngineCoreOutputs`` and rebuilt for the real ``KVConnectorLogging`` and
``PrometheusStatLogger`` (global ``prometheus_client`` registry, read back
with ``generate_latest``). Events go through the aggregator to the
scheduler-side merge and out of vLLM's real ``ZmqEventPublisher`` to a zmq
SUB socket on localhost, decoded with msgspec as vLLM's subscribers do.
"""

from __future__ import annotations

import json
import logging
import pickle
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: build its environment with scripts/engine-venvs.sh vllm")

import msgspec  # noqa: E402
import zmq  # noqa: E402
from prometheus_client import REGISTRY, generate_latest  # noqa: E402
from vllm.config import DeviceConfig, KVEventsConfig, KVTransferConfig, ModelConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_events import BlockRemoved, BlockStored, EventPublisherFactory, KVEventBatch  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging  # noqa: E402
from vllm.v1.engine import EngineCoreOutputs  # noqa: E402
from vllm.v1.metrics.loggers import PrometheusStatLogger  # noqa: E402
from vllm.v1.metrics.stats import SchedulerStats  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder  # noqa: E402

from conftest import run_python  # noqa: E402
from kvstore.integrations import vllm_metrics  # noqa: E402
from kvstore.integrations.vllm_metrics import (STAT_KEYS, ConnectorEvents, KVStoreConnectorStats,  # noqa: E402
                                               KVStoreKVEvents, KVStorePromMetrics, medium_of)

MiB = 1 << 20


class MetricsConnector(KVConnectorBase_V1):
    """The connector class vLLM's factory resolves: only the classmethods the frontend calls."""

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return vllm_metrics.build_kv_connector_stats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return vllm_metrics.build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def transfer_config() -> KVTransferConfig:
    return KVTransferConfig(kv_connector="MetricsConnector", kv_connector_module_path=__name__, kv_role="kv_both")


def worker_stats(rank: int, staging: int) -> KVStoreConnectorStats:
    stats = KVStoreConnectorStats()
    stats.record_transfer("load", tokens=256, nbytes=8 * MiB, seconds=0.004)
    stats.record_transfer("save", tokens=512, nbytes=16 * MiB, seconds=0.010)
    stats.add("save_skipped")
    stats.set_staging_bytes(rank, staging)
    return stats


def step_payload() -> dict:
    """One engine step as the frontend receives it: two workers' stats and the scheduler's, through msgspec."""
    outputs = []
    for rank, staging in ((0, 3 * MiB), (1, 5 * MiB)):
        kv_out = KVConnectorOutput(kv_connector_stats=pickle.loads(pickle.dumps(worker_stats(rank, staging))))
        outputs.append(ModelRunnerOutput(req_ids=[], req_id_to_index={}, kv_connector_output=kv_out))
    combined = KVOutputAggregator(expected_finished_count=2).aggregate(outputs).kv_connector_output.kv_connector_stats
    scheduler = KVStoreConnectorStats()
    scheduler.record_lookup(prompt_tokens=1000, hit_tokens=250, seconds=0.002)
    stats = combined.aggregate(scheduler)  # as Scheduler.update_from_output merges them
    out = EngineCoreOutputs(scheduler_stats=SchedulerStats(kv_connector_stats=stats.to_dict()))
    wire = MsgpackEncoder().encode(out)
    return MsgpackDecoder(EngineCoreOutputs).decode(wire).scheduler_stats.kv_connector_stats


def test_stats_counters_gauge_and_reduce():
    stats = KVStoreConnectorStats()
    assert stats.is_empty() and set(STAT_KEYS) <= set(stats.data)
    with pytest.raises(KeyError, match="unknown kvstore counter"):
        stats.add("lookup")
    stats.set_staging_bytes(0, 0)  # a gauge reading of 0 is news (staging drained), not "empty"
    assert not stats.is_empty()
    stats.reset()
    assert stats.is_empty()

    for _ in range(1500):
        stats.record_transfer("load", tokens=16, nbytes=MiB, seconds=0.001)
    assert stats.data["loads"] == 1500 and len(stats.data["load_samples"]) == vllm_metrics.MAX_SAMPLES

    a, b = worker_stats(0, 3 * MiB), worker_stats(1, 5 * MiB)
    a.aggregate(b)  # two TP ranks of one step: counters add, gauges of different workers add up
    later = KVStoreConnectorStats()
    later.set_staging_bytes(0, 1 * MiB)
    a.aggregate(later)  # a later step: rank 0's reading replaces its earlier one
    r = a.reduce()
    assert r["loads"] == 2 and r["load_bytes"] == 16 * MiB and r["save_skipped"] == 2
    assert r["staging_bytes"] == 6 * MiB
    assert r["load_GBps"] == round(16 * MiB / 0.008 / 1e9, 3) and r["save_p99_ms"] == 10.0
    assert "hit_rate" not in r and "lookups" not in r  # zero counters and undefined ratios stay out of the log


def test_stats_travel_like_vllm_and_log():
    payload = step_payload()
    assert payload["lookups"] == 1 and payload["loads"] == 2 and payload["staging_bytes"] == {"0": 3 * MiB,
                                                                                              "1": 5 * MiB}
    logging_ = KVConnectorLogging(transfer_config())  # the frontend's log side, resolving our class
    logging_.observe(payload)
    logging_.observe(step_payload())
    lines: list[str] = []
    logging_.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    assert len(lines) == 1, lines
    fields = dict(kv.split("=") for kv in lines[0].split(": ", 1)[1].split(", "))
    assert fields["lookups"] == "2" and fields["hit_rate"] == "0.25" and fields["loads"] == "4"
    assert fields["staging_bytes"] == str(8 * MiB)  # last per worker, summed: not 16 MiB
    assert float(fields["load_p50_ms"]) == 4.0 and float(fields["save_GBps"]) > 0
    assert logging_.transfer_stats_accumulator is None  # reset for the next interval


def test_stats_inside_a_multiconnector_reach_the_frontend_log():
    """vLLM's MultiConnector rebuilds each child's stats by the child's registered name alone, in a front end
    that never builds a connector: with stats logging on, every request failed with "Connector
    'KVStoreConnector' is not registered". vLLM's general plugins (loaded by its front end) register it,
    without importing the connector. A fresh interpreter: this one imported the connector long ago."""
    out = run_python("""
        import sys
        from vllm.config import KVTransferConfig
        from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging
        from vllm.plugins import load_general_plugins
        from kvstore.integrations.vllm_metrics import KVStoreConnectorStats
        load_general_plugins()
        lazy = "kvstore.integrations.vllm" not in sys.modules
        multi = KVTransferConfig(kv_connector="MultiConnector", kv_role="kv_both", kv_connector_extra_config={
            "connectors": [{"kv_connector": "KVStoreConnector", "kv_role": "kv_both",
                            "kv_connector_module_path": "kvstore.integrations.vllm"}]})
        stats = KVStoreConnectorStats()
        stats.record_lookup(64, 32, 0.001)
        logging_ = KVConnectorLogging(multi)
        logging_.observe({"KVStoreConnector": stats.data})
        lines = []
        logging_.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
        print(lazy, len(lines), "KVStoreConnector={'lookups': 1," in lines[0])
    """, timeout=120)
    assert out.split() == ["True", "1", "True"], out


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory) -> VllmConfig:
    model = tmp_path_factory.mktemp("model")
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1000, "max_position_embeddings": 2048, "torch_dtype": "float32", "rms_norm_eps": 1e-5}))
    return VllmConfig(model_config=ModelConfig(model=str(Path(model)), skip_tokenizer_init=True, dtype="float32",
                                               max_model_len=2048),
                      device_config=DeviceConfig("cpu"), kv_transfer_config=transfer_config())


def test_prometheus_stat_logger(vllm_config):
    prom = PrometheusStatLogger(vllm_config, engine_indexes=[0, 1])
    metrics = prom.kv_connector_prom.prom_metrics
    assert isinstance(metrics, KVStorePromMetrics)
    labels = {"model_name": vllm_config.model_config.served_model_name, "engine": "1"}

    def value(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    assert value("vllm:kvstore_loads_total") == 0 and value("vllm:kvstore_staging_bytes") == 0
    prom.record(scheduler_stats=SchedulerStats(kv_connector_stats=step_payload()), iteration_stats=None,
                engine_idx=1)
    assert value("vllm:kvstore_lookups_total") == 1 and value("vllm:kvstore_hit_tokens_total") == 250
    assert value("vllm:kvstore_load_bytes_total") == 16 * MiB and value("vllm:kvstore_save_skipped_total") == 2
    assert value("vllm:kvstore_staging_bytes") == 8 * MiB
    assert value("vllm:kvstore_load_duration_seconds_count") == 2
    assert value("vllm:kvstore_save_duration_seconds_bucket") is None  # buckets carry an "le" label
    assert REGISTRY.get_sample_value("vllm:kvstore_save_duration_seconds_bucket", {**labels, "le": "0.01"}) == 2

    only_rank0 = {"loads": 1, "load_seconds": 0.5, "load_samples": [0.5], "staging_bytes": {"0": MiB}}
    prom.record(scheduler_stats=SchedulerStats(kv_connector_stats=only_rank0), iteration_stats=None, engine_idx=1)
    assert value("vllm:kvstore_loads_total") == 3 and value("vllm:kvstore_load_seconds_total") == pytest.approx(0.508)
    assert value("vllm:kvstore_staging_bytes") == 6 * MiB  # rank 1's last reading still counts
    assert REGISTRY.get_sample_value("vllm:kvstore_loads_total", {**labels, "engine": "0"}) == 0

    text = generate_latest(REGISTRY).decode()
    for name in [f"vllm:kvstore_{key}_total" for key in STAT_KEYS] + [
            "vllm:kvstore_staging_bytes", "vllm:kvstore_load_duration_seconds_bucket",
            "vllm:kvstore_save_duration_seconds_sum"]:
        assert f"\n{name}{{" in text, name
    PrometheusStatLogger(vllm_config)  # rebuilt (as on a restart in-process): vLLM unregisters our "vllm:" metrics


def test_events_buffer_bounded_and_thread_safe(monkeypatch, caplog):
    assert [medium_of(t) for t in ("device", "host", "lmdb", "files", "remote", "redis", "CPU")] == [
        "GPU", "CPU", "STORAGE", "STORAGE", "STORAGE", "STORAGE", "CPU"]
    with caplog.at_level(logging.WARNING, logger="kvstore.integrations.vllm_metrics"):
        assert medium_of("ssd") == medium_of("ssd") == "STORAGE"
    assert [r.getMessage() for r in caplog.records].count(
        "kvstore tier 'ssd' has no vLLM event medium; reported as STORAGE "
        "(known: ['device', 'host', 'lmdb', 'files', 'remote', 'redis'])") == 1
    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "0")  # hashes stay bytes
    events = ConnectorEvents()
    events.stored([b"k1", b"k2"], None, list(range(32)), 16, "host", lora_name="adapter")
    events.removed([b"k1"], "redis")
    stored, removed = events.take()
    assert events.take() == [] and events.dropped == 0
    assert isinstance(stored, BlockStored) and stored.block_hashes == [b"k1", b"k2"] and stored.block_size == 16
    assert (stored.medium, stored.locality, stored.ownership, stored.lora_name, stored.group_idx) == (
        "CPU", "LOCAL", "kvstore", "adapter", 0)
    assert isinstance(removed, BlockRemoved) and (removed.medium, removed.locality) == ("STORAGE", "REMOTE")
    monkeypatch.delenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES")  # vLLM's default: the low 64 bits as an int
    events.stored([b"\xff" * 24 + b"\x00\x00\x00\x00\x00\x00\x01\x02", 7], b"\x05", [1] * 32, 16, "lmdb")
    (converted,) = events.take()
    assert converted.block_hashes == [0x0102, 7] and converted.parent_block_hash == 5

    small = ConnectorEvents(max_events=3)
    for i in range(5):
        small.removed([i], "files")
    assert small.dropped == 2 and [e.block_hashes for e in small.take()] == [[2], [3], [4]]

    shared = ConnectorEvents(max_events=100_000)
    threads = [threading.Thread(target=lambda t=t: [shared.removed([t, i], "lmdb") for i in range(2000)])
               for t in range(4)]
    for thread in threads:
        thread.start()
    taken = []
    while any(t.is_alive() for t in threads):
        taken += shared.take()
    for thread in threads:
        thread.join()
    taken += shared.take()
    assert len(taken) == 8000 and len({tuple(e.block_hashes) for e in taken}) == 8000 and shared.dropped == 0


def worker_events(*hashes: int, removed: tuple[int, ...] = ()) -> KVStoreKVEvents | None:
    buffer = ConnectorEvents()
    for h in hashes:
        buffer.stored([h], None, list(range(h, h + 16)), 16, "host")
        buffer.stored([h], None, list(range(h, h + 16)), 16, "host")  # a duplicate counts once per worker
    if removed:
        buffer.removed(list(removed), "host")
    return pickle.loads(pickle.dumps(buffer.take_kv_events()))


def scheduler_side(*workers: KVStoreKVEvents | None, world_size: int) -> list:
    """Real ``KVOutputAggregator`` over the workers, then the scheduler connector's update/take."""
    outputs = [ModelRunnerOutput(req_ids=[], req_id_to_index={}, kv_connector_output=KVConnectorOutput(
        kv_cache_events=w)) for w in workers]
    combined = KVOutputAggregator(expected_finished_count=world_size).aggregate(outputs).kv_connector_output
    pending = KVStoreKVEvents(num_workers=0)  # what update_connector_output accumulates
    if combined.kv_cache_events is not None:
        pending.merge(combined.kv_cache_events)
    return pending.aggregate(world_size).get_all_events()


def test_kv_events_aggregate_across_workers():
    assert worker_events() is None  # nothing to say: the worker returns None
    events = scheduler_side(worker_events(1, 2, removed=(7,)), worker_events(2, 3), world_size=2)
    assert [(type(e).__name__, e.block_hashes) for e in events] == [("BlockStored", [2]), ("BlockRemoved", [7])]
    # rank 0 said nothing this step: rank 1's stores are not complete blocks yet
    assert scheduler_side(None, worker_events(4, removed=(5,)), world_size=2) == [
        BlockRemoved(block_hashes=[5], medium="CPU", group_idx=0, locality="LOCAL", ownership="kvstore")]
    assert [e.block_hashes for e in scheduler_side(worker_events(6), world_size=1)] == [[6]]


def test_events_through_vllm_zmq_publisher():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    publisher = EventPublisherFactory.create(KVEventsConfig(
        enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://*:{port}", topic="kv-events"))
    sub = zmq.Context.instance().socket(zmq.SUB)
    try:
        sub.connect(f"tcp://127.0.0.1:{port}")
        sub.setsockopt_string(zmq.SUBSCRIBE, "kv-events")
        buffer = ConnectorEvents()
        buffer.stored([b"\x01" * 32, b"\xff" * 32], None, list(range(512)), 256, "files")
        buffer.removed([b"\xff" * 32], "device")
        sent = buffer.take()
        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        deadline = time.monotonic() + 10
        while True:  # PUB drops messages until the SUB has joined: publish until one arrives
            publisher.publish(KVEventBatch(ts=time.time(), events=sent))  # as Scheduler.update_from_output does
            if sub.poll(200):
                topic, seq, payload = sub.recv_multipart()
                break
            assert time.monotonic() < deadline, "no event batch arrived"
        batch = decoder.decode(payload)
        assert topic == b"kv-events" and int.from_bytes(seq, "big") >= 0 and batch.data_parallel_rank == 0
        assert batch.events == sent
        assert batch.events[0].medium == "STORAGE" and batch.events[0].locality is None
        assert batch.events[1].medium == "GPU" and batch.events[1].block_hashes == [2**64 - 1]  # a full uint64
    finally:
        sub.close(linger=0)
        publisher.shutdown()
