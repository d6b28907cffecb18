#!/usr/bin/env bash
# One-shot GPU validation and benchmarks of deit-fast on one CUDA GPU, in under 8 minutes:
# the environment, `pytest -m gpu`, the kernel microbenchmarks, the training-step benchmark,
# the GPU-decode benchmark and a short real training run on generated JPEGs with every
# Triton kernel on (the loss must fall, with no NaN). Logs and CSVs go to OUTDIR, and a
# summary table (stage, status, seconds, note) is written there and printed last.
#
#   scripts/gpu_check.sh OUTDIR [--dry-run] [--skip STAGE[,STAGE...]] [--budget STAGE=SECONDS]
#   stages: env tests kernels decode train step;  PYTHON picks the interpreter (python3)
#
# Without a CUDA GPU, or with --dry-run, it runs what a CPU can in smoke form (kernel and
# step benchmarks under the Triton interpreter, the CPU decoders, two CPU training steps)
# and says which stages it skipped and why. It needs only torch, triton, torchvision, timm,
# numpy, pyyaml, pillow and pytest, no network, and runs the repository with PYTHONPATH=.
# Exit status: 0 when no stage failed. On a machine whose files come back from a folder,
# e.g.:  scripts/gpu_check.sh /tmp/gc; tar -czf "$OUT/gpu_check.tgz" -C /tmp gc
# To rerun one stage with more time:  scripts/gpu_check.sh DIR --skip env,tests,kernels,\
#   decode,train --budget step=420
set -u  # no -e: one failed stage must not stop the others or the summary

STAGES="env tests kernels decode train step"
# At most this many seconds per stage on the GPU, and 450 s in all (leaving room under 8
# minutes for the summary); the step benchmark, last, gets whatever time the others leave
# (>= 170 s). A dry run allows DRY_SLOWDOWN times as long: CI's CPUs are slow and shared.
TOTAL_BUDGET=450
declare -A BUDGET=([env]=30 [tests]=90 [kernels]=70 [decode]=30 [train]=60 [step]=$TOTAL_BUDGET)
DRY_SLOWDOWN=4
SKIP_RC=99  # a stage function returns this for "skipped", with the reason in NOTE

usage() {
    echo "usage: $0 OUTDIR [--dry-run] [--skip STAGE[,STAGE...]] [--budget STAGE=SECONDS]" \
        "(stages: $STAGES)" >&2
    exit 2
}

OUTDIR="" DRY_REASON="" SKIP_LIST=""
while (($#)); do
    case $1 in
        --dry-run) DRY_REASON="--dry-run given" ;;
        --skip) (($# > 1)) || usage; SKIP_LIST=${2//,/ }; shift ;;
        --budget)
            [[ ${2:-} =~ ^([a-z]+)=([0-9]+)$ && -n ${BUDGET[${BASH_REMATCH[1]}]:-} ]] || usage
            BUDGET[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
            ((BUDGET[${BASH_REMATCH[1]}] <= TOTAL_BUDGET)) || TOTAL_BUDGET=${BASH_REMATCH[2]}
            shift
            ;;
        -h | --help) usage ;;
        -*) usage ;;
        *) [[ -z $OUTDIR ]] || usage; OUTDIR=$1 ;;
    esac
    shift
done
[[ -n $OUTDIR ]] || usage
for s in $SKIP_LIST; do
    [[ " $STAGES " == *" $s "* ]] || { echo "--skip: unknown stage '$s' ($STAGES)" >&2; exit 2; }
done

PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
WORK=$(mktemp -d) || exit 2  # generated images and the training run (checkpoints are big)
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$OUTDIR/summary.tsv"
printf 'stage\tstatus\tseconds\tnote\n' >"$SUMMARY"

if [[ -z $DRY_REASON ]] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
    >/dev/null 2>&1; then
    DRY_REASON="no CUDA GPU: torch.cuda.is_available() is False"
