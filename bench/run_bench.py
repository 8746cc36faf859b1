"""The full benchmark report, run as a script of the checkout: ``python bench/run_bench.py [options]``.

Every pytest-benchmark suite under ``bench/``, LMCache side by side, the
codec table and the seeded workloads, then ``report.md``, PNG charts and
``results.json`` in ``--out`` (``kvbench.run``). It needs kvstore installed
from this checkout (``pip install -e ".[test]"``); the harness itself
(``bench/kvbench``, ``bench/peers``) is not part of the installed package,
so this script puts its own folder on ``sys.path``. ``kvstore bench --quick``
is the short version that ships with the package.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python bench/run_bench.py",
                                     description="The full kvstore benchmark report (about 8 minutes on 2 cores).")
    parser.add_argument("--out", default="bench-report", help="where report.md, the charts and results.json go")
    parser.add_argument("--work-dir", help="scratch folder for stores and files (default OUT/data, removed after)")
    parser.add_argument("--repeat", type=int, default=10, help="rounds per figure (default 10)")
    parser.add_argument("--smoke", action="store_true", help="check the whole harness in a few minutes on tiny "
                                                            "sizes (its figures are not the report's)")
    parser.add_argument("--no-suites", action="store_true", help="skip the pytest-benchmark suites")
    parser.add_argument("--no-peers", action="store_true", help="skip LMCache")
    parser.add_argument("--workloads", help="comma-separated: chat,rag,agent,no_reuse (default all)")
    parser.add_argument("--configs", help="comma-separated: host,host+nvme,host+nvme+codec,remote (default all)")
    parser.add_argument("--lmcache-python", help="a Python with lmcache 0.5.6 (default: this one, or .venv-lmcache)")
    parser.add_argument("--gpu", help="the GPU the cost view assumes")
    parser.add_argument("--gpu-price", type=float, default=2.50, help="dollars per GPU-hour for the cost view")
    parser.add_argument("--prefill-tokens-per-second", type=float, default=15_000.0,
                        help="the GPU's prefill throughput for the cost view (tokens/s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import kvstore  # noqa: F401 - checked first: the harness imports it everywhere
    except ImportError:
        print("run_bench.py: error: kvstore is not installed in this Python; from the checkout run "
              "pip install -e \".[test]\" first", file=sys.stderr)
        return 2
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    from kvbench.run import BenchSettings, run

    try:
        settings = BenchSettings(
            out_dir=args.out, data_dir=args.work_dir, quick=args.smoke, rounds=args.repeat,
            suites=not args.no_suites, peers=not args.no_peers,
            workloads=tuple(args.workloads.split(",")) if args.workloads else BenchSettings.workloads,
            configs=tuple(args.configs.split(",")) if args.configs else BenchSettings.configs,
            lmcache_python=args.lmcache_python, gpu_price_per_hour=args.gpu_price,
            prefill_tokens_per_second=args.prefill_tokens_per_second,
            **({"gpu": args.gpu} if args.gpu else {}))
    except ValueError as error:
        print(f"run_bench.py: error: {error}", file=sys.stderr)
        return 2
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
