"""What ``kvstore demo`` prints and draws: TTFT tables, hit rates, savings, and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HOST_HIT, DISK_HIT, FULL, PREFETCHED = "host hit", "disk hit", "full prefill", "disk hit, prefetched"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f}"


def _sources(sources: dict[str, int]) -> str:
    return ", ".join(f"{name} {tokens}" for name, tokens in sources.items() if tokens) or "-"


def format_report(figures: dict[str, Any], settings: Any) -> str:
    """The demo's text report: per-request TTFT, hit rates per tier, savings and the prefix benchmark."""
    timings, stats, prefix = figures["timings"], figures["stats"], figures["prefix"]
    lines = [f"model: random-init Llama, {settings.layers} layers, hidden {settings.hidden_size}, "
             f"{settings.heads} heads ({settings.kv_heads} KV), {settings.dtype}; blocks of {settings.block_tokens} "
             f"tokens; host RAM over LMDB", "",
             "1. mixed workload: TTFT per request (ms)",
             f"{'request':<22}{'prompt':>7}{'loaded':>8}  {'from':<16}{'without':>10}{'with':>10}{'speed-up':>10}"]
    for t in timings:
        lines.append(f"{t.request.name:<22}{len(t.request.prompt):>7}{t.loaded_tokens:>8}  "
                     f"{_sources(t.sources):<16}{_ms(t.without_store)} {_ms(t.with_store)}"
                     f"{t.without_store / t.with_store:>9.1f}x")
    without = sum(t.without_store for t in timings)
    with_store = sum(t.with_store for t in timings)
    prompt_tokens = sum(len(t.request.prompt) for t in timings)
    loaded = sum(t.loaded_tokens for t in timings)
    lines += [f"{'total':<22}{prompt_tokens:>7}{loaded:>8}  {'':<16}{_ms(without)} {_ms(with_store)}"
              f"{without / with_store:>9.1f}x",
              f"token hit rate: {loaded / prompt_tokens:.1%} of prompt tokens loaded instead of prefilled"]
    for name, tier in stats["tiers"].items():
        reads = tier["hits"] + tier["misses"]
        rate = f"{tier['hits'] / reads:.1%}" if reads else "-"
        lines.append(f"  {name:<6} block hit rate {rate:>6} ({tier['hits']} hits, {tier['misses']} misses), "
                     f"{tier['blocks']} blocks held")
    store = stats["store"]
    lines += [f"prefill tokens saved: {store['prefill_tokens_saved']}; estimated compute saved: "
              f"{store['compute_seconds_saved']:.2f} s at the planner's {store['prefill_tokens_per_second']:.0f} "
              f"tokens/s prefill, for {store['load_seconds']:.3f} s of loading", ""]

    full = prefix.ttft[FULL]
    lines += [f"2. a {settings.prefix_tokens}-token shared prefix + a {settings.question_tokens}-token question "
              f"(median of {settings.repeats})",
              f"{'scenario':<26}{'TTFT ms':>10}{'vs full prefill':>17}{'load ms':>10}{'loaded':>8}"]
    for name, ttft in prefix.ttft.items():
        load = _ms(prefix.load[name]) if name in prefix.load else f"{'-':>9}"
        lines.append(f"{name:<26}{_ms(ttft)} {full / ttft:>15.1f}x {load}{prefix.loaded_tokens.get(name, 0):>8}")
    if HOST_HIT in prefix.load and PREFETCHED in prefix.load:
        lines.append(f"prefetch hiding: engine load time of a prefetched disk hit = "
                     f"{prefix.load[PREFETCHED] / prefix.load[HOST_HIT]:.2f}x that of a host hit "
                     f"(queue wait {settings.queue_wait_seconds:.2f} s)")
    if figures.get("chart"):
        lines.append(f"chart: {figures['chart']}")
    return "\n".join(lines)


def write_chart(timings: list[Any], prefix: Any, path: Path, settings: Any) -> Path:
    """A PNG: TTFT per workload request with and without kvstore, and TTFT per prefix scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    index = range(len(timings))
    width = 0.4
    left.bar([i - width / 2 for i in index], [t.without_store * 1e3 for t in timings], width,
             label="without kvstore", color="#c44e52")
    left.bar([i + width / 2 for i in index], [t.with_store * 1e3 for t in timings], width,
             label="with kvstore", color="#4c72b0")
    left.set_xticks(list(index), [t.request.name for t in timings], rotation=60, ha="right", fontsize=8)
    left.set_ylabel("time to first token (ms)")
    left.set_title("mixed workload: chats, RAG, agent fan-out")
    left.legend()
    names = list(prefix.ttft)
    right.bar(names, [prefix.ttft[n] * 1e3 for n in names], color=["#c44e52"] + ["#4c72b0"] * (len(names) - 1))
    right.set_yscale("log")
    right.set_ylabel("time to first token (ms, log)")
    right.set_title(f"{settings.prefix_tokens}-token shared prefix")
    right.tick_params(axis="x", rotation=30, labelsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
