#!/usr/bin/env bash
# What a lent GPU machine runs, time-boxed: build with CUDA, the GPU tests, the op benchmarks,
# short gpu-short training runs of every model (rates, peak memory), inference fps at the
# models' full resolution, and the training benchmarks; see docs/DEVELOPING.md "GPU session".
#
#   bash bench/gpu_session.sh OUT [SELECTION ...] [--dry-run | --check]
#   bash bench/gpu_session.sh --list
#
# SELECTION: phase1 (versions, build, info, GPU tests, op benchmarks), phase2 (synthetic data,
# full-resolution fps, gpu-short training runs, animate, eval), phase3 (training benchmarks,
# torch.compile rows), all (= phase1 phase2 phase3; the default), or step names (see --list),
# space or comma separated, run in the order of the step table.
#
# Each step runs under `timeout` (its cap, or what is left of the budget), its output in its own
# log; a failed step is recorded (exit code, seconds) and the next one runs. A step that does not
# fit in what is left of GPU_SESSION_BUDGET_S is skipped and recorded as such. OUT receives two
# files, rewritten after every step (the device tool returns at most 8 files from OUT):
#   OUT/gpu-session-LABEL-summary.tsv   step, phase, status, rc, seconds, limit, log
#   OUT/gpu-session-LABEL.tar.gz        LABEL/{summary.tsv, versions.json, info.json,
#                                       gpu-tests.xml, *.json, logs/NN-STEP.log}
# LABEL is the selection joined by '-' (dry-LABEL for a dry run, check-LABEL for a check); step
# env's log holds the
# device, driver and toolkit. Checkpoints, data and videos stay in GPU_SESSION_WORK.
#
# Environment:
#   GPU_SESSION_DRY_RUN=1 (or --dry-run)  every step on the CPU with the tiniest sizes and 1-2
#                            steps, no CUDA build: proves every command line before a GPU comes
#   GPU_SESSION_CHECK=1 (or --check)  on the CPU, in minutes: the GPU run's own command lines
#                            (its sizes, presets, --set items, options), each checked instead of
#                            run: pyface / pyface.bench.train / tools under PYFACE_PARSE_ONLY=1,
#                            pytest --collect-only, the build's commands printed
#   GPU_SESSION_BUDGET_S     seconds for the whole invocation (default 540; dry run 7200; check
#                            1800)
#   GPU_SESSION_WORK         machine-local work folder: data, runs, caches (default
#                            /tmp/pyface-gpu-session, a check's /tmp/pyface-gpu-session-check;
#                            later calls reuse it while the machine is warm)
#   GPU_SESSION_KILL_AFTER_S how long a step's processes may outlive it (a timed-out step's
#                            trainer finishing its step) before they are killed (default 20)
#   GPU_SESSION_COMMIT       the commit the tree was copied from (the device copy has no .git)
#   PYTHON                   the interpreter (default python3: on the GPU machine the one that
#                            holds CUDA torch)
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST  build parallelism (default: nproc) and archs (default 9.0)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT="$ROOT/bench/gpu_session.sh"

# ---------------------------------------------------------------- the step table
# name phase cap_seconds (GPU); run in this order. A dry run gives every step DRY_CAP seconds, a
# check CHECK_CAP.
STEPS="
env              phase1  30
build            phase1  300
info             phase1  60
gpu_tests        phase1  240
bench_ops        phase1  180
data             phase2  90
fps_goha_full    phase2  90
full_otavatar    phase2  90
animate_otavatar_full phase2 90
full_mmfa        phase2  60
animate_mmfa_full phase2 60
eval_mmfa_full   phase2  60
train_eg3d       phase2  75
train_goha       phase2  120
train_mmfa       phase2  90
train_export3d   phase2  90
train_otavatar   phase2  120
animate_eg3d     phase2  45
animate_goha     phase2  45
animate_mmfa     phase2  45
animate_export3d phase2  45
animate_otavatar phase2  90
eval_goha        phase2  60
eval_export3d    phase2  60
bench_train_eg3d phase3  90
bench_train_goha phase3  120
bench_train_mmfa phase3  90
bench_train_export3d phase3 120
bench_train_otavatar phase3 150
bench_train_eg3d_compile phase3 240
bench_ops_compile phase3 300
"
DRY_CAP=900
CHECK_CAP=300

