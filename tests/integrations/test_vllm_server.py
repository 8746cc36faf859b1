"""The vLLM connector sharing KV through a real ``kvstore serve`` cache server, across real processes.

Two engines, A and B, each made of two processes as with vLLM 0.33's
multiproc executor: a scheduler process (a real ``Scheduler`` whose
``KVStoreConnector`` runs in the SCHEDULER role and opens no store: it asks
the worker's over its lookup socket) and a worker process forked from it after the
imports, as vLLM forks its workers (a ``KVStoreConnector`` in the WORKER
role over random bf16 CPU caches in vLLM 0.33's standardized layout). The
connector metadata a scheduler builds reaches its worker pickled, as vLLM
ships it. A and B run with different ``PYTHONHASHSEED``. The connectors are
configured through ``kv_connector_extra_config`` alone (``KVSTORE_*``
variables removed): host RAM plus ``remote_url`` / ``remote_token``, no
disk or files tier, so the cache server is all the engines share.

* A schedules a prompt and A's worker saves its KV to the server; B's
  scheduler (which opens no store: it asks B's worker over the worker's
  lookup socket, from another process) is served the prompt's blocks by ``get_num_new_matched_tokens``
  and B's worker loads them byte-exact into other block ids; the bytes are
  compared here, from ``torch.save`` dumps of both workers' caches.
* The server SIGKILLed before A's save or between the save and B's load: B's
  scheduler reports 0 tokens, or (killed after B scheduled the load) B's
  worker reports the blocks through ``get_block_ids_with_load_errors`` and
  vLLM recomputes them; never wrong data, never an exception into vLLM.

The two engine processes import vLLM once (about 10 s each, side by side)
and serve every test, each test with its own server and fresh connectors;
they are driven by JSON commands, one a line, on pipes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed: build its environment with scripts/engine-venvs.sh vllm",
                allow_module_level=True)

from server.conftest import TOKEN, ServerProcess  # noqa: E402  (tests/ is on sys.path, as for `conftest`)

pytestmark = pytest.mark.slow

PAGE = 16
BLOCK_TOKENS = 32
LAYERS = 2
NUM_BLOCKS = 64
STARTUP_SECONDS = 180.0
CALL_SECONDS = 60.0

# One engine: imports vLLM, forks its worker, then each process answers one JSON command a line (the
# scheduler on stdin/stdout, the worker on the pipes WORKER_IN/WORKER_OUT) until "exit".
AGENT = r'''
import ctypes, json, os, pickle, signal, sys, traceback
MODEL, WORKER_IN, WORKER_OUT, ENGINE_ID = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
replies = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # vLLM's logs go to stderr: stdout carries the replies alone


def reply(**kw):
    replies.write(json.dumps(kw) + "\n")


try:
    import torch
    from vllm import SamplingParams
    from vllm.config import (CacheConfig, CUDAGraphMode, DeviceConfig, KVTransferConfig, ModelConfig,
                             SchedulerConfig, VllmConfig)
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.forward_context import ForwardContext
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager
    import kvstore.integrations.vllm  # noqa: F401
except ImportError as exc:
    reply(import_error=f"{type(exc).__name__}: {exc}")
    os.write(WORKER_OUT, json.dumps({"import_error": str(exc)}).encode() + b"\n")
    sys.exit(0)

# The worker process: forked from the scheduler's before either touches a connector, torch's thread pools or
# a socket (as vLLM's multiproc executor forks its workers); it dies with it and is driven by its own pipes.
child = os.fork()
if child == 0:
    role = "worker"
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    replies.close()
    commands, replies = os.fdopen(WORKER_IN, "r"), os.fdopen(WORKER_OUT, "w", buffering=1)
else:
    role = "scheduler"
    os.close(WORKER_IN)
    os.close(WORKER_OUT)
    commands = sys.stdin

PAGE, BLOCK_TOKENS, LAYERS, KV_HEADS, HEAD_DIM, NUM_BLOCKS = 16, 32, 2, 2, 16, 64
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def vllm_config(extra):
    cache = CacheConfig(block_size=PAGE, enable_prefix_caching=True)
    cache.kv_cache_layout = "LBNHC"
    config = VllmConfig(
        model_config=ModelConfig(model=MODEL, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=2048),
        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=2048,
                                         is_encoder_decoder=False),
        cache_config=cache, device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(kv_connector="KVStoreConnector",
                                            kv_connector_module_path="kvstore.integrations.vllm",
                                            kv_role="kv_both", kv_connector_extra_config=extra,
                                            kv_load_failure_policy="recompute", engine_id=ENGINE_ID))
    # vLLM hands one pickled config to both processes; here each builds its own, with the engine's id
    config.cache_config.num_gpu_blocks = NUM_BLOCKS
    return config


def kv_cache_config():
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.bfloat16)
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(list(NAMES), spec)])


def make_request(req_id, tokens):
    init_none_hash(sha256)
    params = SamplingParams(max_tokens=1)
    params.update_from_generation_config({}, 999)
    return Request(request_id=req_id, prompt_token_ids=tokens, sampling_params=params, pooling_params=None,
                   block_hasher=get_request_block_hasher(PAGE, sha256))


state = {}


def op_open(url, token, seed=0):
    extra = {"block_tokens": BLOCK_TOKENS, "host_bytes": "4MiB", "remote_url": url, "remote_token": token}
    config = vllm_config(extra)
    if role == "scheduler":
        state["scheduler"] = Scheduler(vllm_config=config, kv_cache_config=kv_cache_config(), log_stats=True,
                                       structured_output_manager=StructuredOutputManager(config), block_size=PAGE)
        state["requests"] = {}
        return {"store_tiers": None}
    connector = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, kv_cache_config())
    # vLLM 0.33's standardized layout: one [layers, blocks, page, heads, K|V] buffer, per layer [B, H, page, 2D]
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(LAYERS, NUM_BLOCKS, PAGE, KV_HEADS, 2 * HEAD_DIM, generator=gen).to(torch.bfloat16)
    connector.register_kv_caches({name: raw[i].permute(0, 2, 1, 3) for i, name in enumerate(NAMES)})
    state.update(worker=connector, raw=raw)
    return {"store_tiers": [t.name for t in connector.store.tiers]}


def op_schedule(requests, meta, lookup=()):
    """add_request each, then one schedule(); the metadata is pickled to ``meta`` for the worker."""
    scheduler = state["scheduler"]
    matched = {}
    for r in requests:
        request = make_request(r["id"], r["tokens"])
        if r["id"] in lookup:  # what vLLM's scheduler asks the connector (it asks again in schedule())
            matched[r["id"]] = list(scheduler.connector.get_num_new_matched_tokens(request, 0))
        state["requests"][r["id"]] = request
        scheduler.add_request(request)
    out = scheduler.schedule()
    state["out"] = out
    with open(meta, "wb") as f:
        pickle.dump(out.kv_connector_metadata, f)
    md = out.kv_connector_metadata
    return {"matched": matched,
            "new": {n.req_id: {"num_computed": n.num_computed_tokens, "block_ids": list(n.block_ids[0])}
                    for n in out.scheduled_new_reqs},
            "scheduled": dict(out.num_scheduled_tokens),
            "loads": [{"req_id": s.req_id, "start": s.start, "end": s.end, "block_ids": list(s.block_ids[0]),
                       "tokens": len(s.tokens), "is_async": s.is_async} for s in md.loads],
            "saves": [{"req_id": s.req_id, "block_ids": list(s.block_ids[0]),
                       "tokens": len(s.tokens)} for s in md.saves]}


def op_update(invalid=(), recving=()):
    """update_from_output for the last schedule(), with the worker's KVConnectorOutput."""
    scheduler, out = state["scheduler"], state["out"]
    req_ids = list(out.num_scheduled_tokens)
    scheduler.update_from_output(out, ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=[[7] for _ in req_ids], logprobs=None, prompt_logprobs_dict={}, pooler_output=None,
        kv_connector_output=KVConnectorOutput(finished_recving=set(recving) or None,
                                              invalid_block_ids=set(invalid))))
    return {"requests": {r: {"num_computed_tokens": q.num_computed_tokens, "status": q.status.name}
                         for r, q in state["requests"].items()}}


