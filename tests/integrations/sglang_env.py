"""Importing SGLang's pools on a CPU machine: torchvision stubbed while they import, where it is missing.

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