table_names() { awk 'NF {print $1}' <<<"$STEPS"; }
table_field() { awk -v s="$1" -v f="$2" '$1 == s {print $f}' <<<"$STEPS"; }

# ---------------------------------------------------------------- configuration
PY=${PYTHON:-python3}
DRY=${GPU_SESSION_DRY_RUN:-0}
CHECK=${GPU_SESSION_CHECK:-0}    # the GPU run's command lines (DEV cuda), checked instead of run
if [ "$CHECK" = 1 ]; then WORK=${GPU_SESSION_WORK:-/tmp/pyface-gpu-session-check}
else WORK=${GPU_SESSION_WORK:-/tmp/pyface-gpu-session}; fi
if [ "$DRY" = 1 ]; then DEV=cpu; else DEV=cuda; fi
set_paths() {
    DATA=$WORK/data/train        # pyface data synth: training set (every model resizes it)
    TEST=$WORK/data/test         # held-out set: animate sources/driving, eval
    RUNS=$WORK/runs
}
set_paths

configure() {                     # the sizes of the GPU run, or the tiniest for the dry run
    if [ "$DRY" = 1 ]; then
        SYNTH_TRAIN=(--identities 2 --videos-per-identity 2 --frames 32 --resolution 64)
        SYNTH_TEST=(--identities 2 --videos-per-identity 1 --frames 8 --resolution 64)
        STEPS_EG3D=1 STEPS_GOHA=1 STEPS_MMFA=1 STEPS_EXPORT3D=1 STEPS_OTAVATAR=1 STEPS_STAGE=1
        LOG_EVERY=1 ANIM_FRAMES=2 ANIM_BATCH=2 EVAL_PAIRS=2
        BENCH_STEPS=(--steps 1 --warmup 0) BENCH_COMPILE=(--compile eager --warmup 1)
        DRY_SET=(train.batch_size=2)          # added to the final model and to every stage
        OPS=(--device cpu --size small --min-time 0 --no-compile) OP_FAMILIES=(triplane)
        NUM_WORKERS=1
        OPS_COMPILE=(triplane_sample --device cpu --size small --min-time 0
                     --providers reference,compile)
        GOHA_INFER=(--frames 1 --repeats 1)
        GOHA_INFER_PRESET=tiny            # full: minutes a frame on a CPU
        TESTS=(-m gpu tests/test_raster_gpu.py)
    else
        SYNTH_TRAIN=(--identities 4 --videos-per-identity 2 --frames 48 --resolution 256
                     --multiview)
        SYNTH_TEST=(--identities 2 --videos-per-identity 1 --frames 64 --resolution 256)
        STEPS_EG3D=40 STEPS_GOHA=10 STEPS_MMFA=20 STEPS_EXPORT3D=20 STEPS_OTAVATAR=6
        STEPS_STAGE=20
        LOG_EVERY=5 ANIM_FRAMES=64 ANIM_BATCH=8 EVAL_PAIRS=16
        BENCH_STEPS=(--steps 8 --warmup 2) BENCH_COMPILE=(--compile default --warmup 3)   # compiling: the warm-up steps
        DRY_SET=()
        OPS=(--device cuda --size full --min-time 0.1 --no-compile)
        OP_FAMILIES=(raster render triplane warp)
        NUM_WORKERS=8                     # loader processes: the GPU, not PNG decoding, is timed
        OPS_COMPILE=(--device cuda --size full --min-time 0.1 --providers reference,compile)
        GOHA_INFER=(--frames 8 --repeats 3)
        GOHA_INFER_PRESET=full
        TESTS=(-m gpu tests)
    fi
}

