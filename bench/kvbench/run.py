"""``python bench/run_bench.py`` (the full run): every suite, the peers, the workloads, then ``report.md`` and charts.

Steps, each a bar of the progress display: the machine's description; the
pytest-benchmark suites (their JSON kept as ``suites.json``); kvstore's side
of the peer comparisons and LMCache's (``kvbench.compare``,
``kvbench.peers``); the codec table with transformers' ``QuantizedCache``
as the compression peer; the workloads through the transformers model on
every store configuration (``kvbench.serving``), a ``kvstore serve`` cache
server started for the remote configuration and the server rows. Results go
to ``results.json``, from which ``kvbench.report`` writes the report; a
step that cannot run is recorded in ``skipped`` with the reason.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from kvbench import compare, machine, peers, serving, suites
from kvbench.workloads import WORKLOADS, WorkloadSettings, generate


@dataclass(frozen=True)
class BenchSettings:
    """What a full run measures and where it writes. Prices in dollars per GPU-hour, throughput in tokens/s.

    ``quick`` shrinks everything (the workloads to a tenth, the tiny model,
    two rounds a figure) to check the harness end to end in a minute or two;
    its figures are not the report's.
    """

    out_dir: str = "bench-report"
    data_dir: str | None = None
    quick: bool = False
    rounds: int = 10
    suites: bool = True
    peers: bool = True
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    configs: tuple[str, ...] = tuple(serving.CONFIGS)
    lmcache_python: str | None = None
    gpu: str = "NVIDIA H100 80GB SXM, Llama-3-8B bf16"
    gpu_price_per_hour: float = 2.50
    prefill_tokens_per_second: float = 15_000.0
    seed: int = 0
    touch_bytes: int = 4 << 30
    workload_settings: WorkloadSettings = field(default_factory=WorkloadSettings)

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 2:
            raise ValueError(f"rounds: expected an integer >= 2, got {self.rounds!r}")
        for name in ("gpu_price_per_hour", "prefill_tokens_per_second"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name}: expected a number > 0, got {value!r}")
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown or not self.workloads:
            raise ValueError(f"workloads: expected some of {sorted(WORKLOADS)}, got {list(self.workloads)}")
        unknown = [c for c in self.configs if c not in serving.CONFIGS]
        if unknown or not self.configs:
            raise ValueError(f"configs: expected some of {sorted(serving.CONFIGS)}, got {list(self.configs)}")


Progress = Callable[[str], None]


class Steps:
    """The progress bar (tqdm when installed, else a line per step) over a run's steps."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self._echo = echo
        try:
            from tqdm import tqdm
            self._bar: Any = tqdm(total=total, unit="step", dynamic_ncols=True)
        except ImportError:
            self._bar = None

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text[:60])
        else:
            self._echo(f"  {text}")

    def start(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text[:40])
        else:
            self._echo(text)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def touch_memory(num_bytes: int) -> float:
    """Write ``num_bytes`` of fresh memory once and free it; returns the seconds it took.

    On a VM whose guest memory the hypervisor backs lazily, the first write
    to a guest page costs far more than any later one (about 0.6 GB/s on
    these machines); whichever benchmark first grows into fresh memory
    would pay it. Touching it once up front makes that cost nobody's figure.
    """
    import numpy as np

    start = time.perf_counter()
    np.ones(num_bytes, dtype=np.uint8)
    return time.perf_counter() - start


@contextmanager
def cache_server(data_dir: Path) -> Iterator[Any]:
    """A memory-only ``kvstore serve`` (with its raw-socket ceiling beside it) for the remote rows."""
    from server_process import ServerProcess

    server = ServerProcess("report", {"loop": "auto", "host_bytes": "2GiB", "disk_bytes": 0,
                                      "data_dir": str(data_dir / "server")})
    try:
        yield server
    finally:
        server.stop()


