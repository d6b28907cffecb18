#!/usr/bin/env bash
# One-shot GPU validation and benchmarks of deit-fast on one CUDA GPU, in under 8 minutes:
# the environment, the compile check (first, so no minute goes to a kernel that cannot
# build), `pytest -m gpu`, the kernel microbenchmarks (% of the measured peak), the DALI
# training pipeline on the GPU (img/s, images against the CPU graph), the GPU-decode
# benchmark, the cached-vs-online distillation step (RegNetY-16GF teacher, DeiT-S student),
# a short real training run on generated JPEGs with every Triton kernel on (the loss must
# fall, with no NaN) and, last, the training-step benchmark under
# torch.cuda.set_sync_debug_mode("error"), each setting's img/s printed beside the bound of
# the committed traffic table (benchmarks/traffic.py). Logs and CSVs go to OUTDIR, and a
# summary table (stage, status, seconds, note) is written there and printed last.
#
#   scripts/gpu_check.sh OUTDIR [--dry-run] [--skip STAGE[,STAGE...]] [--budget STAGE=SECONDS]
#   stages: env compile tests kernels dali decode distill train step;  PYTHON picks python3
#
# Budgets on the GPU (seconds; a stage past its budget is stopped, reported as timed out,
# and the rest still run): env 20, compile 35, tests 60, kernels 50, dali 40, decode 15,
# distill 35, train 45, and the step benchmark, last, whatever is left of 450 (>= 150).
# 450 s leaves room under 8 minutes for the summary; the machine's start-up and the calls
# that carry DALI's parts come on top (README, "GPU"). A stage whose script is absent is
# skipped and says so. A failing compile check does not stop the kernel stages; their
# notes and the summary flag it.
#
# Without a CUDA GPU, or with --dry-run, it runs what a CPU can in smoke form (the compile
# check's --quick subset, kernel and step benchmarks under the Triton interpreter, the DALI
# graph on the CPU, the CPU decoders, the demo's models for distillation, two CPU training
# steps) and says which stages it skipped and why. It needs only torch, triton,
# torchvision, timm, numpy, pyyaml, pillow, scikit-image, pytest and the trainer's tqdm,
# tensorboard and matplotlib (the env stage lists what is missing; DALI comes from
# scripts/unpack_dali.sh, below), no network, and runs the repository with PYTHONPATH=.
#
# DALI: where `import nvidia.dali` fails and DALI_PARTS (build/dali_parts) holds the parts
# of scripts/pack_dali.sh, the dali stage unpacks them into DALI_DEST (/tmp/deit_fast_dali;
# reused by a rerun) and puts that on PYTHONPATH. Without DALI the stage is skipped, and the
# decode stage's torchvision decode_jpeg(device="cuda") row is the GPU decode figure.
# Exit status: 0 when no stage failed. On a machine whose files come back from a folder,
# e.g.:  scripts/gpu_check.sh /tmp/gc; tar -czf "$OUT/gpu_check.tgz" -C /tmp gc
# To rerun one stage with more time:  scripts/gpu_check.sh DIR --skip env,compile,tests,\
#   kernels,dali,decode,distill,train --budget step=420
set -u  # no -e: one failed stage must not stop the others or the summary

STAGES="env compile tests kernels dali decode distill train step"
# The budgets of the header. A dry run allows DRY_SLOWDOWN times as long: CI's CPUs are
# slow and shared.
TOTAL_BUDGET=450
declare -A BUDGET=([env]=20 [compile]=35 [tests]=60 [kernels]=50 [dali]=40 [decode]=15
    [distill]=35 [train]=45 [step]=$TOTAL_BUDGET)
DRY_SLOWDOWN=6
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