# --set items of a short training run: run-wide keys once, per-run keys for the final model and
# for each stage named (stages.<name>.<key>)
train_sets() {                    # train_sets STEPS_FINAL STEPS_STAGES STAGE...
    local final=$1 stage_steps=$2
    shift 2
    local out=(--set "data.path=$DATA" --set "train.device=$DEV" --set train.progress=false
               --set train.tensorboard=false --set "train.log_every=$LOG_EVERY"
               --set "train.num_workers=$NUM_WORKERS")
    local run prefix steps item
    for run in "" "$@"; do
        if [ -z "$run" ]; then prefix="" steps=$final; else prefix="stages.$run." steps=$stage_steps; fi
        out+=(--set "${prefix}train.steps=$steps" --set "${prefix}train.video_frames=0"
              --set "${prefix}train.image_every=0" --set "${prefix}train.ckpt_every=0")
        for item in "${DRY_SET[@]}"; do out+=(--set "$prefix$item"); done
    done
    printf '%s\n' "${out[@]}"
}

# a short training run through tools/gpu_session_train.py (rates and peak memory as JSON)
short_train() {                   # short_train NAME MODEL PRESET STEPS STAGE_STEPS [STAGE...] [-- EXTRA...]
    local name=$1 model=$2 preset=$3 steps=$4 stage_steps=$5
    shift 5
    local stages=() extra=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do stages+=("$1"); shift; done
    [ $# -gt 0 ] && { shift; extra=("$@"); }
    need_dir "$DATA" || return 98
    local sets
    mapfile -t sets < <(train_sets "$steps" "$stage_steps" "${stages[@]}")
    rm -rf "${RUNS:?}/$name"
    run "$PY" tools/gpu_session_train.py --json "$RES/train-$name-$DEV.json" -- \
        "$model" --preset "$preset" --overwrite --set "train.run_dir=$RUNS/$name" \
        "${sets[@]}" "${extra[@]}"
}

animate() {                       # animate NAME MODEL RUN [EXTRA...]
    local name=$1 model=$2 ckpt=$3
    shift 3
    need_dir "$ckpt/checkpoints" || return 98
    need_dir "$TEST/test0000_v00" || return 98
    run "$PY" -m pyface animate "$model" --checkpoint "$ckpt" --source "$TEST/test0000_v00" \
        --driving "$TEST/test0001_v00" --frames "$ANIM_FRAMES" --batch "$ANIM_BATCH" \
        --device "$DEV" --out "$WORK/anim/$name.mp4" --no-progress "$@"
}

evaluate() {                      # evaluate NAME MODEL RUN
    local name=$1 model=$2 ckpt=$3
    need_dir "$ckpt/checkpoints" || return 98
    need_dir "$TEST" || return 98
    run "$PY" -m pyface eval "$model" --checkpoint "$ckpt" --data "$TEST" --metrics psnr \
        --max-pairs "$EVAL_PAIRS" --device "$DEV" --json "$RES/eval-$name-$DEV.json" \
        --sheet-rows 0 --quiet
}

bench_train() {                   # bench_train MODEL [EXTRA...]
    local model=$1
    shift
    need_dir "$DATA" || return 98
    local extra=() item
    for item in "${DRY_SET[@]}"; do extra+=(--set "$item"); done
    run "$PY" -m pyface.bench.train "$model" --preset gpu-short --device "$DEV" \
        "${BENCH_STEPS[@]}" --set "data.path=$DATA" "${extra[@]}" "$@"
}

need_dir() {
    if [ ! -d "$1" ]; then
        if [ "$CHECK" = 1 ]; then      # made by an earlier step of the GPU run
            echo "gpu_session: check: $1 is made by an earlier step: what it holds is not checked"
            return 0
        fi
        echo "gpu_session: $1 does not exist (an earlier step did not make it): not run"
        return 98
    fi
}

run() {
    echo "+ $*"
    if [ "$CHECK" = 1 ]; then check_command "$@"; return; fi
    "$@"
}

# a command of the GPU run, checked instead of run (GPU_SESSION_CHECK=1): pyface's commands,
# python -m pyface.bench.train and the tools under PYFACE_PARSE_ONLY=1 (the real parsers; the
# option values, presets and --set keys of the run and of its stages; nothing trained, measured
# or written), pytest --collect-only (the selection collects tests), the build's commands
# printed (pip and setup.py present)
check_command() {
    local arg
    for arg in "$@"; do
        case "$arg" in
            pip) "$PY" -m pip --version || return
                 echo "gpu_session: check: pip is there; the CUDA build is not run"
                 return 0 ;;
            setup.py) [ -f "$ROOT/setup.py" ] || { echo "gpu_session: no $ROOT/setup.py"; return 1; }
                      echo "gpu_session: check: the in-place build is not run"
                      return 0 ;;
            pytest) "$@" --collect-only; return ;;
        esac
    done
    PYFACE_PARSE_ONLY=1 "$@"
}

