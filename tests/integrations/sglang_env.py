"""Importing SGLang's pools on a CPU machine (torchvision stubbed where missing), and the SGLang tests' helpers.

SGLang's multimodal configs import torchvision, whose registry build is
CUDA-only (it fails to import here, see ENGINES.md). ``stubbed_torchvision``
puts a module finder in front for the duration of a ``with`` block: any
``torchvision`` attribute is another stub, callable. No part kvstore or the
tests use comes from it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch


class _StubModule(types.ModuleType):
    """Any attribute is another stub (``torchvision.transforms.InterpolationMode.BICUBIC``), callable."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        sub = sys.modules.get(f"{self.__name__}.{name}") or _stub(f"{self.__name__}.{name}")
        setattr(self, name, sub)
        return sub

    def __call__(self, *args, **kwargs):
        return self


def _stub(name: str) -> _StubModule:
    module = _StubModule(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, _TorchvisionStub, is_package=True)
    module.__path__ = []
    module.__version__ = "0.0.0+stub"
    sys.modules[name] = module
    return module


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, cls, is_package=True)
        return None

    @classmethod
    def create_module(cls, spec):
        return _stub(spec.name)

    @classmethod
    def exec_module(cls, module):
        pass


@contextmanager
def stubbed_torchvision() -> Iterator[None]:
    """Imports inside the block find a stub ``torchvision`` if the real one cannot be found."""
    stubbed = importlib.util.find_spec("torchvision") is None
    if stubbed:
        sys.meta_path.insert(0, _TorchvisionStub)
    try:
        yield
    finally:
        if stubbed:
            sys.meta_path.remove(_TorchvisionStub)


def page_bytes(pool, index: int) -> torch.Tensor:
    """The bytes of the page at token ``index`` (a copy, in the host layout's order)."""
    return pool.get_data_page(int(index), flat=False).contiguous().view(torch.uint8).clone()


def page_indices(pages, page_size: int) -> torch.Tensor:
    """The token slots of host ``pages``, in order."""
    return torch.cat([torch.arange(p * page_size, (p + 1) * page_size) for p in pages])


def keys(n: int, tag: str = "k") -> list[str]:
    """``n`` page hashes as SGLang spells them (64 characters)."""
    return [f"{tag}{i:04d}" + "0" * 56 for i in range(n)]


@pytest.fixture(autouse=True)
def no_failure_injection(monkeypatch, tmp_path):
    """SGLang's test knobs (random delays and failures) and a stray kvstore config are off in every test, and
    the L3's default directory (``$XDG_CACHE_HOME/kvstore/sglang-l3``) is the test's own."""
    for var in ("SGLANG_TEST_HICACHE_BACKEND_RANDOM_DELAY", "SGLANG_TEST_HICACHE_BACKEND_RANDOM_FAILURE",
                "SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", "KVSTORE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