# Returns 0 when the benchmark script $1 exists; else sets the skip note and returns 1.
have_script() {
    [[ -f $REPO/$1 ]] && return
    NOTE="skipped: $1 missing"
    return 1
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
TRAINER = ("tqdm", "tensorboard", "matplotlib", "skimage")  # the trainer's, dali_gpu.py's
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

stage_compile() {
    have_script benchmarks/compile.py || return $SKIP_RC
    local -a args=(--arch 90 --jobs "$(nproc)")
    # No GPU is needed to compile; the dry run takes the CI subset.
    [[ -z $DRY_REASON ]] || args=(--quick)
    within_stage "$PY" benchmarks/compile.py "${args[@]}" --out "$OUTDIR/compile"
    local rc=$?
    NOTE=$(log_line '[0-9]+ compiles, ')
    ((rc == 0)) || COMPILE_FLAG="compile check did not pass (${NOTE:-exit $rc})"
    [[ -z $DRY_REASON ]] || NOTE="CI subset (--quick) on the CPU: $NOTE"
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

# Each setting's measured img/s beside the bound the committed traffic table
# (benchmarks/results/traffic.csv) sets for the same model, kernels and GPU: the bound is a
# count, not a measurement, so it is read, not recomputed here. Into step_vs_bound.txt.
compare_to_bound() {
    local csv
    csv=$(compgen -G "$OUTDIR/step_*.csv" | head -n 1)
    [[ -n $csv && -f $REPO/benchmarks/traffic.py ]] || return 0
    within_stage bash -c '"$1" benchmarks/traffic.py --compare "$2" >"$3"' _ "$PY" "$csv" \
        "$OUTDIR/step_vs_bound.txt" && tee -a "$LOG" <"$OUTDIR/step_vs_bound.txt"
}

stage_step() {
    if [[ -n $DRY_REASON ]]; then
        NOTE="smoke: one-block model at 32 px, fp32, Triton interpreted"
        within_stage "$PY" benchmarks/step.py --smoke --out "$OUTDIR" || return
        compare_to_bound
        return
    fi
    # Every timed step under set_sync_debug_mode("error"), where step.py offers it.
    local -a sync=()
    local sync_note="timed under sync debug mode \"error\""
    if grep -q -- '"--sync-debug"' benchmarks/step.py; then
        sync=(--sync-debug)
    else
        sync_note="step.py has no --sync-debug: host syncs not checked"
    fi
    # Start no row in the last 95 s: compiling a model can take 75, the comparison 20.
    within_stage "$PY" benchmarks/step.py --models small,base,tiny --steps 20 --warmup 8 \
        "${sync[@]}" --budget-s $((STAGE_END - SECONDS - 95)) --out "$OUTDIR"
    local rc=$?
    compare_to_bound
    NOTE="$(target_counts); $(grep -c 'skipped: time budget' "$LOG") rows over budget; $sync_note"
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

# Puts DALI on PYTHONPATH from the parts in DALI_PARTS, if it is not importable already.
# Returns 1, with the reason in NOTE, when DALI stays out of reach.
bring_dali() {
    local parts=${DALI_PARTS:-$REPO/build/dali_parts} dest=${DALI_DEST:-/tmp/deit_fast_dali}
    "$PY" -c 'import nvidia.dali' >>"$LOG" 2>&1 && return
    echo "DALI is not importable: looking for the parts of scripts/pack_dali.sh in $parts" >>"$LOG"
    if [[ ! -f $parts/SHA256SUMS ]]; then
        NOTE="DALI not importable and no parts in $parts (scripts/pack_dali.sh)"
        return 1
    fi
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        NOTE="DALI not importable; the parts in $parts are for Python 3.12, not $("$PY" -V 2>&1)"
        return 1
    fi
    # unpack_dali.sh prints one line, the PYTHONPATH export; its progress goes to the log.
    within_stage bash -c 'scripts/unpack_dali.sh "$1" "$2" >"$3"' _ "$parts" "$dest" \
        "$WORK/dali_env" || { NOTE="unpack_dali.sh failed: $(tail -n 1 "$LOG")"; return 1; }
    cat "$WORK/dali_env" >>"$LOG"
    eval "$(cat "$WORK/dali_env")"
    "$PY" -c 'import nvidia.dali' >>"$LOG" 2>&1 ||
        { NOTE="DALI unpacked into $dest but not importable: $(tail -n 1 "$LOG")"; return 1; }
}

stage_dali() {
    have_script benchmarks/dali_gpu.py || return $SKIP_RC
    if ! bring_dali; then
        NOTE="$NOTE; the decode stage's decode_jpeg(device=\"cuda\") is the GPU decode figure"
        return $SKIP_RC
    fi
    if [[ -n $DRY_REASON ]]; then
        NOTE="smoke: the CPU graph (device_id=None) on 24 JPEGs"
        within_stage "$PY" benchmarks/dali_gpu.py --smoke --out "$OUTDIR"
    else
        within_stage "$PY" benchmarks/dali_gpu.py --out "$OUTDIR"
    fi
    local rc=$?
    [[ -n $DRY_REASON ]] || NOTE=$(target_counts)
    NOTE=$(printf '%s\n' "$NOTE" "$(log_line 'DALI: ' | cut -c7-)" \
        "$(log_line CHECK: | cut -c8- | cut -d, -f1-2)" | sed '/^$/d' | paste -sd';' - |
        sed 's/;/; /g')
    return $rc
}

stage_distill() {
    have_script benchmarks/distill.py || return $SKIP_RC
    local -a args=(--teacher regnety_160 --student deit_small_distilled_patch16_224
        --img-size 224 --classes 1000 --batch 256)
    [[ -z $DRY_REASON ]] || args=(--batch 4 --steps 2 --warmup 1)  # the demo's models, 32 px
    within_stage "$PY" benchmarks/distill.py "${args[@]}" --out "$OUTDIR/distill"
    local rc=$?
    # Rows "none|hard, cached teacher|hard, online teacher  ms/step  img/s  vs_cached".
    NOTE=$(awk '/^(none|hard, (cached|online) teacher) / { ms[$1 == "none" ? $1 : $2] = $(NF-2) }
        END { if (ms["cached"]) printf "ms/step: none %s, cached %s, online %s; cached/none " \
            "%.2fx", ms["none"], ms["cached"], ms["online"], ms["cached"] / ms["none"] }' "$LOG")
    [[ -z $DRY_REASON ]] || NOTE="smoke: the demo's models at 32 px; $NOTE"
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
SLOWDOWN=1 COMPILE_FLAG=""
KERNEL_STAGES=" tests kernels distill train step "  # they run the Triton kernels
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
            [[ -z $COMPILE_FLAG || $KERNEL_STAGES != *" $stage "* ]] ||
                NOTE="$NOTE; after a failed compile check"
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
    [[ -z $COMPILE_FLAG ]] || echo "FLAG: $COMPILE_FLAG; the kernel stages ran all the same"
    awk -F'\t' '{ printf "%-8s %-6s %7s  %s\n", $1, $2, $3, $4 }' "$SUMMARY"
} | tee "$OUTDIR/summary.txt"
! grep -q $'\tFAIL\t' "$SUMMARY"
