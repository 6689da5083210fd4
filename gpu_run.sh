#!/usr/bin/env bash
# The GPU session's prepared script (issue 14), for the lent device machine: its preinstalled python3 (torch 2.11 +
# CUDA 13, pytest, tqdm, matplotlib), no network, the npz files carried in gpu-data/ (`make gpu-data` here).
#
#   OUT=$OUT bash gpu_run.sh checks      # call 1 (~5 min): op tests on CUDA, crash diagnosis, bench (end to end,
#                                        # FLOP/s, compile modes, worker counts), a profile, 1-GPU torchrun smoke
#   OUT=$OUT bash gpu_run.sh study 1/2   # calls 2-3 (<= 8 min each): reproduce.py --preset gpu, one part each
#   OUT=/tmp/g QUICK=1 bash gpu_run.sh checks   # on a CPU: every stage with tiny settings (tests the script)
#
# Every stage has its own time limit, logs to $OUT/<stage>.log and prints its last lines; a failed stage does not
# stop the others. Record the card, torch version and date printed first next to every number taken from here.
set -u
PY=${PY:-python3}
OUT=${OUT:-gpu-out}
QUICK=${QUICK:-}
export MEDSSL_DATA_DIR=${MEDSSL_DATA_DIR:-gpu-data}
mkdir -p "$OUT"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit} s): $*"
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "   rc $rc after $(( $(date +%s) - start )) s"
  tail -n "${TAIL:-6}" "$OUT/$name.log" | sed 's/^/   /'
}

date -u
$PY -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

case "${1:-checks}" in
checks)
  if [ -n "$QUICK" ]; then
    BENCH=(--sizes 28 --channels 1 --batch 8 --repeats 1 --step-batch 8 --e2e pneumonia --e2e-batch 16
           --e2e-steps 1 --workers 1 --profile 28)
    SMOKE=(--train-subset 64 --batch-size 16); DEV=cpu
  else
    BENCH=(--devices cuda --sizes 64 224 --step-size 64 --e2e pneumonia breast64 --workers 4 8 16
           --compile none default reduce-overhead --profile 28 64)
    SMOKE=(--train-subset 2048 --batch-size 256); DEV=cuda
  fi
  # a. the op on CUDA against the reference, opcheck, every invalid-params rule (the CUDA kernel must clamp:
  #    test_cuda_kernel_is_memory_safe_for_any_params) and the direct-call checks of the known crash
  MEDSSL_REQUIRE_OP=1 stage op-tests 300 $PY -m pytest -q tests/test_op.py
  # b. the crash (BENCHMARKS.md "Known issue"): a backtrace if the direct-call test dies on a signal
  if grep -q "rc -\|Segmentation\|Fatal Python" "$OUT/op-tests.log" && command -v cuda-gdb > /dev/null; then
    stage crash-backtrace 120 cuda-gdb -batch -ex run -ex bt --args $PY -m pytest -x -q tests/test_op.py \
      -k rejects_bad_arguments
  fi
  # speed: augmentation, the step, end to end vs DataLoader at 4/8/16 workers, FLOP/s, compile modes, profile
  stage bench 420 $PY bench.py "${BENCH[@]}" --out "$OUT/bench-gpu.json"
  # c. torchrun on one GPU (NCCL, SyncBatchNorm) for every method: a few steps end to end
  for m in simclr dclw byol simsiam barlow vicreg; do
    TAIL=2 stage "torchrun-$m" 120 $PY -m torch.distributed.run --standalone --nproc_per_node 1 "$m.py" \
      --data pneumonia --epochs 1 --warmup-epochs 0 --eval-every 1 "${SMOKE[@]}" --out "$OUT/torchrun-$m"
  done
  # the images in pinned host memory, each batch copied over (what a dataset larger than the GPU gets)
  TAIL=2 stage torchrun-simclr-host-data 120 $PY -m torch.distributed.run --standalone --nproc_per_node 1 simclr.py \
    --data pneumonia --epochs 1 --warmup-epochs 0 --eval-every 1 "${SMOKE[@]}" --host-data --out "$OUT/host-data"
  ;;
study)
  part=${2:-1/1}
  # d. the study, one --part per call; ImageNet weights are used if the hub cache happens to hold them (e.)
  ls -l ~/.cache/torch/hub/checkpoints 2>/dev/null || echo "no torch hub checkpoints on this machine"
  EXTRA=()
  [ -n "$QUICK" ] && EXTRA=(--epochs 1 --seeds 0 --train-subset 64 --batch-size 32 --finetune-epochs 1 --data pneumonia)
  # runs/ stays on a warm machine between calls (git-ignored); $OUT gets the tables, figures and every run's
  # small files (no checkpoints) back
  TAIL=25 stage "study-${part/\//of}" 560 $PY reproduce.py --preset gpu --part "$part" --data-dir "$MEDSSL_DATA_DIR" \
    --runs runs/reproduce-gpu --out "$OUT/results" "${EXTRA[@]}"
  tar -cf - --exclude='*.pt' runs/reproduce-gpu | tar -xf - -C "$OUT"
  ;;
*)
  echo "usage: bash gpu_run.sh checks | study I/N" >&2
  exit 2
  ;;
esac