def op_step(meta, dump, flush=False):
    """One worker step as vLLM's model runner drives it: load layer by layer, save layer by layer."""
    worker, raw = state["worker"], state["raw"]
    before = raw.clone()
    with open(meta, "rb") as f:
        worker.bind_connector_metadata(pickle.load(f))
    # an eager step's context: loads run on layer by layer
    worker.start_load_kv(ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={},
                                        cudagraph_runtime_mode=CUDAGraphMode.NONE))
    for i, name in enumerate(NAMES):
        worker.wait_for_layer_load(name)
        worker.save_kv_layer(name, raw[i].permute(0, 2, 1, 3), None)
    worker.wait_for_save()
    errors = sorted(worker.get_block_ids_with_load_errors())
    sending, recving = worker.get_finished(set())
    worker.clear_connector_metadata()
    flushed = worker.store.flush(30) if flush else None
    torch.save({"before": before, "after": raw.clone()}, dump)
    stats = worker.get_kv_connector_stats()
    return {"errors": errors, "recving": sorted(recving or ()), "flushed": flushed,
            "stats": dict(stats.data) if stats is not None else {}}


def op_close():
    if "scheduler" in state:
        state.pop("scheduler").shutdown()
    if "worker" in state:
        state.pop("worker").shutdown()
    state.clear()
    return {}