fi
# The GPU runs compiled kernels; the dry run needs the interpreter, set before triton loads.
if [[ -n $DRY_REASON ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # smoke forms on the CPU, GPU or not
else
    export TRITON_INTERPRET=0
fi

# Runs "$@" under the time left to the current stage, appending its output to the stage log.
within_stage() {
    local left=$((STAGE_END - SECONDS))
    ((left > 0)) || return 124
    timeout -k 10 "$left" "$@" >>"$LOG" 2>&1
}

# The last line of the stage log that starts with $1 (a verdict or summary line), or "".
log_line() { grep -E "^$1" "$LOG" 2>/dev/null | tail -n 1; }

# PASS/MISS counts of the benchmark target lines in the stage log.
target_counts() {
    local pass miss
    pass=$(grep -c '^PASS ' "$LOG") miss=$(grep -c '^MISS ' "$LOG")
    echo "targets: $pass PASS, $miss MISS$( ((miss)) && echo " ($(grep '^MISS ' "$LOG" |
        head -n 3 | cut -c6- | paste -sd';' -))")"
}

# ---------------------------------------------------------------------------- stages
stage_env() {
    {
        echo "date: $(date -u +%FT%TZ)  host: $(uname -srm)  repo: $REPO"
        if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    } >>"$LOG" 2>&1
    within_stage "$PY" - <<'EOF'
import importlib, platform, sys

NEEDED = ("torch", "triton", "torchvision", "timm", "numpy", "yaml", "PIL", "pytest")
TRAINER = ("tqdm", "tensorboard", "matplotlib")  # deit_fast's trainer imports these
print("python", platform.python_version(), sys.executable)
versions, missing = {}, []
for name in (*NEEDED, *TRAINER, "nvidia.dali"):
    try:
        versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as err:  # absent or broken: say so and go on
        versions[name] = f"MISSING ({type(err).__name__}: {err})"
        missing += [name] if name != "nvidia.dali" else []
    print(f"{name:<12} {versions[name]}")
import torch

gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
print(f"cuda {torch.version.cuda}, available: {torch.cuda.is_available()}, device: {gpu}")
print(f"ENV: {gpu} | torch {versions['torch']} | triton {versions['triton']} | timm "
      f"{versions['timm']} | missing: {' '.join(missing) or 'none'}")
sys.exit(any(name in missing for name in NEEDED))
EOF
    local rc=$?
    cat "$LOG"
    NOTE=$(log_line ENV: | cut -c6-)
    return $rc
}

stage_tests() {
    if [[ -n $DRY_REASON ]]; then NOTE="needs a CUDA GPU; $DRY_REASON"; return $SKIP_RC; fi
    within_stage "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
    local rc=$?
    NOTE=$(grep -E ' in [0-9.]+s' "$LOG" | tail -n 1 | tr -d '=' | xargs)  # pytest's tally
    return $rc
}

stage_kernels() {
    if [[ -n $DRY_REASON ]]; then
        NOTE="smoke: tiny shapes under the Triton interpreter"
        within_stage "$PY" benchmarks/kernel_bench.py --smoke --out "$OUTDIR"
        return
    fi
    # Start no new shape in the last 20 s of the stage; rows measured so far are kept.
    within_stage "$PY" benchmarks/kernel_bench.py --budget-s $((STAGE_END - SECONDS - 20)) \
        --out "$OUTDIR"
    local rc=$?
    NOTE=$(target_counts)
    return $rc
}

stage_step() {
    if [[ -n $DRY_REASON ]]; then
        NOTE="smoke: one-block model at 32 px, fp32, Triton interpreted"
        within_stage "$PY" benchmarks/step.py --smoke --out "$OUTDIR"
        return
    fi
    # Start no row in the last 75 s: compiling a model can take that long.
    within_stage "$PY" benchmarks/step.py --models small,base,tiny --steps 20 --warmup 8 \
        --budget-s $((STAGE_END - SECONDS - 75)) --out "$OUTDIR"
    local rc=$?
    NOTE="$(target_counts); $(grep -c 'skipped: time budget' "$LOG") rows over budget"
    return $rc
}

stage_decode() {
    if [[ -n $DRY_REASON ]]; then
        NOTE="smoke: CPU decoders on 8 small JPEGs; nvJPEG rows skipped"
        within_stage "$PY" benchmarks/gpu_decode.py --smoke --out "$OUTDIR"
        return
    fi
    within_stage "$PY" benchmarks/gpu_decode.py --reps 3 --out "$OUTDIR"
    local rc=$?
    NOTE=$(log_line 'GPU batched decode:')
    return $rc
}

stage_train() {
    local data="$WORK/data" run="$WORK/run" classes per_class size model
    # Erasing stays on (0.25): on the GPU the main process normalizes and erases the batch.
    local -a args=(data.path="$data" data.backend=torch
        data.repeats=1 data.rand_augment=null data.mixup=0 data.cutmix=0 data.reprob=0.25
        optim.lr=1e-3 optim.scale_lr=false train.progress=false train.resume=false
        train.output_dir="$run")
    if [[ -n $DRY_REASON ]]; then
        # The interpreter takes minutes for one DeiT-Ti step: the dry run uses torch kernels,
        # and the 32 px demo model.
        classes=4 per_class=4 size=32 model=deit_micro_patch4_32
        args+=(kernels.attention=sdpa kernels.layernorm=torch kernels.gelu=torch
            train.precision=fp32 train.device=cpu data.batch_size=8 data.eval_batch_size=8
            data.num_workers=0 train.epochs=1 train.log_interval=1)
    else
        # 2560 images / 128 = 20 steps an epoch, 12 epochs: 240 steps.
        classes=10 per_class=256 size=64 model=deit_tiny_patch16_224
        args+=(kernels.attention=triton kernels.layernorm=triton kernels.gelu=triton
            train.precision=bf16 train.device=cuda data.batch_size=128 data.eval_batch_size=256
            data.num_workers=8 optim.warmup_epochs=1 train.epochs=12 train.eval_interval=4
            train.log_interval=10)
    fi
    args+=("model.name=$model" "model.img_size=$size")
    # Each class has its own mean colour under per-pixel noise: a cue a ViT learns fast.
    within_stage "$PY" - "$data" "$classes" "$per_class" "$size" <<'EOF' || return
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, classes, per_class, size = Path(sys.argv[1]), *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
palette = rng.integers(0, 256, (classes, 3))
for split, count in (("train", per_class), ("val", max(2, per_class // 8))):
    for c in range(classes):
        folder = root / split / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = 0.6 * palette[c] + 0.4 * rng.integers(0, 256, (size, size, 3))
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
print(f"generated {classes} classes x {per_class} train images at {size} px in {root}")
EOF
    within_stage "$PY" -m deit_fast train "${args[@]}"
    local rc=$?
    cp "$run/metrics.jsonl" "$OUTDIR/train_metrics.jsonl" 2>/dev/null
    cp "$run/curves.png" "$OUTDIR/train_curves.png" 2>/dev/null
    ((rc == 0)) || return $rc
    # Every logged loss finite and no step skipped as NaN/inf; on the GPU the last logged loss
    # under 0.75x the first.
    within_stage "$PY" - "$run/metrics.jsonl" "$([[ -n $DRY_REASON ]] && echo 0 || echo 1)" <<'EOF'
import json, math, sys

records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
losses = [r["loss"] for r in records if "loss" in r]
evals = [r for r in records if "top1" in r]
top1 = f", val top-1 {evals[-1]['top1']:.0f}%" if evals else ""
bad_steps = max((r.get("bad_steps", 0) for r in records), default=0)
if not losses or not all(math.isfinite(v) for v in losses) or bad_steps:
    print(f"TRAIN: {bad_steps} steps skipped as NaN/inf; logged losses {losses}")
    sys.exit(1)
text = f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over step {records[-1]['step']}{top1}"
if sys.argv[2] == "0":
    print(f"TRAIN: {text}, all finite, none skipped (a dry run does not check the fall)")
elif losses[-1] < 0.75 * losses[0]:
    print(f"TRAIN: {text}, all finite, none skipped")
else:
    print(f"TRAIN: {text}: the last is not below 0.75x the first")
    sys.exit(1)
EOF
    rc=$?
    NOTE="$(log_line TRAIN: | cut -c8-)"
    [[ -z $DRY_REASON ]] || NOTE="2 CPU steps with torch kernels: $NOTE"
    return $rc
}

# ---------------------------------------------------------------------------- driver
SLOWDOWN=1
[[ -z $DRY_REASON ]] || SLOWDOWN=$DRY_SLOWDOWN
DEADLINE=$((SECONDS + SLOWDOWN * TOTAL_BUDGET))
for stage in $STAGES; do
    LOG="$OUTDIR/$stage.log" NOTE="" start=$SECONDS
    : >"$LOG"
    if [[ " $SKIP_LIST " == *" $stage "* ]]; then
        status=SKIP NOTE="skipped with --skip"
    else
        budget=$((SLOWDOWN * BUDGET[$stage]))
        ((budget <= DEADLINE - SECONDS)) || budget=$((DEADLINE - SECONDS))
        if ((budget < 10)); then
            status=SKIP NOTE="no time left of the $((SLOWDOWN * TOTAL_BUDGET))s budget"
        else
            echo "=== $stage (at most ${budget}s; log: $LOG)"
            STAGE_END=$((SECONDS + budget))
            stage_"$stage"
            rc=$?
            case $rc in
                0) status=PASS ;;
                "$SKIP_RC") status=SKIP ;;
                124 | 137) status=FAIL NOTE="timed out after ${budget}s${NOTE:+; $NOTE}" ;;
                *) status=FAIL NOTE="exit $rc: $(tail -n 1 "$LOG" | cut -c1-150)${NOTE:+; $NOTE}" ;;
            esac
            [[ $stage == env ]] || tail -n 4 "$LOG"
        fi
    fi
    printf '%s\t%s\t%s\t%s\n' "$stage" "$status" $((SECONDS - start)) "${NOTE//$'\t'/ }" \
        >>"$SUMMARY"
done

{
    echo
    if [[ -n $DRY_REASON ]]; then
        echo "gpu_check DRY RUN ($DRY_REASON): CPU smoke forms only, nothing measured"
    else
        echo "gpu_check on the GPU"
    fi
    echo "total ${SECONDS}s | logs and CSVs in $OUTDIR"
    awk -F'\t' '$2 == "SKIP" { printf "skipped: %s (%s)\n", $1, $4 }' "$SUMMARY"
    awk -F'\t' '{ printf "%-8s %-6s %7s  %s\n", $1, $2, $3, $4 }' "$SUMMARY"
} | tee "$OUTDIR/summary.txt"
! grep -q $'\tFAIL\t' "$SUMMARY"
