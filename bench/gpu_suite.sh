#!/usr/bin/env bash
# Every GPU test and GPU benchmark in one run, on one GPU, without Ray (the GPU machine has none).
#
#   bench/gpu_suite.sh OUT_DIR
#
# Writes to OUT_DIR: device.txt (GPU, driver, torch / triton versions), tests.txt (tests/gpu:
# engine parity on CUDA, the paged decode kernel against the torch path, CUDA IPC and NCCL
# transports, the sparse prefill kernel), paged_decode.txt and sparse_kernel.txt (benchmark
# tables). Each step has its own time limit; the whole run stays under 8 minutes. Exit status 1
# when any step failed (the others still run). Record the tables, device named, in
# docs/BENCHMARKS.md.
set -uo pipefail
out="${1:?usage: bench/gpu_suite.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
rc=0
step() {  # step SECONDS FILE COMMAND...: run with a limit, keep its output, remember a failure
  local limit=$1 file=$2
  shift 2
  echo "== $* (limit ${limit}s)" | tee "$out/$file"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/$file"
  local status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || { echo "== exit status $status" | tee -a "$out/$file"; rc=1; }
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$py" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
             "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
} > "$out/device.txt" 2>&1
cat "$out/device.txt"

step 240 tests.txt "$py" -m pytest -q -p no:cacheprovider -rs tests/gpu
step 90 paged_decode.txt "$py" bench/paged_decode_gpu.py
step 150 sparse_kernel.txt "$py" bench/sparse_kernel_gpu.py --lengths 8192,32768,131072
exit $rc
