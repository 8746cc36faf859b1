"""What ``kvstore demo`` prints and draws: TTFT tables, hit rates, savings, and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HOST_HIT, DISK_HIT, FULL, PREFETCHED = "host hit", "disk hit", "full prefill", "disk hit, prefetched"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f}"


def _sources(sources: dict[str, int]) -> str:
    return ", ".join(f"{name} {tokens}" for name, tokens in sources.items() if tokens) or "-"


def _clip(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def format_report(figures: dict[str, Any], settings: Any) -> str:
    """The demo's text report: per-request TTFT, the answers, hit rates per tier, savings, the prefix benchmark."""
    timings, stats, prefix = figures["timings"], figures["stats"], figures["prefix"]
    lines = [f"model: {figures['model']}; blocks of {settings.block_tokens} tokens; host RAM "
             f"{figures['host_bytes'] / 2**20:.0f} MiB (sized to the KV) over LMDB in {settings.disk_bytes}", "",
             f"1. mixed workload: TTFT per request (ms; without kvstore: median of {settings.bare_repeats} runs "
             f"taken around the kvstore run)",
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
              f"token hit rate: {loaded / prompt_tokens:.1%} of prompt tokens loaded instead of prefilled", ""]
    same = sum(t.identical for t in timings)
    lines.append(f"answers (greedy, {settings.dtype}): {same} of {len(timings)} identical with and without kvstore"
                 + ("" if settings.dtype == "float32" else
                    f" ({settings.dtype} rounds a token computed alone differently from the same token computed "
                    f"inside the whole prompt, with or without kvstore: fp32 is what makes them equal)"))
    for t in timings:
        lines.append(f"  {t.request.name:<20}{'same' if t.identical else 'DIFFERENT':>10}  {_clip(t.answer)}")
    lines.append("")
    for name, tier in stats["tiers"].items():
        reads = tier["hits"] + tier["misses"]
        rate = f"{tier['hits'] / reads:.1%}" if reads else "-"
        lines.append(f"  {name:<6} block hit rate {rate:>6} ({tier['hits']} hits, {tier['misses']} misses), "
                     f"{tier['blocks']} blocks held")
    rate = prompt_tokens / without  # this run's bare prefill rate, tokens per second
    lines += [f"prefill tokens saved: {loaded}; at this run's bare prefill rate of {rate:.0f} tokens/s "
              f"({prompt_tokens} tokens in {without:.2f} s) that is {loaded / rate:.2f} s of compute; "
              f"measured TTFT saved: {without - with_store:.2f} s, for {stats['store']['load_seconds']:.3f} s "
              f"of loading", ""]

    full = prefix.ttft[FULL]
    lines += [f"2. a {settings.prefix_tokens}-token shared prefix + a fresh question (median of {settings.repeats} "
              f"rounds after a warm-up; each round runs every case once, in turn)",
              f"{'scenario':<26}{'TTFT ms':>10}{'vs full prefill':>17}{'load ms':>10}{'loaded':>8}"]
    for name, ttft in prefix.ttft.items():
        load = _ms(prefix.load[name]) if name in prefix.load else f"{'-':>9}"
        lines.append(f"{name:<26}{_ms(ttft)} {full / ttft:>15.1f}x {load}{prefix.loaded_tokens.get(name, 0):>8}")
    if HOST_HIT in prefix.load and PREFETCHED in prefix.load and DISK_HIT in prefix.load:
        hidden = prefix.load[PREFETCHED] / prefix.load[HOST_HIT]
        lines.append(f"prefetch hiding: engine load time of a prefetched disk hit = {hidden:.2f}x that of a host "
                     f"hit, {prefix.load[PREFETCHED] / prefix.load[DISK_HIT]:.2f}x that of a plain disk hit "
                     f"(queue wait {settings.queue_wait_seconds:.2f} s)")
        if prefix.ttft[PREFETCHED] > prefix.ttft[DISK_HIT]:
            lines.append("  (its TTFT is above the plain disk hit's: on two cores, the prefetch's copies still "
                         "running when the request starts compete with its load and its prefill; with the prefix "
                         "already up, the engine's load is a host hit's)")
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
