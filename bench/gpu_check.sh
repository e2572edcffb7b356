#!/usr/bin/env bash
# The GPU check of the fused kernels, in one go on a CUDA machine (torch with CUDA, nvcc; no
# DeepSpeed needed), within 10 minutes:
#   1. build the library with its CUDA sources (JIT, into .torch_extensions/) and print the op report;
#   2. run the kernels' parity tests on the GPU (every op against its float64 reference);
#   3. bench/ops.py on the GPU: every op, forward and forward+backward, bf16, against the eager
#      reference, with the copy bandwidth and F.rms_norm / torch.softmax on the same shapes; then
#      torch.compile of the references for the ops of docs/BENCHMARKS.md's anchors;
#   4. the fused score-normaliser attention (Triton kernel and FlexAttention routes) against the
#      materialised path, and GPT-2 124M bf16 training tokens/s and MFU with softmax, polymax and
#      consmax (bench/gpu_attention.py).
# Everything printed goes into docs/BENCHMARKS.md (with the date and device); once it passes, set
# forge_dist/ops/registry.py GPU_VERIFIED so the op report stops saying "unverified on GPU".
#
#   bash bench/gpu_check.sh 2>&1 | tee gpu_check.log
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export FORGE_OPS=kernels                      # a CUDA op that cannot run is an error, not a fallback
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then     # only this GPU's architecture: a faster build
  TORCH_CUDA_ARCH_LIST=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || exit 1
  export TORCH_CUDA_ARCH_LIST
fi
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "machine"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || status=1
nvcc --version | tail -n 2
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'

step "1. build (CPU + CUDA sources, arch $TORCH_CUDA_ARCH_LIST) and op report"
timeout 360 $PY -m forge_dist.ops.report || { echo "BUILD FAILED"; exit 1; }

step "2. parity tests on the GPU"
timeout 240 $PY -m pytest -q -p no:cacheprovider -k "cuda" \
  tests/ops/test_norm_kernels.py tests/ops/test_score_kernels.py tests/ops/test_quant_kernels.py \
  tests/ops/test_dispatch.py || status=1
# the Triton attention kernels compiled on the GPU (on CPU they run through the interpreter)
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/ops/test_triton_attention.py || status=1

step "3a. bench: every op, bf16, kernel vs eager reference (no compile)"
timeout 180 $PY bench/ops.py --device cuda --dtype bfloat16 --no-compile || status=1

step "3b. bench: the anchor ops against torch.compile of their reference, forward"
timeout 150 $PY bench/ops.py --device cuda --dtype bfloat16 --quick --pass fwd --groups norms,scores \
  --variants softmax,softermax,strongermax,polymax,consmax --norms rms_norm,layer_norm || status=1

step "4. fused attention (Triton, FlexAttention) and GPT-2 124M bf16 tokens/s: softmax, polymax, consmax"
timeout 240 $PY bench/gpu_attention.py --variants softmax polymax consmax || status=1

step "done: status $status (0 = every step passed)"
exit $status
