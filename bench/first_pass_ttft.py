"""First-pass TTFT against no cache, each store configuration run alone: what a cache costs when it finds little.

``kvbench``'s report times the bare model once per workload, before every
configuration; on a shared machine that drifts, a few percent either way is
then the machine, not the cache. Here every configuration's pass over a
workload (a store empty at its start, requests back to back, as in
``kvbench.serving``) sits between two bare passes over the same requests,
and its figure is the mean of those two over its own TTFT summed over the
requests; each round repeats that for every configuration, and the median
over rounds is printed with the rounds. Run from the checkout::

    python bench/first_pass_ttft.py --workloads no_reuse,rag --rounds 5

(1.00: the first pass costs nothing; above 1: it saves time.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvbench import serving  # noqa: E402
from kvbench.workloads import WORKLOADS, WorkloadSettings, generate  # noqa: E402
from kvstore.integrations.demo import build_model  # noqa: E402
from kvstore.integrations.transformers import CachedModel  # noqa: E402


def first_pass_ratios(workload: str, configs: list[str], rounds: int, model, settings: serving.ServingSettings,
                      data: Path, workload_settings: WorkloadSettings | None = None) -> dict[str, list[float]]:
    """Per configuration, each round's bare TTFT (mean of the passes around it) over its first-pass TTFT."""
    arrivals = generate(workload, workload_settings)

    def bare() -> float:
        return sum(serving.bare_ttft(model, a.tokens) for a in arrivals)

    ratios: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(rounds):
        before = bare()
        for name in configs:
            with serving.opened(name, settings, model, data / f"{workload}-{name}-{round_}", None) as store:
                first = serving._pass(CachedModel(model, store), arrivals)
                store.flush()
            after = bare()
            ratios[name].append((before + after) / 2 / sum(ttft for ttft, _ in first))
            before = after
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="no_reuse,rag", help=f"some of {','.join(WORKLOADS)}")
    parser.add_argument("--configs", default="host,host+nvme,host+nvme+codec",
                        help="local configurations of kvbench.serving (the cache server's is not started here)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    workloads, configs = args.workloads.split(","), args.configs.split(",")
    bad = [w for w in workloads if w not in WORKLOADS] + [c for c in configs if c not in serving.CONFIGS
                                                          or serving.CONFIGS[c][1]]
    if bad or args.rounds < 1:
        parser.error(f"unknown or unsupported: {bad or args.rounds}")
    settings = serving.ServingSettings()
    model, _ = build_model(settings.model)
    serving.warm_up(model, settings)
    with tempfile.TemporaryDirectory(prefix="first-pass-") as data:
        for workload in workloads:
            for name, values in first_pass_ratios(workload, configs, args.rounds, model, settings,
                                                  Path(data)).items():
                label = serving.config_label(name, settings)
                print(f"{workload:9} {label:16} no-cache TTFT / first-pass TTFT: median "
                      f"{statistics.median(values):.3f}  rounds {[round(v, 3) for v in values]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
