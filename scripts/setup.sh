#!/usr/bin/env bash
# Creates .venv and installs fastdiff into it (editable), with the extras named
# in $1 (default: test,text). Idempotent: a stamp skips work when nothing changed.
#
# torch: a GPU user keeps the CUDA torch they have, or gets PyPI's CUDA build;
# a machine without a GPU gets the CPU build (TORCH_SPEC overrides, e.g.
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,text,video}"
venv=.venv
stamp="$venv/.fastdiff-$extras"
# (a change to the kernels' build reinstalls, which rebuilds libfastdiff_kernels; an edited kernel
# only makes the installed library stale: fastdiff then uses Triton's JIT until the next install)
# (FASTDIFF_ARCHS, which setup.py passes to CMake, counts too)
want="$( (cat pyproject.toml setup.py CMakeLists.txt scripts/setup.sh kernels/build.py kernels/*/*.[ch] kernels/*/*.cpp
          echo "${FASTDIFF_ARCHS:-}") | sha1sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check -qq"
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    $pip install $TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $pip install torch                 # CUDA build
  else
    $pip install "torch==2.13.0"       # CPU build where the index offers one
  fi
fi
$pip install -e ".[$extras]"
# setup.py builds libfastdiff_kernels with the interpreter it installs into, so in a fresh venv the
# build runs before triton and numpy arrive (pip installs dependencies after building) and leaves
# the package without the library; build it again now that they are there
if ! ls fastdiff/ops/_aot_binding*.so >/dev/null 2>&1; then
  $pip install --no-deps -e .
  ls fastdiff/ops/_aot_binding*.so >/dev/null 2>&1 ||
    echo "warning: libfastdiff_kernels not built; fastdiff will launch kernels through Triton's JIT" >&2
fi
echo "$want" > "$stamp"