# ---------------------------------------------------------------- the steps
step_env() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: ${GPU_SESSION_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}"
    if git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
        echo "git status --short:"; git -C "$ROOT" status --short | head -50
    fi
    echo "host: $(uname -a)"; echo "cpus: $(nproc)"
    free -g 2>/dev/null; df -h "$ROOT" "$WORK" 2>/dev/null
    echo "python: $(command -v "$PY")"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
            --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    if command -v nvcc >/dev/null; then nvcc --version; else echo "nvcc: not on PATH"; fi
    "$PY" - "$RES/versions.json" <<'EOF'
import importlib.metadata as md, json, os, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "executable": sys.executable,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
        "commit": os.environ.get("GPU_SESSION_COMMIT")}
for pkg in ("triton", "numpy", "pytest", "imageio", "imageio-ffmpeg", "setuptools", "ninja"):
    try:
        info[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
        info[pkg] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}",
                memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
if not info["commit"]:
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                        text=True, check=True).stdout.strip()
    except Exception:
        info["commit"] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
}

step_build() {
    if [ "$DRY" = 1 ]; then
        echo "dry run: no CUDA build; checking the installed extension instead"
        run "$PY" -c "import torch, pyface, pyface._C; print('pyface._C loads from', pyface.__file__)"
        return
    fi
    export FORCE_CUDA=1
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    echo "FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    # offline: no dependency resolution, no index (everything pyface needs is on the machine)
    if ! run "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e "$ROOT"; then
        echo "pip install failed; building the extension in place instead"
        run "$PY" setup.py build_ext --inplace || return
    fi
    check_cuda_build
}

check_cuda_build() {
    if [ "$CHECK" = 1 ]; then     # the check itself runs, on this tree's (CPU) build
        local out
        out=$(CHECK=0 check_cuda_build 2>&1) && { echo "$out"; return 0; }
        echo "$out"
        grep -q "built without the CUDA kernels" <<<"$out" || return 1
        echo "gpu_session: check: as expected without a CUDA build; nothing built, so the" \
             "CUDA kernels are not checked"
        return 0
    fi
    "$PY" - <<'EOF'
import json, os, sys
import torch, pyface
cfg_path = os.path.join(os.path.dirname(pyface.__file__), "_build_config.json")
cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
print("build config:", json.dumps(cfg))
import pyface._C  # noqa: F401  (raises when the extension does not load)
if not cfg.get("with_cuda"):
    sys.exit("gpu_session: pyface._C was built without the CUDA kernels")
EOF
}

step_info() {
    "$PY" -m pyface.info --json >"$RES/info.json"
    local rc=$?
    "$PY" -m pyface.info
    return $rc
}

step_gpu_tests() {
    run "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=20 \
        --junitxml="$RES/gpu-tests.xml" "${TESTS[@]}"
}

# one process and one JSON per op family: a family cut short by the timeout loses only itself
step_bench_ops() {
    local family rc=0
    for family in "${OP_FAMILIES[@]}"; do
        run "$PY" -m pyface bench "$family" "${OPS[@]}" --json "$RES/ops-$family-$DEV.json" || rc=1
    done
    return $rc
}

