#!/usr/bin/env bash
# Build a pycuda wheel (and download its pure-Python dependencies) for a GPU machine without a package index.
# Runs on a machine with the CUDA toolkit headers but no GPU and no libcuda.so:
#   engines/build_pycuda_wheel.sh [PYTHON]     (default python3.12; env: CUDA_ROOT=/usr/local/cuda,
#                                              WHEEL_DIR=.whl, PYCUDA_VERSION=2026.1 to pin)
# Then on the GPU machine: python3 -m pip install --no-index --find-links .whl pycuda
set -euo pipefail
PY=${1:-python3.12}
CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda}
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT="${WHEEL_DIR:-$REPO/.whl}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT" "$WORK/stub" "$WORK/home"

# A link-time stand-in for the driver library: every cu* function of cuda.h, soname libcuda.so.1. The linker's
# --as-needed (Debian/Ubuntu default) drops a library that provides no used symbol, so an empty stub would not do.
printf '#include <cuda.h>\n#include <cudaProfiler.h>\n' | gcc -E -P -I"$CUDA_ROOT/include" -x c - >"$WORK/stub/cuda.i"
"$PY" -c '
import re, sys
folder = sys.argv[1]
names = sorted(set(re.findall(r"\bCUresult\s+(cu[A-Za-z0-9_]+)\s*\(", open(folder + "/cuda.i").read())))
open(folder + "/stub.c", "w").write("".join("int %s(void) { return 999; }\n" % n for n in names))
' "$WORK/stub"
gcc -shared -fPIC -o "$WORK/stub/libcuda.so" -Wl,-soname,libcuda.so.1 "$WORK/stub/stub.c"

# pycuda's setup also reads its options from ~/.aksetup-defaults.py: a private HOME carries them.
# No curand (not in a minimal toolkit, not used by edgecv), no GL.
cat >"$WORK/home/.aksetup-defaults.py" <<CONF
CUDA_ROOT = "$CUDA_ROOT"
CUDA_ENABLE_GL = False
CUDA_ENABLE_CURAND = False
CUDADRV_LIB_DIR = ["$WORK/stub"]
CUDADRV_LIBNAME = ["cuda"]
USE_SHIPPED_BOOST = True
CONF
HOME="$WORK/home" PATH="$CUDA_ROOT/bin:$PATH" "$PY" -m pip wheel --no-deps --no-cache-dir \
  "pycuda${PYCUDA_VERSION:+==$PYCUDA_VERSION}" -w "$OUT"

PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  pytools platformdirs mako siphash24 typing_extensions markupsafe -d "$OUT"
ls -la "$OUT"
