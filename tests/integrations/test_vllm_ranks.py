"""Tensor and pipeline parallelism: TP=2 x PP=2, each rank's worker connector in its own process, the scheduler in
this one.

Each worker process joins a real ``torch.distributed`` group (gloo) through
vLLM's own ``init_distributed_environment`` and
``ensure_model_parallel_initialized``, so the connector reads its TP and PP
ranks from vLLM's parallel state as in a real deployment. A rank holds its
pipeline stage's layers and its tensor shard's KV heads; every rank has the
same settings (host RAM, ``disk_dir`` LMDB, a shared ``files_dir``), as vLLM
gives them. The test checks: every rank starts (no LMDB directory fight);
the scheduler, asking all four ranks over their lookup sockets, is served a
prefix only when every rank holds it; each rank loads back exactly its own
shard's bytes (stage 1 never gets stage 0's KV through the shared tier).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: build its environment with scripts/engine-venvs.sh vllm")

from vllm_env import PAGE, make_config, make_request, prompt, write_model  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402

pytestmark = pytest.mark.slow

TP, PP, LAYERS, HEADS = 2, 2, 4, 4  # 2 layers and 1 KV head per rank
BLOCK_TOKENS, NUM_BLOCKS = 32, 32

RANK = r'''
import json, os, sys, traceback
import torch
sys.path.insert(0, {tests!r})
rank, port, folder, engine_id = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
from vllm.config import set_current_vllm_config
from vllm.distributed.parallel_state import ensure_model_parallel_initialized, init_distributed_environment
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm_env import EAGER_STEP, make_config
from pathlib import Path
from kvstore.integrations.vllm import KVStoreConnectorMetadata, LoadSpec, SaveSpec

TP, PP, LAYERS, HEADS, PAGE, NUM_BLOCKS, HEAD_DIM = {TP}, {PP}, {LAYERS}, {HEADS}, 16, {NUM_BLOCKS}, 16
extra = json.loads(sys.argv[5])
config = make_config(Path(folder) / "model", extra)
config.kv_transfer_config.engine_id = engine_id
config.parallel_config.tensor_parallel_size, config.parallel_config.pipeline_parallel_size = TP, PP
with set_current_vllm_config(config):
    init_distributed_environment(world_size=TP * PP, rank=rank, distributed_init_method=f"tcp://127.0.0.1:{{port}}",
                                 local_rank=rank, backend="gloo")
    ensure_model_parallel_initialized(TP, PP)
    w = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, None)
tp, pp = rank % TP, rank // TP
layers = list(range(pp * LAYERS // PP, (pp + 1) * LAYERS // PP))
heads = list(range(tp * HEADS // TP, (tp + 1) * HEADS // TP))
raw = torch.zeros(len(layers), NUM_BLOCKS, PAGE, len(heads), 2 * HEAD_DIM)
caches = {{f"model.layers.{{l}}.self_attn.attn": raw[i].permute(0, 2, 1, 3) for i, l in enumerate(layers)}}
w.register_kv_caches(caches)


def kv(t, token):  # the KV of a token for this rank's global layers and heads: a function of the prefix
    out = torch.empty(len(layers), len(heads), 2 * HEAD_DIM)
    for i, l in enumerate(layers):
        for j, h in enumerate(heads):
            g = torch.Generator().manual_seed(hash((tuple(t[:token + 1]), l, h)) % (1 << 62))
            out[i, j] = torch.randn(2 * HEAD_DIM, generator=g)
    return out


def expected(t, ids, start, end):
    return torch.stack([kv(t, x) for x in range(start, end)], dim=1)  # [layers, n, heads, 2D]


def actual(ids, start, end):
    x = torch.arange(start, end)
    return raw[:, torch.tensor(ids)[x // PAGE], x % PAGE]


print(json.dumps({{"ready": rank, "tp": w.worker.place.tp_rank, "pp": w.worker.place.pp_rank,
                   "disk": w.store.config.disk_dir, "layout": w.store.layout.describe()}}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "save":
            t, ids = cmd["tokens"], cmd["ids"]
            for x in range(len(t)):
                raw[:, ids[x // PAGE], x % PAGE] = kv(t, x)
            w.bind_connector_metadata(KVStoreConnectorMetadata(saves=[SaveSpec("s", t, None, (ids,))]))
            w.wait_for_save()
            w.clear_connector_metadata()
            w.store.flush(30)
            print(json.dumps({{"ok": True}}), flush=True)
        elif cmd["op"] == "load":
            t, ids, end = cmd["tokens"], cmd["ids"], cmd["end"]
            w.bind_connector_metadata(KVStoreConnectorMetadata(loads=[LoadSpec("l", t, None, (ids,), 0, end)]))
            w.start_load_kv(EAGER_STEP)
            w.wait_for_save()
            w.clear_connector_metadata()
            exact = torch.equal(actual(ids, 0, end), expected(t, ids, 0, end))
            print(json.dumps({{"ok": True, "exact": exact, "errors": sorted(w.get_block_ids_with_load_errors())}}),
                  flush=True)
        elif cmd["op"] == "exit":
            break
    except Exception:
        print(json.dumps({{"ok": False, "error": traceback.format_exc()}}), flush=True)
w.shutdown()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rank:
    def __init__(self, rank: int, port: int, folder: Path, engine_id: str, extra: dict):
        tests = str(Path(__file__).parent)
        code = textwrap.dedent(RANK).format(tests=tests, TP=TP, PP=PP, LAYERS=LAYERS, HEADS=HEADS,
                                            NUM_BLOCKS=NUM_BLOCKS)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
        env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
        self.log = open(folder / f"rank{rank}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(rank), str(port), str(folder), engine_id,
                                      json.dumps(extra)], cwd=folder, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            raise AssertionError(f"rank exited: {Path(self.log.name).read_text()[-3000:]}")
        return json.loads(line)

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        answer = self.read()
        assert answer.get("ok"), answer.get("error")
        return answer

    def close(self) -> None:
        try:
            self.proc.stdin.write('{"op": "exit"}\n')
            self.proc.stdin.close()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.log.close()


def test_tp2_pp2_ranks_start_save_and_hit_each_their_own_shard(tmp_path):
    write_model(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text((tmp_path / "model" / "config.json").read_text().replace(
        '"num_hidden_layers": 2', f'"num_hidden_layers": {LAYERS}').replace(
        '"num_key_value_heads": 2', f'"num_key_value_heads": {HEADS}'))
    extra = {"block_tokens": BLOCK_TOKENS, "host_bytes": "2MiB", "disk_dir": str(tmp_path / "lmdb"),
             "disk_bytes": "16MiB", "files_dir": str(tmp_path / "files")}
    engine_id = f"ranks-{os.getpid()}"
    port = free_port()
    ranks = [Rank(r, port, tmp_path, engine_id, extra) for r in range(TP * PP)]
    try:
        hello = [r.read() for r in ranks]
        assert sorted((h["pp"], h["tp"]) for h in hello) == [(p, t) for p in range(PP) for t in range(TP)]
        assert len({h["disk"] for h in hello}) == TP * PP  # each rank its own LMDB directory
        assert len({h["layout"] for h in hello}) == TP * PP  # and its own key space (TP shard, PP stage)
        config = make_config(tmp_path / "model", extra)
        config.kv_transfer_config.engine_id = engine_id
        config.parallel_config.tensor_parallel_size, config.parallel_config.pipeline_parallel_size = TP, PP
        scheduler = KVConnectorFactory.create_connector(config, KVConnectorRole.SCHEDULER, None)
        try:
            tokens = prompt(80, seed=1)
            assert scheduler.get_num_new_matched_tokens(make_request("a", tokens), 0) == (0, False)
            ids = list(range(1, 6))
            for r in ranks[:TP]:  # stage 0 saves; stage 1 has not yet: no rank may be served
                r.call(op="save", tokens=tokens, ids=ids)
            assert scheduler.get_num_new_matched_tokens(make_request("b", tokens), 0) == (0, False)
            for r in ranks[TP:]:
                r.call(op="save", tokens=tokens, ids=ids)
            n, _ = scheduler.get_num_new_matched_tokens(make_request("c", tokens), 0)
            assert n == (len(tokens) - 1) // PAGE * PAGE == 64
            for r in ranks:  # each rank loads its own shard, byte-exact, into other blocks
                answer = r.call(op="load", tokens=tokens, ids=list(range(10, 15)), end=64)
                assert answer["exact"] and answer["errors"] == [], answer
        finally:
            scheduler.shutdown()
    finally:
        for r in ranks:
            r.close()