step_data() {
    rm -rf "$DATA" "$TEST"
    run "$PY" -m pyface data synth --out "$DATA" "${SYNTH_TRAIN[@]}" --quiet || return
    run "$PY" -m pyface data synth --out "$TEST" --split test "${SYNTH_TEST[@]}" --quiet
}

# GOHA's goal: avatar build + first frame <= 50 ms, then >= 30 FPS at 512^2 with SR (random
# weights of the full preset)
step_fps_goha_full() {
    run "$PY" tools/bench_goha_infer.py --preset "$GOHA_INFER_PRESET" --device "$DEV" \
        "${GOHA_INFER[@]}" --json "$RES/goha-infer-$GOHA_INFER_PRESET-$DEV.json"
}

# untrained full-size runs (train.steps=0 writes the initial weights as a checkpoint): fps at
# the models' full resolution (OTAvatar's goal: >= 140 FPS at 512^2; MMFA's: >= 150 at 256^2)
step_full_otavatar() {
    # eg3d's full preset reads an FFHQ dataset.json folder: the synthetic frames instead
    local extra=(--set stages.eg3d.data.name=synthetic)
    # the dry run's CPU cannot afford the 100-step source inversion at 512^2
    [ "$DRY" = 1 ] && extra+=(--set model.invert_steps=1)
    short_train otavatar-full otavatar full 0 0 eg3d -- "${extra[@]}"
}
step_animate_otavatar_full() { animate otavatar-full otavatar "$RUNS/otavatar-full"; }
step_full_mmfa() { short_train mmfa-full mmfa full 0 0; }
step_animate_mmfa_full() { animate mmfa-full mmfa "$RUNS/mmfa-full"; }
step_eval_mmfa_full() { evaluate mmfa-full mmfa "$RUNS/mmfa-full"; }

# gpu-short runs cut to a few steps: steps/s and peak memory of every stage of every model
step_train_eg3d() { short_train eg3d eg3d gpu-short "$STEPS_EG3D" 0; }
step_train_goha() { short_train goha goha gpu-short "$STEPS_GOHA" "$STEPS_GOHA" s1 s1_gan; }
step_train_mmfa() { short_train mmfa mmfa_vae gpu-short "$STEPS_MMFA" "$STEPS_MMFA" mmfa; }
step_train_export3d() {
    short_train export3d export3d gpu-short "$STEPS_EXPORT3D" "$STEPS_STAGE" clebs
}
step_train_otavatar() {
    short_train otavatar otavatar gpu-short "$STEPS_OTAVATAR" "$STEPS_STAGE" eg3d
}

step_animate_eg3d() {
    need_dir "$RUNS/eg3d/checkpoints" || return 98
    run "$PY" -m pyface animate eg3d --checkpoint "$RUNS/eg3d" --seeds 0-1 \
        --frames "$ANIM_FRAMES" --device "$DEV" --out "$WORK/anim/eg3d.mp4" --no-progress
}
step_animate_goha() { animate goha goha "$RUNS/goha"; }
step_animate_mmfa() { animate mmfa mmfa "$RUNS/mmfa/stages/mmfa"; }
step_animate_export3d() { animate export3d export3d "$RUNS/export3d"; }
step_animate_otavatar() { animate otavatar otavatar "$RUNS/otavatar"; }
step_eval_goha() { evaluate goha goha "$RUNS/goha"; }
step_eval_export3d() { evaluate export3d export3d "$RUNS/export3d"; }

