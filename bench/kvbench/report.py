"""Turns a full run's results JSON (``python bench/run_bench.py``) into ``report.md`` and PNG charts beside it.

The runner measures; this module only checks and presents. Every ratio in the
report names what it divides by (a ceiling measured in the same run, or a peer
library). Units: the JSON holds seconds and bytes; tables show TTFT in ms,
chunks in MiB (2**20 bytes) and throughput in GB/s (10**9 bytes per second).

``load_results`` validates before anything is drawn, so a runner bug surfaces
as one ValueError naming the key path (``workloads[1].requests[0].ttft_warm``),
what was expected and what came, not as a KeyError halfway through a chart.
Charts use ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot): no
display, no global figure registry, no backend switch for the caller.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

Check = Callable[[Any, str], None]
_MISSING = object()  # what a check sees for an absent key: fails every check, reported as "nothing"


def _got(value: Any) -> str:
    """What came, short enough for one error line."""
    if value is _MISSING:
        return "nothing (key missing)"
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else f"a list of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: str, expected: str, value: Any) -> NoReturn:
    raise ValueError(f"{path or 'results'}: expected {expected}, got {_got(value)}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _scalar(expected: str, ok: Callable[[Any], bool]) -> Check:
    def check(value: Any, path: str) -> None:
        if value is _MISSING or not ok(value):
            _fail(path, expected, value)
    return check


def _number(low: float = 0, *, above: bool = False, high: float | None = None, nullable: bool = False,
            integer: bool = False) -> Check:
    """A finite number (an int if ``integer``; bools refused), ``> low`` if ``above`` else ``>= low``, optionally
    ``<= high``, optionally null."""
    def ok(v: Any) -> bool:
        if v is None:
            return nullable
        kind = type(v) is int if integer else type(v) in (int, float) and math.isfinite(v)
        return kind and (v > low if above else v >= low) and (high is None or v <= high)
    words = f"{'an integer' if integer else 'a number'} {'>' if above else '>='} {low:g}"
    return _scalar(words + (f" and <= {high:g}" if high is not None else "") + (" or null" if nullable else ""), ok)


def _choice(*options: str) -> Check:
    return _scalar("one of " + ", ".join(map(repr, options)), lambda v: isinstance(v, str) and v in options)


def _record(fields: dict[str, Check], *, optional: Iterable[str] = (), then: Check | None = None,
            values: Check | None = None) -> Check:
    """An object with ``fields`` (extra keys allowed, each checked by ``values`` if given); an optional field may
    be absent or null; ``then`` checks the whole object once its fields passed."""
    optional = frozenset(optional)

    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            _fail(path, "an object", value)
        for key, field in fields.items():
            if not (key in optional and value.get(key) is None):
                field(value.get(key, _MISSING), _join(path, key))
        for key, item in value.items() if values else ():
            values(item, _join(path, key))
        if then is not None:
            then(value, path)
    return check


def _records(fields: dict[str, Check], *, non_empty: bool = False, then: Check | None = None) -> Check:
    item = _record(fields, then=then)

    def check(value: Any, path: str) -> None:
        if not isinstance(value, list) or (non_empty and not value):
            _fail(path, "a non-empty list" if non_empty else "a list", value)
        for index, entry in enumerate(value):
            item(entry, f"{path}[{index}]")
    return check


def _loaded_within_prompt(request: dict, path: str) -> None:
    """A request cannot load more tokens than its prompt has (hit rates would pass 100%)."""
    for key in ("loaded_first", "loaded_warm"):
        if request[key] > request["prompt_tokens"]:
            _fail(_join(path, key), f"an integer <= prompt_tokens ({request['prompt_tokens']})", request[key])


# How each comparison unit prints; the keys are also the units the schema accepts.
UNITS: dict[str, Callable[[float], str]] = {
    "seconds": lambda v: f"{v * 1e3:.3g} ms",
    "GB/s": lambda v: f"{v:.3g} GB/s",
    "ratio_to_ceiling": lambda v: f"{v:.2f} of ceiling",
}
NAME = _scalar("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
TEXT = _scalar("a string", lambda v: isinstance(v, str))
POSITIVE, NON_NEGATIVE = _number(above=True), _number()
COUNT, COUNT0 = _number(1, integer=True), _number(0, integer=True)
SCHEMA = _record({
    "version": _scalar("1", lambda v: type(v) is int and v == 1),
    "created": NAME,
    "machine": _record({"cpu": NAME, "cores": COUNT, "memory_bytes": COUNT, "disk": NAME, "os": NAME,
                        "python": NAME, "libraries": _record({}, values=NAME)}),
    "settings": _record({"quick": _scalar("true or false", lambda v: isinstance(v, bool)), "rounds": COUNT,
                         "model": NAME, "block_tokens": COUNT}),
    "tiers": _records({"tier": NAME, "op": NAME, "chunk_bytes": COUNT, "seconds": POSITIVE,
                       "ceiling": NAME, "ceiling_seconds": POSITIVE,
                       "target": _number(above=True, nullable=True)}),
    "comparisons": _records({"path": NAME, "op": NAME, "chunk_bytes": _number(1, integer=True, nullable=True),
                             "unit": _choice(*UNITS), "kvstore": POSITIVE, "peer": NAME,
                             "peer_value": _number(above=True, nullable=True), "better": _choice("higher", "lower"),
                             "target": NAME, "target_factor": POSITIVE, "note": TEXT}),
    "workloads": _records({"workload": NAME, "config": NAME, "requests": _records(
        {"name": NAME, "prompt_tokens": COUNT, "arrival_seconds": NON_NEGATIVE, "ttft_cold": NON_NEGATIVE,
         "ttft_first": NON_NEGATIVE, "ttft_warm": NON_NEGATIVE, "loaded_first": COUNT0,
         "loaded_warm": COUNT0}, non_empty=True, then=_loaded_within_prompt)}, non_empty=True),
    "fidelity": _records({"method": NAME, "bits": POSITIVE, "compression_ratio": POSITIVE,
                          "kl_mean": NON_NEGATIVE, "top1_agreement": _number(0, high=1),
                          "encode_GBps": _number(nullable=True), "decode_GBps": _number(nullable=True)}),
    "cost": _record({"gpu_price_per_hour": NON_NEGATIVE, "prefill_tokens_per_second": POSITIVE, "gpu": NAME}),
    "skipped": _record({}, values=TEXT),
}, optional=("tiers", "comparisons", "fidelity", "skipped"))

# Optional sections and the ``skipped`` keys that may hold the reason they are absent.
OPTIONAL_SECTIONS: dict[str, tuple[str, ...]] = {
    "tiers": ("tiers",), "comparisons": ("comparisons", "peers"), "fidelity": ("fidelity", "compression")}
# The three TTFT passes of every workload, with what each one means (printed in the report).
PASSES: dict[str, str] = {"cold": "full prefill, no cache",
                          "first": "through kvstore, store empty when the workload starts (online traffic)",
                          "warm": "second pass over the same requests, store warm"}
# Target met? (a miss in bold so it stands out; None: a row shown for context, with no target)
VERDICTS: dict[bool | None, str] = {True: "met", False: "**MISSED**", None: "no target"}
VERDICT_COLORS: dict[bool | None, str] = {True: "#4c72b0", False: "#c44e52", None: "#999999"}
PASS_COLORS = {"cold": "#c44e52", "first": "#dd8452", "warm": "#4c72b0"}
UNSAFE_IN_FILE_NAMES = re.compile(r"[^\w.-]+")  # a workload name becomes part of its chart's file name


def validate(results: Any) -> dict:
    """Raise ValueError (key path, expected, got) unless ``results`` follows the version-1 schema."""
    SCHEMA(results, "")
    return results


def load_results(path: str | Path) -> dict:
    """Read and validate a results JSON (malformed JSON raises json.JSONDecodeError, a ValueError)."""
    return validate(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class Run:
    """One workload under one config: token sums over its requests and per-request TTFT (seconds) per pass."""

    workload: str
    config: str
    requests: int
    prompt_tokens: int
    loaded: dict[str, int]  # "first" / "warm" -> tokens loaded instead of prefilled
    ttft: dict[str, list[float]]  # pass name -> seconds, one per request

    @classmethod
    def from_json(cls, entry: dict) -> Run:
        requests = entry["requests"]
        return cls(entry["workload"], entry["config"], len(requests), sum(r["prompt_tokens"] for r in requests),
                   {p: sum(r[f"loaded_{p}"] for r in requests) for p in ("first", "warm")},
                   {p: [r[f"ttft_{p}"] for r in requests] for p in PASSES})

    def hit_rate(self, pass_name: str) -> float:
        return self.loaded[pass_name] / self.prompt_tokens

    def percentile(self, pass_name: str, q: float) -> float:
        """TTFT percentile in seconds, linear interpolation between requests (numpy's default)."""
        return float(np.percentile(self.ttft[pass_name], q))

    def measured_saving(self) -> float:
        """Share of the cold TTFT the first pass saved, loading and lookups included (negative: it cost)."""
        return 1 - sum(self.ttft["first"]) / sum(self.ttft["cold"]) if sum(self.ttft["cold"]) else 0.0


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [line(headers), line(["---"] * len(headers)), *map(line, rows)]


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:g}"


