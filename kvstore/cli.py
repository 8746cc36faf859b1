"""The ``kvstore`` command line: ``demo``, ``info``, ``bench`` and ``codecs``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

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


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvstore.benchmarking import run_quick

    repeat = 5 if args.quick else args.repeat
    run_quick(args.data_dir, repeat=repeat)
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

    info = commands.add_parser("info", help="show the configuration and what each tier holds")
    info.add_argument("--config", help="TOML or YAML config file (default: $KVSTORE_CONFIG, then KVSTORE_* vars)")
    info.add_argument("--layers", type=int, default=32, help="layout: layers (default 32)")
    info.add_argument("--kv-heads", type=int, default=8, help="layout: KV heads (default 8)")
    info.add_argument("--head-dim", type=int, default=128, help="layout: head dim (default 128)")
    info.add_argument("--dtype", default="bfloat16", help="layout: dtype (default bfloat16)")
    info.add_argument("--block-tokens", type=int, default=256, help="layout: tokens per block (default 256)")
    info.add_argument("--json", action="store_true", help="also print every counter as JSON")
    info.set_defaults(run=_cmd_info)

    bench = commands.add_parser("bench", help="measure the tiers against ceilings taken in the same run")
    bench.add_argument("--quick", action="store_true", help="5 rounds per figure (about a minute)")
    bench.add_argument("--repeat", type=int, default=10, help="rounds per figure without --quick (default 10)")
    bench.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                       help=f"local folder for the disk tier (default {DEFAULT_DATA_DIR})")
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


if __name__ == "__main__":
    sys.exit(main())