# fused vs reference ops per training step (python -m pyface.bench.train)
step_bench_train_eg3d() { bench_train eg3d --no-compile --json "$RES/bench-train-eg3d-$DEV.json"; }
step_bench_train_goha() { bench_train goha --no-compile --json "$RES/bench-train-goha-$DEV.json"; }
step_bench_train_mmfa() { bench_train mmfa --no-compile --json "$RES/bench-train-mmfa-$DEV.json"; }
step_bench_train_export3d() {
    bench_train export3d --no-compile --json "$RES/bench-train-export3d-$DEV.json"
}
step_bench_train_otavatar() {
    local extra=()
    # the dry run's CPU: each step inverts its batch 30 times, for two trainers, one W
    # iteration and one controller iteration instead; and the eg3d stage trained first (one
    # step) at batch 2 without previews (its batch 16 at 128^2 took over 15 min)
    [ "$DRY" = 1 ] && extra=(--set model.invert_iters=2 --set model.invert_controller_iters=1
                             --set stages.eg3d.train.batch_size=2
                             --set stages.eg3d.train.image_every=0
                             --set stages.eg3d.train.video_frames=0)
    bench_train otavatar --no-compile "${extra[@]}" --json "$RES/bench-train-otavatar-$DEV.json"
}
# the compile rows compile in their warm-up steps (bench.train refuses --warmup 0 with them);
# the later --warmup of BENCH_COMPILE overrides the one of BENCH_STEPS
step_bench_train_eg3d_compile() {
    bench_train eg3d "${BENCH_COMPILE[@]}" --json "$RES/bench-train-eg3d-compile-$DEV.json"
}
step_bench_ops_compile() {
    run "$PY" -m pyface bench "${OPS_COMPILE[@]}" --json "$RES/ops-compile-$DEV.json"
}

# ---------------------------------------------------------------- the runner
usage() {
    sed -n '2,/^set -uo/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'
}

list_steps() {
    printf '%-28s %-7s %s\n' step phase cap_s
    awk 'NF {printf "%-28s %-7s %s\n", $1, $2, $3}' <<<"$STEPS"
}

# ---------------------------------------------------------------- running a step
# `timeout` (not --foreground) makes itself the leader of a new process group, so the group of
# a step is the pid of its `timeout`. On expiry `timeout` sends SIGTERM to the whole group, but
# it returns as soon as the step's bash exits, which bash does at once: a process that handles
# SIGTERM (a trainer finishing its step and writing its checkpoint) would outlive the step.
# end_group waits up to KILL_AFTER seconds for what is left of the group (after a SIGTERM when
# the step ended by itself), then kills it, so no step overlaps the next one.
KILL_AFTER=${GPU_SESSION_KILL_AFTER_S:-20}
STEP_PID="" LEFT_OVER=0
# a live process in group $1; zombies do not count (an init that reaps nothing leaves them)
group_alive() {
    if command -v ps >/dev/null; then
        ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {f = 1} END {exit !f}'
    else
        kill -0 -- "-$1" 2>/dev/null
    fi
}
end_group() {                     # end_group PGID SIGNALLED(0/1): sets LEFT_OVER (0/1)
    LEFT_OVER=0
    group_alive "$1" || return 0
    sleep 0.5                     # a process killed with its `timeout` is gone by then
    group_alive "$1" || return 0
    LEFT_OVER=1
    [ "$2" = 1 ] || kill -TERM -- "-$1" 2>/dev/null
    local waited=0
    while group_alive "$1" && [ "$waited" -lt $((KILL_AFTER * 5)) ]; do
        sleep 0.2
        waited=$((waited + 1))
    done
    group_alive "$1" && kill -KILL -- "-$1" 2>/dev/null
    return 0
}
run_limited() {                   # run_limited LIMIT LOG CMD...: the exit code of CMD (124: timeout)
    local lim=$1 out=$2 code
    shift 2
    timeout --signal=TERM --kill-after="$KILL_AFTER" "$lim" "$@" >"$out" 2>&1 </dev/null &
    STEP_PID=$!
    wait "$STEP_PID" 2>/dev/null  # (bash's "Killed" line when `timeout` kills its own group)
    code=$?
    end_group "$STEP_PID" "$([ "$code" = 124 ] || [ "$code" = 137 ] && echo 1 || echo 0)"
    if [ "$LEFT_OVER" = 1 ]; then
        echo "gpu_session: processes of this step were still running after it ended: stopped" \
            "(SIGTERM, SIGKILL after ${KILL_AFTER} s)" >>"$out"
    fi
    STEP_PID=""
    return "$code"
}