def _not_measured(results: dict, section: str) -> str:
    skipped = results.get("skipped") or {}
    reason = next((skipped[k] for k in OPTIONAL_SECTIONS[section] if k in skipped), None)
    return f"not measured: {reason or 'no results in this run and no reason given'}"


def _save(figure: Figure, path: Path) -> str:
    figure.savefig(path, dpi=110)
    return path.name


def _header(results: dict, out_dir: Path) -> list[str]:
    machine, settings = results["machine"], results["settings"]
    lines = ["# kvstore benchmark report", "", f"created {results['created']}", ""]
    if settings["quick"]:
        lines += ["**Quick run**: fewer rounds per figure, so every figure below is noisier than a full run.", ""]
    rows = [("CPU", machine["cpu"]), ("cores", machine["cores"]),
            ("memory", f"{machine['memory_bytes'] / 2**30:.1f} GiB"), ("disk", machine["disk"]),
            ("OS", machine["os"]), ("Python", machine["python"]),
            *((f"library {name}", version) for name, version in machine["libraries"].items())]
    lines += ["## Machine", "", *_table(("machine", "value"), rows), "", "## Settings", ""]
    return lines + _table(("setting", "value"), ((k, json.dumps(v, default=str)) for k, v in settings.items()))


def _tier_ratio(row: dict) -> float:
    """Tier throughput over ceiling throughput on the same bytes: ceiling time / tier time."""
    return row["ceiling_seconds"] / row["seconds"]