OPS = {"open": op_open, "schedule": op_schedule, "update": op_update, "step": op_step, "close": op_close}
reply(ready=True, role=role, pid=os.getpid(), hash=hash("kvstore"))
for line in commands:
    command = json.loads(line)
    op = command.pop("op")
    if op == "exit":
        break
    try:
        reply(ok=True, **OPS[op](**command))
    except BaseException:  # an exception here is one vLLM would have received
        reply(ok=False, exception=traceback.format_exc())
if role == "scheduler":
    os.waitpid(child, 0)  # the worker leaves at its own "exit" (or at the end of its pipe)
replies.flush()
os._exit(0)  # the connectors were shut down by "close": skip the slow interpreter teardown
'''


def write_model(folder: Path) -> Path:
    """A tiny local Llama config (bf16): every engine process serves this one model."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 2048,
        "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}))
    return folder


class Channel:
    """Commands to one process of an engine and its replies (one JSON object a line)."""

    def __init__(self, name: str, engine: "EngineProcess", commands, replies):
        self.name, self.engine, self.commands, self.replies = name, engine, commands, replies
        self.hello: dict = {}

    def read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.replies], [], [], timeout)
        line = self.replies.readline() if ready else ""
        if not line:
            code = self.engine.proc.poll()
            state = f"silent for {timeout} s" if ready == [] else f"gone (engine exit status {code})"
            raise AssertionError(f"{self.name} {state}:\n{self.engine.log()}")
        return json.loads(line)

    def call(self, op: str, **args) -> dict:
        self.commands.write(json.dumps({"op": op, **args}) + "\n")
        self.commands.flush()
        answer = self.read(CALL_SECONDS)
        assert answer.get("ok"), f"{self.name}.{op} raised into vLLM:\n{answer.get('exception')}"
        return answer

    def close(self) -> None:
        try:
            self.commands.write('{"op": "exit"}\n')
            self.commands.flush()
        except OSError:
            pass


class EngineProcess:
    """One engine: a scheduler process that imports vLLM, then forks its worker process; one hash seed."""

    def __init__(self, name: str, hash_seed: int, folder: Path, model: Path):
        folder.mkdir(parents=True)
        self.log_path = folder / "log.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}  # extra_config alone
        env.update(PYTHONHASHSEED=str(hash_seed), PYTHONUNBUFFERED="1")
        worker_in, to_worker = os.pipe()
        from_worker, worker_out = os.pipe()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(AGENT), str(model), str(worker_in), str(worker_out),
                 f"test-engine-{name}-{os.getpid()}"],
                cwd=folder, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                pass_fds=(worker_in, worker_out))
        os.close(worker_in)
        os.close(worker_out)
        self.scheduler = Channel(f"{name}-scheduler", self, self.proc.stdin, self.proc.stdout)
        self.worker = Channel(f"{name}-worker", self, os.fdopen(to_worker, "w"), os.fdopen(from_worker, "r"))

    def log(self) -> str:
        return self.log_path.read_text()[-6000:]

    def close(self) -> None:
        self.worker.close()
        self.scheduler.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:  # its worker dies with it (PR_SET_PDEATHSIG)
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.worker.commands, self.worker.replies, self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """``{"A": (scheduler, worker), "B": (scheduler, worker)}``: four processes; A and B hash differently."""
    root = tmp_path_factory.mktemp("engines")
    model = write_model(root / "model")
    procs = {name: EngineProcess(name, seed, root / name, model) for name, seed in (("A", 1), ("B", 2))}
    try:
        channels = [c for p in procs.values() for c in (p.scheduler, p.worker)]
        for channel in channels:  # the engines import vLLM side by side
            channel.hello = channel.read(STARTUP_SECONDS)
            if "import_error" in channel.hello:
                pytest.skip(f"vLLM is not importable ({channel.hello['import_error']}): "
                            "build its environment with scripts/engine-venvs.sh vllm")
        assert len({c.hello["pid"] for c in channels}) == 4  # four processes
        a, b = procs["A"], procs["B"]
        assert a.scheduler.hello["hash"] == a.worker.hello["hash"] != b.scheduler.hello["hash"]
        yield {name: (p.scheduler, p.worker) for name, p in procs.items()}
    finally:
        for proc in procs.values():
            proc.close()


@pytest.fixture
def cache_server(tmp_path):
    """A real ``kvstore serve`` on a free port (cwd: tests/, not the repository root); SIGTERM at the end."""
    server = ServerProcess(tmp_path / "server", "--host-bytes", "64MiB", "--disk-bytes", "64MiB", "--disk-sync",
                           "false", token=TOKEN).start()
    try:
        yield server
    finally:
        if server.alive():
            assert server.stop() == 0, "".join(server.output)
        server.kill()
        server.proc.stdout.close()


def open_all(engines, server: ServerProcess, seeds=(1, 2)) -> None:
    for (scheduler, worker), seed in zip(engines.values(), seeds):
        scheduler.call("open", url=server.url, token=server.token)
        tiers = worker.call("open", url=server.url, token=server.token, seed=seed)["store_tiers"]
        assert tiers == ["host", "remote"], tiers  # nothing shared but the cache server


def close_all(engines) -> None:
    for scheduler, worker in engines.values():
        scheduler.call("close")
        worker.call("close")


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def token_kv(raw: torch.Tensor, block_ids: list[int], start: int, end: int) -> torch.Tensor:
    """Tokens ``[start, end)`` of a request in ``block_ids`` of ``raw`` ``[L, B, page, H, K|V]``: ``[L, n, H, K|V]``."""
    t = torch.arange(start, end)
    return raw[:, torch.tensor(block_ids, dtype=torch.long)[t // PAGE], t % PAGE]


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def save_on_a(engines, tmp_path: Path, tokens: list[int], before_save=None) -> tuple[torch.Tensor, list[int]]:
    """Engine A prefills ``tokens`` (after a filler request, so its block ids differ from B's) and saves them.

    The worker then flushes its store: the test needs the blocks on the server before B looks (vLLM itself
    does not wait for a save to reach the shared tiers). ``before_save``: called between schedule and save.
    """
    a_sched, a_worker = engines["A"]
    meta = str(tmp_path / "a-meta.pkl")
    out = a_sched.call("schedule", meta=meta, lookup=["a"],
                       requests=[{"id": "filler", "tokens": prompt(40, seed=99)}, {"id": "a", "tokens": tokens}])
    assert out["matched"]["a"] == [0, False]  # the server is empty
    ids = out["new"]["a"]["block_ids"]
    assert [s["req_id"] for s in out["saves"]] == ["filler", "a"], out["saves"]
    assert out["saves"][1] == {"req_id": "a", "block_ids": ids, "tokens": len(tokens)}
    if before_save is not None:
        before_save()
    step = a_worker.call("step", meta=meta, dump=str(tmp_path / "a.pt"), flush=True)
    assert step["errors"] == [] and step["flushed"] is True, step
    assert step["stats"]["saved_tokens"] == len(tokens) + 40
    a_sched.call("update")
    return torch.load(tmp_path / "a.pt")["after"], ids


def test_processes_share_kv_through_the_cache_server_byte_exact(engines, cache_server, tmp_path):
    open_all(engines, cache_server)
    try:
        tokens = prompt(100, seed=1)
        a_raw, a_ids = save_on_a(engines, tmp_path, tokens)

        b_sched, b_worker = engines["B"]
        meta = str(tmp_path / "b-meta.pkl")
        out = b_sched.call("schedule", meta=meta, lookup=["b"], requests=[{"id": "b", "tokens": tokens}])
        # kvstore blocks [0, 32), [32, 64), [64, 96) and the tail [96, 100); vLLM must compute one token itself
        assert out["matched"]["b"] == [96, False]
        b_ids = out["new"]["b"]["block_ids"]
        assert out["new"]["b"]["num_computed"] == 96 and out["scheduled"]["b"] == 4
        assert out["loads"] == [{"req_id": "b", "start": 0, "end": 96, "block_ids": b_ids, "tokens": 96,
                                 "is_async": False}]
        assert b_ids[:6] != a_ids[:6]

        step = b_worker.call("step", meta=meta, dump=str(tmp_path / "b.pt"))
        assert step["errors"] == [], step
        assert step["stats"]["loaded_tokens"] == 96
        dump = torch.load(tmp_path / "b.pt")
        before, after = dump["before"], dump["after"]
        assert after.dtype == torch.bfloat16 == a_raw.dtype
        expected = token_kv(a_raw, a_ids, 0, 96)
        assert not torch.equal(token_kv(before, b_ids, 0, 96), expected)  # B's blocks held other bytes
        assert as_bytes(token_kv(after, b_ids, 0, 96)) == as_bytes(expected)
        others = torch.ones(NUM_BLOCKS, dtype=torch.bool)
        others[b_ids[:6]] = False
        assert as_bytes(after[:, others]) == as_bytes(before[:, others])  # nothing else was written

        answer = b_sched.call("update")["requests"]["b"]
        assert answer == {"num_computed_tokens": 100, "status": "FINISHED_LENGTH_CAPPED"}, answer
    finally:
        close_all(engines)


@pytest.mark.crash
@pytest.mark.parametrize("kill_at", ["before_save", "before_lookup", "before_load"])
def test_cache_server_killed_between_save_and_load(engines, cache_server, tmp_path, kill_at):
    open_all(engines, cache_server)
    try:
        tokens = prompt(100, seed=2)
        started = time.monotonic()
        a_raw, a_ids = save_on_a(engines, tmp_path, tokens,
                                 before_save=cache_server.kill if kill_at == "before_save" else None)
        b_sched, b_worker = engines["B"]
        meta = str(tmp_path / "b-meta.pkl")
        if kill_at == "before_lookup":
            cache_server.kill()
        out = b_sched.call("schedule", meta=meta, lookup=["b"], requests=[{"id": "b", "tokens": tokens}])
        b_ids = out["new"]["b"]["block_ids"]
        if kill_at in ("before_save", "before_lookup"):
            assert out["matched"]["b"] == [0, False]
            assert out["new"]["b"]["num_computed"] == 0 and out["loads"] == []
        else:
            assert out["matched"]["b"] == [96, False] and len(out["loads"]) == 1
            cache_server.kill()

        step = b_worker.call("step", meta=meta, dump=str(tmp_path / "b.pt"))
        assert time.monotonic() - started < 15, "a dead server should cost a connection refusal, not timeouts"
        dump = torch.load(tmp_path / "b.pt")
        before, after = dump["before"], dump["after"]
        loaded = set(b_ids[:out["new"]["b"]["num_computed"] // PAGE])
        assert set(step["errors"]) <= loaded, step
        if kill_at == "before_load":
            assert set(step["errors"]) == loaded  # only the server had them: all are recomputed
        for block in range(NUM_BLOCKS):  # each block: reported, or the right bytes, or untouched
            if block in step["errors"]:
                continue
            if block in loaded:
                t = b_ids.index(block) * PAGE
                assert as_bytes(after[:, block]) == as_bytes(token_kv(a_raw, a_ids, t, t + PAGE)), block
            else:
                assert as_bytes(after[:, block]) == as_bytes(before[:, block]), block

        answer = b_sched.call("update", invalid=step["errors"])["requests"]["b"]
        if kill_at == "before_load":  # kv_load_failure_policy "recompute": vLLM computes the prompt again
            assert answer["num_computed_tokens"] == 0 and not answer["status"].startswith("FINISHED"), answer
        else:
            assert answer == {"num_computed_tokens": 100, "status": "FINISHED_LENGTH_CAPPED"}, answer
    finally:
        close_all(engines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
