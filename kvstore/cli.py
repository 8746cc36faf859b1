"""The ``kvstore`` command line: ``demo``, ``serve``, ``stats``, ``info``, ``bench`` and ``codecs``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kvstore.config import StoreConfig
from kvstore.layout import KVLayout
from kvstore.sizes import format_size
from kvstore.store import KVStore

DEFAULT_DATA_DIR = "./kvstore-data"
DEFAULT_DEMO_DIR = "./kvstore-demo"


def _cmd_info(args: argparse.Namespace) -> int:
    config = StoreConfig.load(args.config)
    print("config:")
    for name, value in vars(config).items():
        print(f"  {name} = {value!r}")
    layout = KVLayout(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                      dtype=args.dtype, block_tokens=args.block_tokens)
    print(f"layout: {layout.describe()} ({format_size(layout.block_bytes)} per block)")
    with KVStore(layout, config) as store:
        stats = store.stats()
    print("tiers:")
    for name, tier in stats["tiers"].items():
        print(f"  {name}: {tier['blocks']} blocks, {format_size(tier['used_bytes'])} used "
              f"of {format_size(tier['capacity_bytes'])}, {tier['state']}")
    if args.json:
        print(json.dumps(stats, indent=2))
    return 0


def _bench_dir(explicit: str | None) -> Path | None:
    """The checkout's ``bench/`` folder (suites and report harness): given, beside this package, or in the cwd."""
    candidates = [Path(explicit)] if explicit else [Path(__file__).resolve().parents[1] / "bench",
                                                    Path.cwd() / "bench"]
    for folder in candidates:
        if (folder / "kvbench" / "run.py").exists():
            return folder
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.quick:
        from kvstore.benchmarking import run_quick

        run_quick(args.data_dir, repeat=5)
        return 0
    folder = _bench_dir(args.bench_dir)
    if folder is None:
        print("kvstore bench: the full run needs a checkout of kvstore (its bench/ folder: the suites and the "
              "report harness); run it from the repository after pip install -e ., or pass --bench-dir. "
              "kvstore bench --quick runs anywhere.", file=sys.stderr)
        return 2
    sys.path.insert(0, str(folder))
    from kvbench.run import BenchSettings, run

    settings = BenchSettings(out_dir=args.out, data_dir=args.work_dir, quick=args.smoke, rounds=args.repeat,
                             suites=not args.no_suites, peers=not args.no_peers,
                             workloads=tuple(args.workloads.split(",")) if args.workloads else BenchSettings.workloads,
                             configs=tuple(args.configs.split(",")) if args.configs else BenchSettings.configs,
                             lmcache_python=args.lmcache_python, gpu_price_per_hour=args.gpu_price,
                             prefill_tokens_per_second=args.prefill_tokens_per_second,
                             **({"gpu": args.gpu} if args.gpu else {}))
    run(settings)
    return 0


def _cmd_codecs(args: argparse.Namespace) -> int:
    import torch

    from kvstore.compression.table import DEFAULT_SPECS, TableSettings, codec_table, format_table

    specs = [s for s in args.codecs.split(";") if s.strip()] if args.codecs else list(DEFAULT_SPECS)
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--dtype: expected float16, bfloat16 or float32, got {args.dtype!r}")
    settings = TableSettings(layers=args.layers, tokens=args.tokens, dtype=dtype, model=not args.no_model,
                             peers=not args.no_peers)
    rows, context = codec_table(specs, settings, progress=lambda name: print(f"measuring {name} ...",
                                                                             file=sys.stderr, flush=True))
    print(f"synthetic KV [{settings.layers}, 2, {settings.tokens}, {settings.heads}, {settings.head_dim}] "
          f"{args.dtype}; model check: {'4-layer random Llama, 4 x 32 positions' if settings.model else 'off'}")
    print(format_table(rows, context))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    # The demo drives a transformers model: it lives with the integrations, imported only here.
    from tqdm import tqdm

    from kvstore.integrations.demo import DemoSettings, run_demo
    from kvstore.integrations.demo_report import format_report

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.prefix_tokens is not None:
        settings = dataclasses.replace(settings, prefix_tokens=args.prefix_tokens)
    steps = 2 * sum(1 for _ in _workload_requests(settings)) + 5 * settings.repeats
    with tqdm(total=steps, desc="kvstore demo", unit="step", disable=args.no_progress) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label[:40])
            bar.update()

        figures = run_demo(settings, args.data_dir, progress, chart=not args.no_chart)
    print(format_report(figures, settings))
    return 0


