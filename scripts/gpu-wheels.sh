#!/usr/bin/env bash
# Download, here (with internet), every wheel the GPU check needs except torch and the nvidia-* packages,
# and build kvstore's own wheel, into one folder that travels to the GPU machine (no internet there).
#
#   scripts/gpu-wheels.sh [FOLDER]          # default .gpu-wheels (git-ignored)
#
# What goes in: kvstore's runtime dependencies (read from pyproject.toml, torch left out), transformers
# (the version of this checkout's .venv if it has one, so both machines run the same) with its
# dependencies, safetensors, pytest, setuptools and wheel (for an editable install there), pip, and
# kvstore-*.whl. Wheels are for manylinux x86_64 and CPython 3.12, the python3 that holds the GPU
# machine's CUDA torch (the device notes: Python 3.12.3, torch 2.11 cu130); cp311 wheels (this project's
# own 3.11) would not install there. GPU_PY_VERSIONS="3.11 3.12" fetches both (about 85 MB: over the
# 64 MiB that may travel to a lent machine). torch is never downloaded: the machine's CUDA build is reused.
# Then: scripts/gpu-check.sh on the GPU machine (see README, "Benchmarks").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS="${1:-${GPU_WHEELS:-.gpu-wheels}}"
PY_VERSIONS="${GPU_PY_VERSIONS:-3.12}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$WHEELS"

# kvstore's runtime dependencies, minus torch (the GPU machine has its CUDA build).
mapfile -t DEPS < <("$PYTHON" - <<'PY'
import re, tomllib
with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
for dep in deps:
    name = re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0].lower()
    if name != "torch" and not name.startswith("nvidia-"):
        print(dep)
PY
)
# transformers pinned to what this checkout tests with, when it has it.
TRANSFORMERS="transformers>=5"
if version="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("transformers"))' 2>/dev/null)"; then
    TRANSFORMERS="transformers==$version"
fi
# pip: runnable from its wheel should the GPU machine's python have none
EXTRA=("$TRANSFORMERS" safetensors "pytest>=8" setuptools wheel pip)

PLATFORMS=()
for tag in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
           manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 \
           manylinux1_x86_64 manylinux2010_x86_64; do
    PLATFORMS+=(--platform "$tag")
done

echo "gpu-wheels: into $WHEELS for CPython $PY_VERSIONS: ${DEPS[*]} ${EXTRA[*]}"
for pyver in $PY_VERSIONS; do
    # pip download resolves the whole tree; torch is no dependency of any of these.
    "$PYTHON" -m pip download --disable-pip-version-check --quiet --only-binary=:all: \
        --python-version "$pyver" --implementation cp "${PLATFORMS[@]}" \
        --dest "$WHEELS" "${DEPS[@]}" "${EXTRA[@]}" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
done
if ls "$WHEELS" | grep -Ei '^(torch|triton|nvidia)[-_]' >/dev/null; then
    echo "gpu-wheels: torch/triton/nvidia wheels were pulled in; they must not be (the GPU machine has its own):" >&2
    ls "$WHEELS" | grep -Ei '^(torch|triton|nvidia)[-_]' >&2
    exit 1
fi

# the folder alone must resolve everything but torch, offline (as on the GPU machine)
for pyver in $PY_VERSIONS; do
    target="$(mktemp -d)"
    "$PYTHON" -m pip install --disable-pip-version-check --quiet --dry-run --ignore-requires-python --no-index \
        --find-links "$WHEELS" --only-binary=:all: --python-version "$pyver" --implementation cp "${PLATFORMS[@]}" \
        --target "$target" "${DEPS[@]}" "${EXTRA[@]}" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    rm -rf "$target"
    echo "gpu-wheels: CPython $pyver: everything but torch installs from $WHEELS alone"
done

# kvstore's own wheel (from this working tree; gpu-check.sh also installs the tree there, editable).
rm -f "$WHEELS"/kvstore-*.whl
had_build=0; [ -e build ] && had_build=1
"$PYTHON" -m pip wheel --disable-pip-version-check --quiet --no-deps --wheel-dir "$WHEELS" . \
    || "$PYTHON" -m pip wheel --disable-pip-version-check --quiet --no-deps --no-build-isolation --wheel-dir "$WHEELS" .
[ "$had_build" = 1 ] || rm -rf build  # setuptools' in-tree build folder, if this run made it

count=$(ls "$WHEELS"/*.whl | wc -l)
echo "gpu-wheels: $count wheels in $WHEELS, $(du -sh "$WHEELS" | cut -f1) ($(du -sb "$WHEELS" | cut -f1) bytes)"
echo "gpu-wheels: on the GPU machine: scripts/gpu-check.sh (carry $WHEELS if it is git-ignored)"