# internal, for tests: run_limited alone
if [ "${1:-}" = __limited ]; then
    shift
    run_limited "$@"
    exit $?
fi

# internal: one step, in its own process (so that `timeout` can stop all of it)
if [ "${1:-}" = __step ]; then
    RES=$2
    configure
    cd "$ROOT" || exit 1
    "step_$3"
    exit $?
fi

OUT="" DRY_FLAG=0 CHECK_FLAG=0 SELECTION=()
for arg in "$@"; do
    case "$arg" in
        --list) list_steps; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY_FLAG=1 ;;
        --check) CHECK_FLAG=1 ;;
        -*) echo "gpu_session: unknown option $arg (expected --dry-run, --check, --list, --help)" >&2
            exit 2 ;;
        *) if [ -z "$OUT" ]; then OUT=$arg; else SELECTION+=("${arg//,/ }"); fi ;;
    esac
done
if [ -z "$OUT" ]; then
    echo "gpu_session: expected an output folder: bash bench/gpu_session.sh OUT [SELECTION ...]" >&2
    exit 2
fi
[ "$DRY_FLAG" = 1 ] && DRY=1
if [ "$CHECK_FLAG" = 1 ] && [ "$CHECK" != 1 ]; then
    CHECK=1
    WORK=${GPU_SESSION_WORK:-/tmp/pyface-gpu-session-check}
    set_paths
fi
if [ "$DRY" = 1 ] && [ "$CHECK" = 1 ]; then
    echo "gpu_session: --dry-run (GPU_SESSION_DRY_RUN=1) runs the tiniest sizes and --check" \
         "(GPU_SESSION_CHECK=1) checks the GPU run's command lines: give one of them" >&2
    exit 2
fi
if [ "$DRY" = 1 ]; then DEV=cpu; fi
read -r -a SELECTION <<<"${SELECTION[*]:-all}"

# the selected steps, in table order
declare -A WANT=()
for sel in "${SELECTION[@]}"; do
    case "$sel" in
        all) for s in $(table_names); do WANT[$s]=1; done ;;
        phase1|phase2|phase3)
            for s in $(table_names); do [ "$(table_field "$s" 2)" = "$sel" ] && WANT[$s]=1; done ;;
        *) if [ -z "$(table_field "$sel" 1)" ]; then
               echo "gpu_session: unknown step or phase '$sel' (expected all, phase1, phase2," \
                    "phase3 or a step of --list)" >&2
               exit 2
           fi
           WANT[$sel]=1 ;;
    esac
done
ORDER=()
for s in $(table_names); do [ -n "${WANT[$s]:-}" ] && ORDER+=("$s"); done

LABEL=$(IFS=-; echo "${SELECTION[*]}" | tr -c 'A-Za-z0-9._\n-' '_' | cut -c1-60)
[ "$DRY" = 1 ] && LABEL="dry-$LABEL"
[ "$CHECK" = 1 ] && LABEL="check-$LABEL"
if [ "$DRY" = 1 ]; then BUDGET=${GPU_SESSION_BUDGET_S:-7200}
elif [ "$CHECK" = 1 ]; then BUDGET=${GPU_SESSION_BUDGET_S:-1800}
else BUDGET=${GPU_SESSION_BUDGET_S:-540}; fi
mkdir -p "$OUT" "$WORK" || exit 1
OUT=$(cd "$OUT" && pwd)
RES=$WORK/results/$LABEL
rm -rf "$RES"
mkdir -p "$RES/logs" "$WORK/anim" "$RUNS" || exit 1

export GPU_SESSION_DRY_RUN=$DRY GPU_SESSION_CHECK=$CHECK GPU_SESSION_WORK=$WORK PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}     # this tree's pyface, whatever pip did
export PYFACE_CACHE=$WORK/cache TORCHINDUCTOR_CACHE_DIR=$WORK/inductor
export TRITON_CACHE_DIR=$WORK/triton MPLCONFIGDIR=$WORK/mpl
[ -z "${GPU_SESSION_COMMIT:-}" ] && GPU_SESSION_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null)
export GPU_SESSION_COMMIT

