"""The default model id: a digest of the weights and config, not the path they were loaded from.

The same weights under two paths share an id; one byte or the config
changed gives another. A Hugging Face cache file is named by its blob (its
content's sha256) without being read, other files are hashed once and the
digest kept in ``$XDG_CACHE_HOME``. A model whose weights cannot be found
is named ``name@revision``. Nothing here reaches the network.
"""

from __future__ import annotations

import functools

import builtins
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from kvstore.integrations import model_identity
from kvstore.integrations.model_identity import default_model_id, folder_digest


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Digests cached under tmp_path; a Hugging Face cache under tmp_path, offline."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read at import, used per call
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _model(folder: Path, weights: bytes = b"\x01" * 1000, config: str = '{"hidden_size": 64}') -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config)
    (folder / "model-00001-of-00002.safetensors").write_bytes(weights)
    (folder / "model-00002-of-00002.safetensors").write_bytes(weights[::-1] + b"tail")
    (folder / "tokenizer.json").write_text("{}")  # not part of the KV's identity
    return folder


@pytest.fixture
def opens(monkeypatch):
    """Weight files opened by the module (``open`` looked up as a module global)."""
    seen: list[str] = []

    def counting(path, *args, **kwargs):
        seen.append(os.fspath(path))
        return builtins.open(path, *args, **kwargs)
    monkeypatch.setattr(model_identity, "open", counting, raising=False)
    return seen


def test_the_same_weights_in_two_folders_have_one_id(tmp_path):
    a = _model(tmp_path / "mnt-a" / "llama")
    b = tmp_path / "mnt-b" / "copy"
    shutil.copytree(a, b)
    (b / "tokenizer.json").write_text('{"other": 1}')
    assert default_model_id(str(a)) == default_model_id(str(b), "rev-ignored-for-a-folder")
    assert default_model_id(str(a)).startswith("weights-sha256:")


def test_one_byte_or_the_config_changed_gives_another_id(tmp_path):
    base = default_model_id(str(_model(tmp_path / "base")))
    weights = bytearray(b"\x01" * 1000)
    weights[500] ^= 0x10
    assert default_model_id(str(_model(tmp_path / "byte", bytes(weights)))) != base
    assert default_model_id(str(_model(tmp_path / "config", config='{"hidden_size": 65}'))) != base
    renamed = _model(tmp_path / "renamed")
    (renamed / "model-00002-of-00002.safetensors").rename(renamed / "extra.safetensors")
    assert default_model_id(str(renamed)) != base


def test_a_weight_file_rewritten_in_place_gets_a_new_id(tmp_path):
    folder = _model(tmp_path / "m")
    before = default_model_id(str(folder))
    path = folder / "model-00001-of-00002.safetensors"
    st = path.stat()
    with open(path, "r+b") as f:  # same inode and size
        f.seek(10)
        f.write(b"\x02")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # as a later write's mtime would be
    assert default_model_id(str(folder)) != before


def _hub_model(hub: Path, repo: str, blobs: dict[str, tuple[str, bytes]], commit: str = "a" * 40) -> Path:
    """A Hugging Face cache entry: ``snapshots/<commit>/<file>`` links to ``blobs/<sha256 name>``."""
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, (blob, content) in blobs.items():
        (root / "blobs" / blob).write_bytes(content)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


def test_a_hugging_face_cache_file_is_named_by_its_blob_without_reading_it(tmp_path, opens):
    wrong = hashlib.sha256(b"not these bytes").hexdigest()  # a blob name that is not the content's hash
    config = hashlib.sha256(b"config").hexdigest()
    snap = _hub_model(tmp_path / "hf" / "hub", "org/tiny", {"model.safetensors": (wrong, b"w" * 100),
                                                            "config.json": (config, b"{}")})
    named = folder_digest(snap)
    assert named is not None and opens == []
    rel = [("config.json", config), ("model.safetensors", wrong)]
    expected = hashlib.sha256("".join(f"{p}\0{blob}\n" for p, blob in rel).encode()).hexdigest()[:32]
    assert named == f"weights-sha256:{expected}"
    # the same blob names over other bytes: the same id (the bytes were never read)
    other = _hub_model(tmp_path / "elsewhere", "org/tiny", {"model.safetensors": (wrong, b"x" * 7),
                                                             "config.json": (config, b"[]")})
    assert folder_digest(other) == named
    assert default_model_id("org/tiny") == named  # a hub id found in the local cache
    assert default_model_id("org/tiny", "a" * 40) == named
    assert opens == []