def _workload_requests(settings):  # noqa: ANN001, ANN202 - counts requests for the progress bar
    s = settings.workload
    return range(s.agent_calls + s.rag_requests + s.chats * s.chat_turns)


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvstore.config import convert_settings
    from kvstore.server import ServerConfig, run

    flags = {f.name: (f"--{f.name.replace('_', '-')}", getattr(args, f"server_{f.name}"))
             for f in dataclasses.fields(ServerConfig) if getattr(args, f"server_{f.name}") is not None}
    config = ServerConfig.load(args.config, **convert_settings(ServerConfig, flags))
    return run(config)


def _cmd_stats(args: argparse.Namespace) -> int:
    from kvstore.client import Connection

    token = args.token
    if token is None and args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
    conn = Connection(args.url, token, args.timeout)
    try:
        stats = conn.stats()
    finally:
        conn.close()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    print(format_server_stats(args.url, stats))
    return 0


def format_server_stats(url: str, stats: dict) -> str:
    """A readable summary of a STATS reply: the namespace's traffic, then the server's tiers."""
    ns, server = stats["blocks"], stats["server"]
    hits = ns["hits_ram"] + ns["hits_disk"]
    asked = hits + ns["misses"]
    quota = format_size(ns["quota_bytes"]) if ns["quota_bytes"] else "none"
    return "\n".join([
        f"server {url}: up {server['uptime_seconds']:.0f} s, {server['connections']} connection(s)",
        f"namespace {stats['namespace']}: {ns['blocks']} blocks, {format_size(ns['used_bytes'])} (quota {quota})",
        f"  reads: {hits} hits ({ns['hits_ram']} from RAM, {ns['hits_disk']} from disk), {ns['misses']} misses"
        f" ({100 * hits / asked if asked else 0:.1f}% hit rate), {format_size(ns['bytes_out'])} out",
        f"  writes: {ns['stored']} stored, {ns['present']} already present, {ns['rejected']} rejected, "
        f"{ns['invalid']} invalid, {format_size(ns['bytes_in'])} in",
        f"  evictions: {ns['evicted_quota']} for quota, {ns['evicted_capacity']} for capacity; "
        f"{ns['corrupt']} corrupt, {ns['deleted']} deleted",
        f"server tiers: host RAM {format_size(server['ram_bytes'])} of {format_size(server['ram_capacity_bytes'])}"
        f", LMDB {format_size(server['disk_used_bytes'])} of {format_size(server['disk_capacity_bytes'])}"
        f", {server['blocks']} blocks, {format_size(server['write_backlog_bytes'])} waiting for the disk",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="Tiered, prefix-deduplicated KV-cache store.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="serve a small random Llama with and without kvstore; print TTFT")
    demo.add_argument("--data-dir", default=DEFAULT_DEMO_DIR,
                      help=f"local folder for the demo's stores and chart (default {DEFAULT_DEMO_DIR})")
    demo.add_argument("--quick", action="store_true", help="a tiny model and workload (seconds; for tests)")
    demo.add_argument("--prefix-tokens", type=int, help="tokens of the shared-prefix benchmark (default 4096)")
    demo.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=_cmd_demo)

    serve = commands.add_parser("serve", help="run the cache server (defaults: loopback, ./kvstore-server, "
                                              "a printed token)")
    serve.add_argument("--config", help="TOML or YAML file (default: $KVSTORE_SERVER_CONFIG); "
                                        "KVSTORE_SERVER_* variables override it, flags override both")
    _add_settings_flags(serve)
    serve.set_defaults(run=_cmd_serve)

    stats = commands.add_parser("stats", help="print a cache server's figures for your namespace")
    stats.add_argument("--url", default="kvstore://127.0.0.1:8477", help="the server (default kvstore://127.0.0.1:8477)")
    stats.add_argument("--token", default=os.environ.get("KVSTORE_REMOTE_TOKEN"),
                       help="shared secret (default $KVSTORE_REMOTE_TOKEN)")
    stats.add_argument("--token-file", default="./kvstore-server/token",
                       help="read the token from this file when --token is not given (default ./kvstore-server/token)")
    stats.add_argument("--timeout", type=float, default=5.0, help="seconds per socket operation (default 5)")
    stats.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    stats.set_defaults(run=_cmd_stats)

    info = commands.add_parser("info", help="show the configuration and what each tier holds")
    info.add_argument("--config", help="TOML or YAML config file (default: $KVSTORE_CONFIG, then KVSTORE_* vars)")
    info.add_argument("--layers", type=int, default=32, help="layout: layers (default 32)")
    info.add_argument("--kv-heads", type=int, default=8, help="layout: KV heads (default 8)")
    info.add_argument("--head-dim", type=int, default=128, help="layout: head dim (default 128)")
    info.add_argument("--dtype", default="bfloat16", help="layout: dtype (default bfloat16)")
    info.add_argument("--block-tokens", type=int, default=256, help="layout: tokens per block (default 256)")
    info.add_argument("--json", action="store_true", help="also print every counter as JSON")
    info.set_defaults(run=_cmd_info)

    bench = commands.add_parser("bench", help="the benchmark report (in a checkout), or --quick: the tiers' "
                                              "ratios to ceilings taken in the same run")
    bench.add_argument("--quick", action="store_true", help="print the tiers' ratios, 5 rounds each (about a minute)")
    bench.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                       help=f"--quick: local folder for the disk tier (default {DEFAULT_DATA_DIR})")
    bench.add_argument("--out", default="bench-report", help="where report.md, the charts and results.json go")
    bench.add_argument("--work-dir", help="scratch folder for stores and files (default OUT/data, removed after)")
    bench.add_argument("--repeat", type=int, default=10, help="rounds per figure (default 10)")
    bench.add_argument("--smoke", action="store_true", help="check the whole harness in a few minutes on tiny "
                                                           "sizes (its figures are not the report's)")
    bench.add_argument("--no-suites", action="store_true", help="skip the pytest-benchmark suites")
    bench.add_argument("--no-peers", action="store_true", help="skip LMCache")
    bench.add_argument("--workloads", help="comma-separated: chat,rag,agent,no_reuse (default all)")
    bench.add_argument("--configs", help="comma-separated: host,host+nvme,host+nvme+codec,remote (default all)")
    bench.add_argument("--lmcache-python", help="a Python with lmcache 0.5.6 (default: this one, or .venv-lmcache)")
    bench.add_argument("--gpu", help="the GPU the cost view assumes")
    bench.add_argument("--gpu-price", type=float, default=2.50, help="dollars per GPU-hour for the cost view")
    bench.add_argument("--prefill-tokens-per-second", type=float, default=15_000.0,
                       help="the GPU's prefill throughput for the cost view (tokens/s)")
    bench.add_argument("--bench-dir", help="the checkout's bench/ folder (default: found beside the package)")
    bench.set_defaults(run=_cmd_bench)

    codecs = commands.add_parser("codecs", help="compare the codecs: size, fidelity and speed on one core")
    codecs.add_argument("--codecs", help="codec specs separated by ';' (default: every codec, some variants)")
    codecs.add_argument("--tokens", type=int, default=512, help="tokens of synthetic KV (default 512)")
    codecs.add_argument("--layers", type=int, default=4, help="layers of synthetic KV (default 4)")
    codecs.add_argument("--dtype", default="bfloat16", help="float16, bfloat16 or float32 (default bfloat16)")
    codecs.add_argument("--no-model", action="store_true", help="skip the small-model logit check")
    codecs.add_argument("--no-peers", action="store_true", help="skip transformers' quanto cache rows")
    codecs.set_defaults(run=_cmd_codecs)
    return parser


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """A ``--flag`` per ServerConfig field (its docstring says what each means), as text converted like env vars."""
    from kvstore.server import ServerConfig

    for f in dataclasses.fields(ServerConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f"server_{f.name}", metavar="VALUE",
                            help=f"default {default!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvstore`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except ValueError as error:
        print(f"kvstore: error: {error}", file=sys.stderr)
        return 2
    except (ConnectionError, TimeoutError, OSError) as error:
        print(f"kvstore: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