SUMMARY=$RES/summary.tsv
printf 'step\tphase\tstatus\trc\tseconds\tlimit_s\tlog\n' >"$SUMMARY"
publish() {
    cp "$SUMMARY" "$OUT/gpu-session-$LABEL-summary.tsv"
    tar -czf "$OUT/gpu-session-$LABEL.tar.gz.tmp" -C "$WORK/results" "$LABEL" &&
        mv "$OUT/gpu-session-$LABEL.tar.gz.tmp" "$OUT/gpu-session-$LABEL.tar.gz"
}

echo "gpu_session: ${#ORDER[@]} steps (${ORDER[*]}), budget ${BUDGET} s, device $DEV," \
     "python $PY, work $WORK, results $OUT/gpu-session-$LABEL.tar.gz"
[ "$CHECK" = 1 ] && echo "gpu_session: check: each command of the GPU run is checked, not run"
START=$(date +%s)
# a step that does not find the CUDA build (phase2/3 on a fresh machine) builds first
if [ "$DRY" != 1 ] && [ "$CHECK" != 1 ] && [ -z "${WANT[build]:-}" ]; then
    if ! (cd "$ROOT" && RES=$RES check_cuda_build >"$RES/logs/00-check-build.log" 2>&1); then
        echo "gpu_session: no CUDA build of pyface here: adding the build step"
        ORDER=(build "${ORDER[@]}")
    fi
fi

# stopped from outside (SIGTERM, Ctrl-C): stop the running step's process group too (its
# `timeout` passes the signal on), record it and publish what was done
CURRENT=""
on_signal() {
    trap - TERM INT
    if [ -n "$STEP_PID" ]; then
        kill -TERM "$STEP_PID" 2>/dev/null
        wait "$STEP_PID" 2>/dev/null
        end_group "$STEP_PID" 1
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$CURRENT" "$(table_field "$CURRENT" 2)" \
            interrupted 143 $(($(date +%s) - t0)) "$limit" "$log" >>"$SUMMARY"
    fi
    echo "gpu_session: stopped by a signal during ${CURRENT:-the setup}"
    publish
    exit 143
}
trap on_signal TERM INT

n=0
for s in "${ORDER[@]}"; do
    n=$((n + 1))
    phase=$(table_field "$s" 2)
    cap=$(table_field "$s" 3)
    [ "$DRY" = 1 ] && cap=$DRY_CAP
    [ "$CHECK" = 1 ] && cap=$CHECK_CAP
    left=$((BUDGET - ($(date +%s) - START)))
    limit=$(( cap < left - 10 ? cap : left - 10 ))
    log=logs/$(printf '%02d' "$n")-$s.log
    if [ "$limit" -lt 15 ]; then
        status=skipped-budget rc="" secs=0 limit=0
        echo "budget: ${left} s left of ${BUDGET} s" >"$RES/$log"
    else
        t0=$(date +%s)
        CURRENT=$s
        run_limited "$limit" "$RES/$log" bash "$SCRIPT" __step "$RES" "$s"
        rc=$?
        secs=$(($(date +%s) - t0))
        case $rc in
            0) status=ok ;;
            124|137) status=timeout ;;
            98) status=skipped-input ;;
            *) status=failed ;;
        esac
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$phase" "$status" "$rc" "$secs" "$limit" "$log" \
        >>"$SUMMARY"
    printf 'gpu_session: %-26s %-14s rc=%-4s %4ss (limit %ss)\n' "$s" "$status" "$rc" "$secs" "$limit"
    if [ "$status" = failed ] || [ "$status" = timeout ]; then
        tail -n 5 "$RES/$log" | sed 's/^/    | /'
    fi
    publish
done
total=$(($(date +%s) - START))
echo "gpu_session: done in ${total} s; $OUT/gpu-session-$LABEL.tar.gz"
publish
if grep -qP '\t(failed|timeout)\t' "$SUMMARY"; then exit 1; fi
exit 0
