"""A LoRA adapter's files in its requests' keys (``integrations/vllm_lora.py``)."""

from __future__ import annotations

import os
import shutil

import pytest

from kvstore.integrations.vllm_lora import AdapterDigests


def _adapter(folder, weights: bytes) -> str:
    os.makedirs(folder, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return str(folder)


def test_an_adapter_retrained_at_the_same_path_gets_another_digest(tmp_path):
    """Its name and path alone keyed it: a retrained adapter saved where the old one was was served the old
    one's KV from the tiers that outlive the engine."""
    digests = AdapterDigests()
    path = _adapter(tmp_path / "sql", b"weights v1")
    first = digests.digest(path)
    assert first is not None and digests.digest(path) == first
    _adapter(tmp_path / "sql", b"weights v2 (retrained)")
    assert digests.digest(path) not in (None, first)


def test_the_same_files_elsewhere_have_the_same_digest(tmp_path):
    """Engines on other nodes (another copy, other file times) still share the adapter's KV."""
    digests = AdapterDigests()
    here = _adapter(tmp_path / "a", b"the same weights")
    there = str(tmp_path / "b")
    shutil.copytree(here, there)
    os.utime(os.path.join(there, "adapter_model.safetensors"), ns=(10**18, 10**18))
    assert digests.digest(here) == digests.digest(there) == AdapterDigests().digest(there)


@pytest.mark.parametrize("path", [None, "", "org/hub-adapter-name", "/no/such/folder"])
def test_a_path_that_is_no_local_file_has_no_digest(path):
    assert AdapterDigests().digest(path) is None


def test_the_memo_is_bounded(tmp_path):
    digests = AdapterDigests(max_adapters=2)
    paths = [_adapter(tmp_path / name, name.encode()) for name in ("a", "b", "c")]
    values = [digests.digest(path) for path in paths]
    assert len(set(values)) == 3 and len(digests._memo) == 2
    with pytest.raises(ValueError, match="max_adapters"):
        AdapterDigests(max_adapters=0)
