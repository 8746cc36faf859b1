#!/usr/bin/env bash
# The GPU check, on a machine with one NVIDIA GPU, a CUDA torch and no internet:
#
#   scripts/gpu-check.sh [gpu_check.py options, e.g. --quick or --sections ceiling,codecs]
#
# In the repository root, with the wheels of scripts/gpu-wheels.sh in .gpu-wheels/ (GPU_WHEELS=...).
# 1. a venv with --system-site-packages over the python that has CUDA torch (python3, or PYTHON=...),
#    so the machine's torch is reused; if no venv can be made, that python itself;
# 2. pip install --no-index --find-links WHEELS kvstore transformers==<the wheel's> pytest
#    (fallback: -e . from the tree), then this tree editable over it (--no-deps), so the check
#    runs the code of this checkout even if the wheel is older;
# 3. python bench/gpu_check.py --device cuda --out $OUT/gpu-check.json (./gpu-check.json without $OUT):
#    prints a table; every speed figure is a ratio to a pinned/pageable/device copy_ of the same run.
# Time caps: venv 60 s, installs 150 s each, the check GPU_CHECK_TIMEOUT (default 420 s; its sections
# have their own caps inside and usually take 1-2 minutes on an H200).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS="${GPU_WHEELS:-.gpu-wheels}"
PYTHON="${PYTHON:-python3}"
VENV="${GPU_CHECK_VENV:-/tmp/kvstore-gpu-venv}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
OUTDIR="${OUT:-.}"
CHECK_TIMEOUT="${GPU_CHECK_TIMEOUT:-420}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
t0=$SECONDS
say() { echo "gpu-check [$((SECONDS - t0)) s]: $*"; }

cuda_ok() {  # python with a torch that sees a CUDA device (or any torch when DEVICE=cpu)
    timeout 120 "$1" -c "import sys, torch
sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 1)" 2>/dev/null
}

if ! cuda_ok "$PYTHON"; then
    say "$PYTHON has no torch that sees a CUDA device:"
    timeout 120 "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
        'available', torch.cuda.is_available())" || true
    command -v nvidia-smi >/dev/null && nvidia-smi -L || true
    exit 2
fi
[ -d "$WHEELS" ] || { say "no wheels folder $WHEELS (run scripts/gpu-wheels.sh where there is internet, carry it)"; exit 2; }

PY="$PYTHON"
make_venv() {
    # without ensurepip (a python from uv, or Debian's without python3-venv) the venv gets no pip of its own
    timeout 60 "$PYTHON" -m venv --system-site-packages "$VENV" \
        || timeout 60 "$PYTHON" -m venv --system-site-packages --without-pip "$VENV" || return 1
    # --system-site-packages shows the *base* interpreter's packages; when $PYTHON is itself a venv (the
    # GPU machine's python3 is /opt/torch/.venv/bin/python3) its torch lives in that venv: add its
    # site-packages (with their .pth files) after the new venv's own, so what pip installs here wins.
    local site
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    "$PYTHON" - "$site/_kvstore_gpu_check_parent.pth" <<'PY' || return 1
import site, sys
dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if d]
with open(sys.argv[1], "w") as f:
    f.write("import site; list(map(site.addsitedir, %r))\n" % dirs)
PY
}
if make_venv && cuda_ok "$VENV/bin/python"; then
    PY="$VENV/bin/python"
    say "venv $VENV over $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
elif [ "$DEVICE" != cpu ] || [ "${GPU_CHECK_INSTALL_INTO_PYTHON:-0}" = 1 ]; then
    # a lent GPU machine starts bare and is given back: installing into its python harms nothing
    say "no venv (or torch not visible in it): installing into $PYTHON itself"
else
    say "no venv (or torch not visible in it); GPU_CHECK_INSTALL_INTO_PYTHON=1 installs into $PYTHON itself"
    exit 2
fi

# what to install: kvstore (its dependencies come from WHEELS or are already there), transformers at
# the version the wheels folder holds (the one this project tests with), pytest
PKGS=(kvstore pytest "setuptools>=68" wheel)  # setuptools: for the editable install of the tree below
tf_wheel="$(ls "$WHEELS"/transformers-*.whl 2>/dev/null | head -1)"
if [ -n "$tf_wheel" ]; then
    tf_version="$(basename "$tf_wheel" | cut -d- -f2)"
    PKGS+=("transformers==$tf_version")
fi
# a pip for $PY: its own, else $PYTHON's driving it (--python), else the pip wheel carried in WHEELS
pip_wheel="$(ls "$WHEELS"/pip-*.whl 2>/dev/null | head -1)"
if "$PY" -m pip --version >/dev/null 2>&1; then
    PIPCMD=("$PY" -m pip)
elif [ "$PY" != "$PYTHON" ] && "$PYTHON" -m pip --python "$PY" --version >/dev/null 2>&1; then
    PIPCMD=("$PYTHON" -m pip --python "$PY")
elif [ -n "$pip_wheel" ]; then
    PIPCMD=("$PY" "$pip_wheel/pip")
else
    say "no pip for $PY (and no pip wheel in $WHEELS)"; exit 3
fi
PIP=("${PIPCMD[@]}" install --quiet --no-index --find-links "$WHEELS")
if timeout 150 "${PIP[@]}" "${PKGS[@]}"; then
    say "installed ${PKGS[*]} from $WHEELS"
else
    say "installing the kvstore wheel failed: editable install of the tree instead"
    timeout 150 "${PIP[@]}" "setuptools>=68" wheel || true
    timeout 150 "${PIP[@]}" --no-build-isolation -e . "${PKGS[@]:1}" || { say "install failed"; exit 3; }
fi
# the tree over the wheel (no dependencies touched): the check measures this checkout's code
if timeout 150 "${PIP[@]}" --no-deps --no-build-isolation -e .; then
    say "this tree installed editable over it"
else
    say "WARNING: editable install of the tree failed; checking the kvstore wheel from $WHEELS as built"
fi

mkdir -p "$OUTDIR"
say "running bench/gpu_check.py (cap ${CHECK_TIMEOUT} s)"
timeout --kill-after=10 "$CHECK_TIMEOUT" "$PY" bench/gpu_check.py --device "$DEVICE" \
    --out "$OUTDIR/gpu-check.json" "$@"
rc=$?
[ $rc = 124 ] && say "gpu_check.py ran past ${CHECK_TIMEOUT} s: $OUTDIR/gpu-check.json holds the sections that finished"
say "done, exit $rc; JSON: $OUTDIR/gpu-check.json"
exit $rc