def test_digests_are_kept_and_a_second_start_reads_nothing(tmp_path, opens):
    folder = _model(tmp_path / "m")
    first = default_model_id(str(folder))
    assert len(opens) == 3  # config and two weight files, hashed once
    cache = tmp_path / "xdg" / "kvstore" / "weight-digests.json"
    entries = json.loads(cache.read_text())
    assert len(entries) == 3 and all(k.startswith(str(folder.resolve())) for k in entries)
    opens.clear()
    assert default_model_id(str(folder)) == first
    assert opens == []
    os.utime(folder / "config.json", ns=(1, 1))  # a changed mtime: that file is hashed again, and only it
    assert default_model_id(str(folder)) == first
    assert [Path(p).name for p in opens] == ["config.json"]


@pytest.mark.parametrize("junk", ["not json", "[1, 2]", '{"k": 5}', ""])
def test_a_broken_digest_cache_is_recomputed(tmp_path, junk):
    folder = _model(tmp_path / "m")
    expected = default_model_id(str(folder))
    cache = tmp_path / "xdg" / "kvstore" / "weight-digests.json"
    cache.write_text(junk)
    assert default_model_id(str(folder)) == expected
    assert len(json.loads(cache.read_text())) == 3


def test_an_unwritable_digest_cache_still_names_the_model(tmp_path, monkeypatch):
    expected = default_model_id(str(_model(tmp_path / "m")))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # its kvstore/ folder cannot be made
    assert default_model_id(str(tmp_path / "m")) == expected


def test_a_folder_without_weights_is_named_by_name_and_revision(tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert folder_digest(folder) is None
    assert default_model_id(str(folder), "v2") == f"{folder}@v2"
    assert default_model_id(str(folder)) == f"{folder}@default"


def test_a_hub_id_not_in_the_local_cache_is_named_by_name_and_revision():
    name = f"nobody/model-{uuid.uuid4().hex}"
    assert default_model_id(name) == f"{name}@default"
    assert default_model_id(name, "main") == f"{name}@main"
    assert default_model_id("s3://bucket/weights", "r1") == "s3://bucket/weights@r1"


def test_bind_engine_settings_is_stable_and_leaves_plain_ids_alone():
    from kvstore.integrations.model_identity import bind_engine_settings

    assert bind_engine_settings("m", {"hf_overrides": {}, "quantization": None}) == "m"
    one = bind_engine_settings("m", {"hf_overrides": {"b": 2, "a": 1}})
    assert one == bind_engine_settings("m", {"hf_overrides": {"a": 1, "b": 2}})  # order does not matter
    assert one != bind_engine_settings("m", {"hf_overrides": {"a": 1, "b": 3}})
    assert one != bind_engine_settings("m", {"quantization": {"a": 1, "b": 2}})  # the setting's name counts

    def override(config):
        return config

    by_function = bind_engine_settings("m", {"hf_overrides": override})
    assert by_function == bind_engine_settings("m", {"hf_overrides": override})  # no address in it

    def set_rope(config, theta):
        config.rope_theta = theta
        return config

    # Named by module and name alone, two partials (and two lambdas) that set other values had one id.
    ids = {bind_engine_settings("m", {"hf_overrides": hook}) for hook in (
        functools.partial(set_rope, theta=1e4), functools.partial(set_rope, theta=1e6),
        lambda config: set_rope(config, 1e4), lambda config: set_rope(config, 1e6))}
    assert len(ids) == 4
    assert bind_engine_settings("m", {"hf_overrides": functools.partial(set_rope, theta=1e6)}) in ids