def _fidelity(quick: bool, progress: Progress) -> tuple[list[dict], str | None]:
    from kvstore.compression.table import TableSettings, codec_table

    settings = TableSettings(tokens=128 if quick else 512, repeats=1 if quick else 3)
    specs = ("zstd", "int8", "ec4", "ec5", "kivi4", "kivi2", "rq4", "rq3", "rq2")
    rows, _ = codec_table(specs, settings, progress)
    peer_rows = [r for r in rows if r["codec"].startswith("transformers")]
    skipped = None if peer_rows else "optimum-quanto is not installed (pip install '.[fidelity]')"
    return [{"method": ("" if r["codec"].startswith("transformers") else "kvstore ") + str(r["codec"]),
             "bits": 16 / r["ratio"], "compression_ratio": r["ratio"], "kl_mean": r["kl_mean"],
             "top1_agreement": r["top1_agree"], "k_rel_err": r["k_rel_err"], "v_rel_err": r["v_rel_err"],
             "encode_GBps": _finite(r["encode_gbps"]), "decode_GBps": _finite(r["decode_gbps"])}
            for r in rows], skipped


def _finite(value: float) -> float | None:
    return None if value != value else value  # NaN (a speed not measured) is JSON null


def run(settings: BenchSettings, echo: Callable[[str], None] = print) -> Path:
    """The whole run; returns the report's path."""
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(settings.data_dir) if settings.data_dir else out / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    rounds = 2 if settings.quick else settings.rounds
    workload_settings = settings.workload_settings.scaled(0.1) if settings.quick else settings.workload_settings
    serving_settings = serving.ServingSettings.quick() if settings.quick else serving.ServingSettings()
    if settings.quick:
        workload_settings = WorkloadSettings(**{**asdict(workload_settings),
                                                "vocab_size": serving_settings.model.vocab_size})
    results: dict[str, Any] = {
        "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine.describe(data),
        "settings": {"quick": settings.quick, "rounds": rounds, "seed": settings.seed,
                     "model": _model_name(serving_settings), "block_tokens": serving_settings.block_tokens,
                     "host_bytes": serving_settings.host_bytes, "codec": serving_settings.codec,
                     "workloads": asdict(workload_settings)},
        "tiers": [], "comparisons": [], "workloads": [], "fidelity": [],
        "cost": {"gpu": settings.gpu, "gpu_price_per_hour": settings.gpu_price_per_hour,
                 "prefill_tokens_per_second": settings.prefill_tokens_per_second},
        "skipped": {}}
    touched = min(settings.touch_bytes, 256 << 20) if settings.quick else settings.touch_bytes
    results["settings"]["touched_memory_seconds"] = touch_memory(touched)
    steps = Steps(4, echo)
    try:
        steps.start("benchmark suites")
        if settings.suites:
            ran, tail = suites.run_suites(out / "suites.json", settings.quick)
            if ran:
                results["tiers"] = suites.tier_rows(suites.load_suites(out / "suites.json"))
            else:
                results["skipped"]["tiers"] = f"the benchmark suites failed: {tail}"
        else:
            results["skipped"]["tiers"] = "suites not run (--no-suites)"
        steps.done()
        steps.start("peers side by side")
        with cache_server(data) as server:
            rows, skipped = compare.kvstore_rows(rounds, data, server, steps.note, 1024 if settings.quick else 2048)
            results["skipped"].update(skipped)
            peer = (peers.run_lmcache(peers.lmcache_python(settings.lmcache_python), settings.quick)
                    if settings.peers else {"rows": [], "skipped": {"lmcache": "peers not run (--no-peers)"}})
            results["skipped"].update(peer.get("skipped", {}))
            results["comparisons"] = peers.comparisons(rows, peer)
            steps.done()
            steps.start("compression and fidelity")
            results["fidelity"], skipped_peer = _fidelity(settings.quick, steps.note)
            if skipped_peer:
                results["skipped"]["QuantizedCache"] = skipped_peer
            steps.done()
            steps.start("workloads")
            arrivals = {name: generate(name, workload_settings) for name in settings.workloads}
            results["workloads"] = serving.run_serving(arrivals, settings.configs, serving_settings, data / "stores",
                                                       server, steps.note)
            steps.done()
    finally:
        steps.close()
        (out / "results.json").write_text(json.dumps(results, indent=1))
        shutil.rmtree(data, ignore_errors=True)
    from kvbench.report import render

    report = render(results, out)
    echo(f"report: {report}")
    return report


def _model_name(settings: serving.ServingSettings) -> str:
    m = settings.model
    return (f"random-init Llama, {m.layers} layers, hidden {m.hidden_size}, {m.heads} heads ({m.kv_heads} KV), "
            f"{m.dtype}")