def _tier_met(row: dict) -> bool | None:
    return None if row["target"] is None else _tier_ratio(row) >= row["target"]


def _tiers_chart(rows: list[dict]) -> Figure:
    figure = Figure(figsize=(12, 1.5 + 0.45 * len(rows)), layout="constrained")
    ax = figure.subplots()
    ys = np.arange(len(rows))
    ratios = [_tier_ratio(r) for r in rows]
    ax.barh(ys, ratios, color=[VERDICT_COLORS[_tier_met(r)] for r in rows])
    targets = [(y, r["target"]) for y, r in zip(ys, rows) if r["target"] is not None]
    ax.vlines([t for _, t in targets], [y - 0.45 for y, _ in targets], [y + 0.45 for y, _ in targets],
              colors="black", linestyles="--", label="target")
    ax.axvline(1.0, color="grey", linewidth=0.8, label="ceiling (1.0)")
    ax.set_yticks(ys, [f"{r['tier']} {r['op']} {_mib(r['chunk_bytes'])} MiB (vs {r['ceiling']})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("throughput / same-run ceiling")
    ax.set_title("blue: target met, red: missed, grey: no target", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    return figure


def _tiers_section(results: dict, out_dir: Path) -> list[str]:
    lines, rows = ["## Tier throughput against same-run ceilings", ""], results.get("tiers")
    if not rows:
        return lines + [_not_measured(results, "tiers")]
    lines += ["Median time to move one chunk. ratio = ceiling time / tier time: the tier's GB/s over the GB/s "
              "of the named ceiling moving the same bytes in the same run (1.00 = as fast as the ceiling).", ""]
    table = [(r["tier"], r["op"], _mib(r["chunk_bytes"]), f"{r['chunk_bytes'] / r['seconds'] / 1e9:.2f}",
              r["ceiling"], f"{r['chunk_bytes'] / r['ceiling_seconds'] / 1e9:.2f}", f"{_tier_ratio(r):.2f}",
              "-" if r["target"] is None else f">= {r['target']:.2f}", VERDICTS[_tier_met(r)]) for r in rows]
    lines += _table(("tier", "op", "chunk MiB", "GB/s", "ceiling", "ceiling GB/s", "ratio", "target", "verdict"),
                    table)
    return lines + ["", f"![ratio to ceiling per tier]({_save(_tiers_chart(rows), out_dir / 'tiers.png')})"]


def _peer_factor(row: dict) -> float | None:
    """How far kvstore is ahead of the peer (> 1: ahead): kvstore/peer if higher is better, else peer/kvstore."""
    if row["peer_value"] is None:
        return None
    pair = (row["kvstore"], row["peer_value"]) if row["better"] == "higher" else (row["peer_value"], row["kvstore"])
    return pair[0] / pair[1]


def _peers_section(results: dict, out_dir: Path) -> list[str]:
    lines, rows = ["## Side by side with peers", ""], results.get("comparisons")
    if not rows:
        return lines + [_not_measured(results, "comparisons")]
    lines += ["factor = kvstore / peer where higher is better, peer / kvstore where lower is better, so > 1.00x "
              "always means kvstore is ahead; the target is met when factor >= target factor.", ""]
    table = []
    for r in rows:
        factor, show = _peer_factor(r), UNITS[r["unit"]]
        peer_value = "-" if factor is None else show(r["peer_value"])
        verdict = "peer not measured" if factor is None else VERDICTS[factor >= r["target_factor"]]
        table.append((r["path"], r["op"], _mib(r["chunk_bytes"]), show(r["kvstore"]), r["peer"], peer_value,
                      "-" if factor is None else f"{factor:.2f}x", f"{r['target']} (factor {r['target_factor']:g})",
                      verdict, r["note"] or "-"))
    return lines + _table(("path", "op", "chunk MiB", "kvstore", "peer", "peer value", "factor", "target",
                           "verdict", "note"), table)


def _ttft_chart(workload: str, runs: list[Run]) -> Figure:
    figure = Figure(figsize=(3 + 2.2 * len(runs), 4.5), layout="constrained")
    ax = figure.subplots()
    width, handles = 0.8 / len(PASSES), []
    for k, pass_name in enumerate(PASSES):
        positions = [i + (k - (len(PASSES) - 1) / 2) * width for i in range(len(runs))]
        data = [[s * 1e3 for s in run.ttft[pass_name]] for run in runs]
        boxes = ax.boxplot(data, positions=positions, widths=width * 0.8, patch_artist=True, showfliers=False,
                           manage_ticks=False, medianprops={"color": "black"})
        for patch in boxes["boxes"]:
            patch.set(facecolor=PASS_COLORS[pass_name], alpha=0.7)
        for position, values in zip(positions, data):
            ax.scatter([position] * len(values), values, s=9, color="black", zorder=3)
        handles.append(boxes["boxes"][0])
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))  # plain ms, not 6x10^2
    ax.set_xticks(range(len(runs)), [run.config for run in runs])
    ax.set_ylabel("time to first token (ms, log)")
    ax.set_title(f"{workload}: TTFT per request (dots), box = quartiles")
    figure.legend(handles, [f"{name}: {meaning}" for name, meaning in PASSES.items()], fontsize=8,
                  loc="outside lower center")
    return figure


def _hit_chart(runs: list[Run]) -> Figure:
    workloads, configs = _unique(r.workload for r in runs), _unique(r.config for r in runs)
    by_key = {(r.workload, r.config): r for r in runs}
    figure = Figure(figsize=(13, 4.5), layout="constrained")
    panels = zip(figure.subplots(1, 2), ("token hit rate (%)", "prefill tokens saved"),
                 (lambda run, p: 100 * run.hit_rate(p), lambda run, p: run.loaded[p]))
    width, xs = 0.8 / (2 * len(configs)), np.arange(len(workloads))
    for ax, label, value in panels:
        for c, config in enumerate(configs):
            for k, pass_name in enumerate(("first", "warm")):
                offset = (2 * c + k - (2 * len(configs) - 1) / 2) * width
                heights = [value(by_key[w, config], pass_name) if (w, config) in by_key else np.nan for w in workloads]
                ax.bar(xs + offset, heights, width, color=f"C{c}", alpha=0.5 if k else 1.0, hatch="//" if k else None,
                       label=f"{config}, {pass_name} pass")
        ax.set_xticks(xs, workloads)
        ax.set_ylabel(label)
    figure.axes[0].legend(fontsize=7)
    return figure


def _workloads_section(results: dict, out_dir: Path) -> list[str]:
    runs = [Run.from_json(w) for w in results["workloads"]]
    lines = ["## Workloads", "", "Passes: " + "; ".join(f"**{k}** = {v}" for k, v in PASSES.items()) + ". Hit rate "
             "= tokens loaded / prompt tokens; prefill tokens saved = tokens loaded instead of prefilled.", ""]
    lines += _table(("workload", "config", "requests", "prompt tokens", "hit rate first", "hit rate warm",
                     "tokens saved first", "tokens saved warm"),
                    ((r.workload, r.config, r.requests, r.prompt_tokens, f"{r.hit_rate('first'):.1%}",
                      f"{r.hit_rate('warm'):.1%}", r.loaded["first"], r.loaded["warm"]) for r in runs))
    lines += ["", "TTFT in ms; p50/p90 interpolate linearly between requests (with few requests p90 is near the "
              "slowest). speed-up = p50 cold / p50 of the pass: the baseline is full prefill on this machine.", ""]
    lines += _table(("workload", "config", *(f"{p} p{q}" for p in PASSES for q in (50, 90)), "speed-up first vs cold",
                     "speed-up warm vs cold"),
                    ((r.workload, r.config, *(f"{r.percentile(p, q) * 1e3:.1f}" for p in PASSES for q in (50, 90)),
                      *(f"{r.percentile('cold', 50) / r.percentile(p, 50):.2f}x" if r.percentile(p, 50) else "-"
                        for p in ("first", "warm"))) for r in runs))
    lines.append("")
    for workload in _unique(r.workload for r in runs):
        chart = _save(_ttft_chart(workload, [r for r in runs if r.workload == workload]),
                      out_dir / f"ttft_{UNSAFE_IN_FILE_NAMES.sub('_', workload)}.png")
        lines += [f"![TTFT {workload}]({chart})", ""]
    return lines + [f"![hit rate and tokens saved]({_save(_hit_chart(runs), out_dir / 'hit_rate.png')})"]


def _compression_chart(rows: list[dict]) -> Figure:
    figure = Figure(figsize=(8, 5), layout="constrained")
    ax = figure.subplots()
    errors = [r["kl_mean"] for r in rows]
    floor = min((e for e in errors if e > 0), default=1.0) / 10  # where an exact (0) error sits on the log axis
    for r, error in zip(rows, errors):
        point = (r["compression_ratio"], max(error, floor))
        ax.scatter(*point, s=40)
        ax.annotate(r["method"] + (" (exact)" if error == 0 else ""), point, xytext=(5, 4),
                    textcoords="offset points", fontsize=8)
    ax.set_yscale("log")
    ax.margins(x=0.2)
    ax.set_title("an exact (0) error is drawn at a tenth of the smallest non-zero one", fontsize=9)
    ax.set_xlabel("compression ratio (original bytes / stored bytes)")
    ax.set_ylabel("mean KL of the next token vs uncompressed (log)")
    return figure


def _compression_section(results: dict, out_dir: Path) -> list[str]:
    lines, rows = ["## Compression and fidelity", ""], results.get("fidelity")
    if not rows:
        return lines + [_not_measured(results, "fidelity")]
    lines += ["Mean KL divergence of the next-token distribution and top-1 agreement against the same model "
              "with an uncompressed cache; bits per 16-bit value stored; GB/s counts uncompressed bytes.", ""]
    speed = (lambda v: "-" if v is None else f"{v:.2f}")
    lines += _table(("method", "bits", "compression", "mean KL of the next token", "top-1 agreement", "encode GB/s",
                     "decode GB/s"),
                    ((r["method"], f"{r['bits']:.2f}", f"{r['compression_ratio']:.2f}x",
                      f"{r['kl_mean']:.3g}", f"{r['top1_agreement']:.1%}", speed(r["encode_GBps"]),
                      speed(r["decode_GBps"])) for r in rows))
    return lines + ["", f"![compression vs fidelity]({_save(_compression_chart(rows), out_dir / 'compression.png')})"]


def _dollars(amount: float) -> str:
    return f"{'-' if amount < 0 else ''}${abs(amount):,.2f}"


def _gpu_hours_per_million(tokens_per_request: float, tokens_per_second: float) -> float:
    """GPU-hours of prefill that a million requests each skipping ``tokens_per_request`` tokens avoid."""
    return tokens_per_request * 1e6 / tokens_per_second / 3600


def _cost_section(results: dict, out_dir: Path) -> list[str]:
    cost, runs = results["cost"], [Run.from_json(w) for w in results["workloads"]]
    tps, price = cost["prefill_tokens_per_second"], cost["gpu_price_per_hour"]
    table = []
    for workload in _unique(r.workload for r in runs):
        best = max((r for r in runs if r.workload == workload), key=lambda r: r.loaded["first"])
        counted = best.loaded["first"] / best.requests
        measured = best.measured_saving() * best.prompt_tokens / best.requests
        hours = [_gpu_hours_per_million(t, tps) for t in (counted, measured)]
        table.append((workload, best.config, f"{best.prompt_tokens / best.requests:.1f}", f"{counted:.1f}",
                      f"{hours[0]:.2f}", _dollars(hours[0] * price), f"{best.measured_saving():.1%}",
                      f"{measured:.1f}", f"{hours[1]:.2f}", _dollars(hours[1] * price)))
    lines = ["## Cost view", "",
             f"Assumptions: {cost['gpu']} at ${price:,.2f} per GPU-hour, prefilling {tps:,.0f} tokens/s. Savings are "
             "the **first pass** (store empty when the workload starts: what online traffic sees), per request, "
             "for the config that saved the most tokens in that pass (named in the table; a tie goes to the one "
             "listed first).",
             "",
             "- **counted**: tokens loaded instead of prefilled, priced as prefill at the rate above; loading is "
             "taken as free, so this is an upper bound. GPU-hours per million requests = tokens saved per request "
             "x 10^6 / tokens per second / 3600.",
             "- **measured** (conservative): the share of cold TTFT the first pass actually saved in this run, "
             "1 - sum(ttft_first) / sum(ttft_cold), so load time, lookups and misses are subtracted, applied to "
             "the prompt tokens per request. It is measured on this machine with "
             f"{results['settings']['model']}; on a faster GPU prefill shrinks while load time does not, so the "
             "share would be smaller there. Negative means kvstore cost time. Quote the lower of the two.", ""]
    return lines + _table(("workload", "config", "prompt tokens / req", "tokens saved / req (counted)",
                           "GPU-h / 1M req (counted)", "cost / 1M req (counted)", "TTFT saved (measured)",
                           "token-equivalent / req (measured)", "GPU-h / 1M req (measured)",
                           "cost / 1M req (measured)"), table)


def _skipped_section(results: dict, out_dir: Path) -> list[str]:
    skipped = results.get("skipped") or {}
    entries = [f"- **{key}**: {reason}" for key, reason in skipped.items()]
    entries += [f"- **{section}**: no results in this run and no reason given" for section, keys
                in OPTIONAL_SECTIONS.items() if not results.get(section) and not any(k in skipped for k in keys)]
    entries += [f"- **{r['path']}** ({r['op']}, {r['peer']}): peer not measured; {r['note'] or 'no reason given'}"
                for r in results.get("comparisons") or () if r["peer_value"] is None and r["path"] not in skipped]
    return ["## Not measured", "", *(entries or ["Everything in the schema was measured."])]


# The report, in order: each section returns its markdown lines and writes its charts into out_dir.
SECTIONS: tuple[Callable[[dict, Path], list[str]], ...] = (
    _header, _tiers_section, _peers_section, _workloads_section, _compression_section, _cost_section,
    _skipped_section)


def render(results: dict, out_dir: Path) -> Path:
    """Validate ``results``, write ``out_dir/report.md`` and its PNG charts; return the report's path."""
    validate(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for section in SECTIONS for line in (*section(results, out_dir), "")]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
