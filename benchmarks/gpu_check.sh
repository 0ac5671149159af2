#!/usr/bin/env bash
# make gpu-check: on one CUDA GPU (sized for <= 8 minutes on an H100), the `gpu` tests, the attention, MoE and
# training benchmarks, and a 2-job gpu_pool sweep packed on device 0; results in benchmarks/gpu_check/:
# summary.md (tables, checks, the step log), CSVs, JSON, figures, and each step's log under logs/.
#
#   GPU_CHECK_DRY=1     print the commands (one per line, "name: command") and run nothing
#   GPU_CHECK_OUT=dir   write there instead of benchmarks/gpu_check (it is replaced)
#   PYTHON=interpreter  default: python (make gpu-check passes the venv's)
#
# Each step runs under its own time limit (the limits add up to 8 minutes); a step that fails or runs out of time is
# recorded and the next one runs; the exit status is non-zero when any step failed. Without a visible CUDA device
# the script stops at once with one line.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-benchmarks/gpu_check}
DRY=${GPU_CHECK_DRY:-0}
if [[ "$DRY" != 0 && "$DRY" != 1 ]]; then
    echo "gpu-check: Invalid GPU_CHECK_DRY=$DRY; allowed: 0 (run) or 1 (print the commands)" >&2
    exit 2
fi
if [[ "$DRY" == 0 ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu-check: no CUDA device visible to $PY (torch.cuda.is_available() is False); run it on a GPU node" \
         "after make install DEVICE=cuda" >&2
    exit 2
fi

SWEEP_STEPS=300  # per job, base preset (batch 24 x 512): long enough that the packed jobs overlap for most of it
FAILED=0
START=$SECONDS

# step NAME LIMIT_S COMMAND...: run COMMAND with its output in logs/NAME.log, record "name rc seconds" in steps.tsv
step() {
    local name=$1 limit=$2
    shift 2
    if [[ "$DRY" == 1 ]]; then
        printf '%s:' "$name"
        printf ' %q' "$@"
        printf '\n'
        return 0
    fi
    local t0=$SECONDS rc=0
    echo "gpu-check: $name (limit ${limit}s) ..."
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1 || rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$OUT/steps.tsv"
    if [[ $rc -ne 0 ]]; then
        FAILED=1
        echo "gpu-check: $name failed (exit $rc$([[ $rc -eq 124 ]] && echo ', time limit')); see $OUT/logs/$name.log"
    fi
}

if [[ "$DRY" == 0 ]]; then
    if [[ -d "$OUT" && ! -f "$OUT/steps.tsv" && -n "$(ls -A "$OUT")" ]]; then
        echo "gpu-check: Invalid GPU_CHECK_OUT=$OUT; allowed: a new folder or an earlier gpu-check's (it is replaced)" >&2
        exit 2
    fi
    rm -rf "$OUT"
    mkdir -p "$OUT/logs"
    printf 'step\trc\tseconds\tlimit_s\n' >"$OUT/steps.tsv"
    ENV_LINE="import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name())"
    { nvidia-smi 2>&1 || true; "$PY" -c "$ENV_LINE"; } >"$OUT/environment.txt"
fi

# the default corpus (the sweep's data): verified when cached, built otherwise
step data 30 "$PY" -m kimi_lab.data.prepare data=default
step pytest_gpu 90 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"
# batch 8, 16 heads, head dim 128, bf16 (the CUDA defaults); seq 1024 also runs the paired MLA/MHA check
step attention 60 "$PY" -m kimi_lab.bench attention --seq-lens 512 1024 2048 4096 --out "$OUT/attention"
step moe 45 "$PY" -m kimi_lab.bench moe --sizes small base --device cuda --repeats 20 --out "$OUT/moe.csv"
# base: the studies' preset (batch 24 x 512) for the main options; d768: MFU of a GPT-2-small-sized dense model
step train 120 "$PY" -m kimi_lab.bench train --device cuda --sizes base d768-12L-seq1024 \
    --arms default moe=dense attention=flash attention=mla optimizer=muon "moe 64e top-6" --steps 10 --warmup 3 \
    --out "$OUT/train"
# two jobs packed on device 0 (jobs_per_device=2), GPU utilisation and memory sampled while they run
SMI_PID=
if [[ "$DRY" == 0 ]] && command -v nvidia-smi >/dev/null; then
    mkdir -p "$OUT/sweep"
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,memory.total --format=csv,noheader,nounits \
        -lms 500 >"$OUT/sweep/nvidia_smi.csv" 2>/dev/null &
    SMI_PID=$!
fi
step sweep 120 "$PY" train.py -m hydra/launcher=gpu_pool "hydra.launcher.devices=[0]" hydra.launcher.jobs_per_device=2 \
    hardware=gpu model=base data=default trainer.max_steps=$SWEEP_STEPS trainer.val_check_interval=100 \
    trainer.checkpoint_every_n_steps=$SWEEP_STEPS seed=1,2 "hydra.sweep.dir=$OUT/sweep"
if [[ -n "$SMI_PID" ]]; then
    kill "$SMI_PID" 2>/dev/null
    wait "$SMI_PID" 2>/dev/null
fi
step summary 15 "$PY" -m kimi_lab.bench._gpu_check "$OUT"

if [[ "$DRY" == 0 ]]; then
    echo "gpu-check: $((SECONDS - START)) s; summary: $OUT/summary.md"
    [[ -f "$OUT/summary.md" ]] && cat "$OUT/summary.md"
fi
exit $FAILED
