"""The workloads served by a transformers model through kvstore: TTFT cold, on a fresh store, and warm.

For each workload (``kvbench.workloads``) and store configuration
(``CONFIGS``), every request runs through ``CachedModel`` in arrival order
(a closed-loop replay: the next request starts when the previous one has
its first token; arrival times are kept in the results, not slept):

* ``ttft_cold``: the bare model prefilling the whole prompt (no cache at
  all), measured once per workload, the same figures for every configuration;
* ``ttft_first``: through a store that is empty when the workload starts,
  so a request hits only what earlier requests of the same workload left
  (what a freshly started server sees);
* ``ttft_warm``: the same requests again on that store (yesterday's traffic
  replayed: what a cache that has seen the workload serves).

TTFT is the load of the stored prefix plus the prefill of the rest up to the
first token's logits; saving the new KV happens after it (its cost is the
store's write path, measured by the tier benchmarks). The model is the
demo's random-initialised Llama (``kvstore.integrations.demo.build_model``);
no weights are downloaded.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvbench.workloads import Arrival
from kvstore import KVStore, StoreConfig
from kvstore.integrations.demo import RANDOM, DemoSettings, build_model
from kvstore.integrations.transformers import CachedModel, layout_for

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ServingSettings:
    """The model, its blocks (tokens) and the store's sizes (bytes or size strings) for every configuration.

    ``host_bytes`` is deliberately smaller than a workload's KV, as host RAM
    is smaller than the traffic on a real server: configurations differ in
    where the blocks host RAM cannot keep go.
    """

    # The demo's random-initialised Llama in bf16: the workloads are random token ids.
    model: DemoSettings = field(default_factory=lambda: DemoSettings(model=RANDOM, dtype="bfloat16"))
    block_tokens: int = 256
    host_bytes: str = "24MiB"
    disk_bytes: str = "2GiB"
    codec: str = "ec4"
    server_bytes: str = "1GiB"

    @classmethod
    def quick(cls) -> "ServingSettings":
        """Seconds, not minutes: the demo's tiny model and 16-token blocks."""
        return cls(model=DemoSettings.quick(RANDOM), block_tokens=16, host_bytes="1MiB", disk_bytes="64MiB",
                   server_bytes="64MiB")


def _host_only(settings: ServingSettings, data: Path, remote: Any) -> StoreConfig:
    return StoreConfig(model_id="kvbench", host_bytes=settings.host_bytes)


def _host_nvme(settings: ServingSettings, data: Path, remote: Any, codec: str = "raw") -> StoreConfig:
    return StoreConfig(model_id="kvbench", host_bytes=settings.host_bytes, disk_dir=str(data),
                       disk_bytes=settings.disk_bytes, disk_codec=codec)


def _host_nvme_codec(settings: ServingSettings, data: Path, remote: Any) -> StoreConfig:
    return _host_nvme(settings, data, remote, settings.codec)


def _remote(settings: ServingSettings, data: Path, remote: Any) -> StoreConfig:
    return StoreConfig(model_id="kvbench", host_bytes=settings.host_bytes, remote_url=remote.url,
                       remote_token=remote.token, remote_timeout_seconds=30.0)


# name -> (the store's settings, whether it needs the cache server)
CONFIGS: dict[str, tuple[Callable[[ServingSettings, Path, Any], StoreConfig], bool]] = {
    "host": (_host_only, False),
    "host+nvme": (_host_nvme, False),
    "host+nvme+codec": (_host_nvme_codec, False),
    "remote": (_remote, True),
}


def config_label(name: str, settings: ServingSettings) -> str:
    """The configuration's name as the report shows it (the codec named)."""
    return name.replace("codec", settings.codec)


def bare_ttft(model: Any, tokens: Sequence[int]) -> float:
    """Seconds of a full prefill of ``tokens`` up to the first token's logits (no cache)."""
    ids = torch.tensor([list(tokens)])
    start = time.perf_counter()
    with torch.no_grad():
        model(ids, logits_to_keep=1)
    return time.perf_counter() - start


def warm_up(model: Any, settings: ServingSettings) -> None:
    """One-time costs (kernels, thread pools, first allocations) are nobody's TTFT."""
    tokens = torch.zeros(2 * settings.block_tokens + 1, dtype=torch.long)
    with KVStore(layout_for(model, block_tokens=settings.block_tokens), StoreConfig(host_bytes="16MiB")) as store:
        cached = CachedModel(model, store)
        for _ in range(2):
            cached.forward(tokens, logits_to_keep=1)


def _pass(cached: CachedModel, arrivals: Sequence[Arrival]) -> list[tuple[float, int]]:
    """(TTFT seconds, tokens loaded) of each request in order."""
    out = []
    for arrival in arrivals:
        _, info = cached.forward(torch.tensor(arrival.tokens), logits_to_keep=1)
        out.append((info.ttft_seconds, info.loaded_tokens))
    return out


def serve_workload(model: Any, store: KVStore, arrivals: Sequence[Arrival], cold: Sequence[float]) -> list[dict]:
    """The per-request rows of one workload on one (empty) store: cold, first-pass and warm TTFT."""
    cached = CachedModel(model, store)
    first = _pass(cached, arrivals)
    store.flush()
    warm = _pass(cached, arrivals)
    return [{"name": a.name, "prompt_tokens": len(a.tokens), "arrival_seconds": a.arrival_seconds,
             "reusable_tokens": a.reusable_tokens, "ttft_cold": c, "ttft_first": f[0], "ttft_warm": w[0],
             "loaded_first": f[1], "loaded_warm": w[1]}
            for a, c, f, w in zip(arrivals, cold, first, warm)]


@contextmanager
def opened(name: str, settings: ServingSettings, model: Any, data: Path, remote: Any) -> Iterator[KVStore]:
    """An empty store of configuration ``name`` with its data under ``data`` (removed afterwards).

    The cache server outlives the stores, but no two workloads share a
    token sequence (each draws its own), so a store starts empty there too.
    """
    make, _ = CONFIGS[name]
    shutil.rmtree(data, ignore_errors=True)
    store = KVStore(layout_for(model, block_tokens=settings.block_tokens), make(settings, data, remote))
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(data, ignore_errors=True)


def run_serving(workloads: dict[str, list[Arrival]], configs: Sequence[str], settings: ServingSettings,
                data_dir: Path, remote: Any, progress: Progress) -> list[dict]:
    """Every workload on every configuration: the ``workloads`` section of the report's results."""
    model, _ = build_model(settings.model)
    warm_up(model, settings)
    results = []
    for workload, arrivals in workloads.items():
        cold = []
        for arrival in arrivals:
            cold.append(bare_ttft(model, arrival.tokens))
        progress(f"{workload}: full prefill of {len(arrivals)} requests")
        for name in configs:
            with opened(name, settings, model, data_dir / f"{workload}-{name}", remote) as store:
                rows = serve_workload(model, store, arrivals, cold)
                stats = store.stats()
            results.append({"workload": workload, "config": config_label(name, settings), "requests": rows,
                            "tiers": {tier: {k: stats["tiers"][tier].get(k, 0) for k in ("hits", "misses", "blocks")}
                                      for tier in stats["tiers"]}})
            progress(f"{workload}: {config_label(name, settings)}")
    return results
