"""Engine processes share prefixes through one cache server.

Each engine is a separate Python process with its own hash seed (``PYTHONHASHSEED``) and its own
fresh KVStore whose lowest tier is the server: what one process puts, another finds (lookup), reads
byte-exact (get) and counts as remote hits; a process with another salt finds nothing.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_python

from .conftest import TOKEN, ServerProcess

TOKENS = 85  # 5 full blocks of 16 and a 5-token tail
PRELUDE = """
import json
from conftest import assert_same_kv, make_kv, make_tokens, tiny_layout
from kvstore import KVStore, StoreConfig
layout = tiny_layout()
tokens = make_tokens({tokens}, seed=21)
kv = make_kv(layout, {tokens}, seed=21)
config = StoreConfig(host_bytes=4 * layout.block_bytes, remote_url={url!r}, remote_token={token!r})
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("sharing-srv"), "--host-bytes", "64MiB", "--disk-bytes",
                           "256MiB").start()
    yield server
    server.kill()


def engine(server: ServerProcess, body: str, hash_seed: str) -> dict:
    """Run ``body`` (after ``PRELUDE``) in a fresh interpreter; its last line of output is JSON."""
    code = PRELUDE.format(tokens=TOKENS, url=server.url, token=TOKEN) + body
    out = run_python(code, env_extra={"PYTHONHASHSEED": hash_seed}, timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def test_a_prefix_put_by_one_engine_process_is_found_by_another(srv):
    first = engine(srv, """
with KVStore(layout, config) as store:
    stored = store.put(tokens, kv)
    assert store.flush(timeout=60)
    remote = store.stats()["tiers"]["remote"]
    keys = [b.key.hex() for b in store.block_keys(tokens)]
print(json.dumps({"stored": stored, "written": remote["blocks_written"], "keys": keys}))
""", hash_seed="7")
    assert (first["stored"], first["written"], len(first["keys"])) == (6, 6, 6)

    second = engine(srv, """
with KVStore(layout, config) as store:
    found = store.lookup(tokens)
    got = store.get(tokens)
    assert_same_kv(got, kv)  # byte-exact, or the child fails
    hits = store.stats()["tiers"]["remote"]["hits"]
    # host RAM kept 4 of the 6 blocks it read: those are dedup; the other 2 land in host RAM (a put asks
    # no server what it holds) or, overflowing it, are found on the server; none is sent to it again
    again = store.put(tokens, kv)
    assert store.flush(timeout=60)
    keys = [b.key.hex() for b in store.block_keys(tokens)]
    dedup = store.stats()["store"]["dedup_blocks"]
    resent = store.stats()["tiers"]["remote"]["blocks_written"]
print(json.dumps({"lookup": found, "got": got.shape[2], "hits": hits, "again": again, "dedup": dedup,
                  "resent": resent, "keys": keys}))
""", hash_seed="123")
    assert second["keys"] == first["keys"]  # block keys do not depend on the process's hash seed
    assert (second["lookup"], second["got"]) == (TOKENS, TOKENS)
    assert second["hits"] == 6
    assert second["again"] + second["dedup"] == 6 and second["again"] <= 2 and second["resent"] == 0

    third = engine(srv, """
with KVStore(layout, config) as store:
    found = store.lookup(tokens, salt="another-tenant")
    got = store.get(tokens, salt="another-tenant")
    remote = store.stats()["tiers"]["remote"]
print(json.dumps({"lookup": found, "got": got.shape[2], "hits": remote["hits"]}))
""", hash_seed="99")
    assert third == {"lookup": 0, "got": 0, "hits": 0}


MODEL = """
import json, torch, transformers
from kvstore import KVStore, StoreConfig
from kvstore.integrations.transformers import CachedModel, layout_for
config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=256, initializer_range=0.1)
config._attn_implementation = "sdpa"
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).eval()
ids = torch.randint(0, 512, (1, 37), generator=torch.Generator().manual_seed(5))
store_config = StoreConfig(host_bytes="4MiB", prefill_tokens_per_second=1.0, remote_url={url!r},
                           remote_token={token!r})
"""


@pytest.mark.slow
def test_a_transformers_model_in_another_process_loads_the_prefix_from_the_server(srv):
    pytest.importorskip("transformers")
    prelude = MODEL.format(url=srv.url, token=TOKEN)
    first = json.loads(run_python(prelude + """
with KVStore(layout_for(model, block_tokens=16), store_config) as store:
    _, info = CachedModel(model, store).forward(ids)
    assert store.flush(timeout=60)
print(json.dumps({"loaded": info.loaded_tokens, "saved": info.saved_tokens}))
""", env_extra={"PYTHONHASHSEED": "7"}, timeout=180).strip().splitlines()[-1])
    assert first == {"loaded": 0, "saved": 37}
    second = json.loads(run_python(prelude + """
with torch.no_grad():
    expected = model(ids).logits[:, -1]
with KVStore(layout_for(model, block_tokens=16), store_config) as store:
    out, info = CachedModel(model, store).forward(ids)
    hits = store.stats()["tiers"]["remote"]["hits"]
print(json.dumps({"loaded": info.loaded_tokens, "computed": info.computed_tokens, "sources": info.sources,
                  "hits": hits, "diff": (out.logits[:, -1] - expected).abs().max().item()}))
""", env_extra={"PYTHONHASHSEED": "123"}, timeout=180).strip().splitlines()[-1])
    # 37 tokens: blocks 0-16 and 16-32 and the tail 32-37 are stored; all is fetched, the last token recomputed
    assert (second["loaded"], second["computed"]) == (36, 1)
    assert second["sources"] == {"remote": 37}
    assert second["hits"] == 3
    assert second["diff"] <= 1e-4
