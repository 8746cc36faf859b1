"""The ``kvstore`` command line: ``info`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from kvstore.config import StoreConfig
from kvstore.layout import KVLayout
from kvstore.sizes import format_size
from kvstore.store import KVStore

DEFAULT_DATA_DIR = "./kvstore-data"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="Tiered, prefix-deduplicated KV-cache store.")
    commands = parser.add_subparsers(dest="command", required=True)

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
