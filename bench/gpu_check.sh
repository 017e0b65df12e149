#!/usr/bin/env bash
# The GPU check (issues #4, #15): on a machine with an NVIDIA GPU, in under 8 minutes,
#   1. compile SmolLM2-135M for this GPU (--target cuda detects the arch; its GGUF blocks, fp16 KV) and print the
#      kernels' registers, shared memory and spills,
#   2. run the lossless tests on CUDA (the SmolLM2 test artifact is compiled for cuda and runs on cuda:0),
#   3. a MagicDec benchmark, plain against fixed settings: batch 1, 8, 32, 64, 128 at 4k and 8k context, fp16,
#   4. gamma/budget "auto" against plain and fixed settings on the same cells.
# Everything it prints goes to bench/results/gpu/ (gpu_check.log, magicdec_cuda.{txt,json,png}, auto_cuda.*).
# Usage: bench/gpu_check.sh            (env: ARTIFACT=folder to keep the compiled artifact, PYTHON=python)
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results/gpu
mkdir -p "$out"
art=${ARTIFACT:-$(mktemp -d)/smollm2-cuda}
python=${PYTHON:-python}

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); run this on a machine with one" >&2
  exit 2
fi
# The apache-tvm wheel's CUDA runtime is a sidecar library (tvm/lib/libtvm_runtime_cuda.so) that `import tvm`
# loads when the NVIDIA driver (libcuda.so.1) and CUDA 13's runtime (libcudart.so.13) are on the loader path.
if ! $python -c 'import sys, tvm; sys.exit(not tvm.runtime.enabled("cuda"))'; then
  sidecar=$($python -c 'import pathlib, tvm; print(pathlib.Path(tvm.__file__).parent / "lib/libtvm_runtime_cuda.so")')
  missing=$(ldd "$sidecar" 2>/dev/null | awk '/not found/ && !/libtvm_ffi/ {print $1}' | tr '\n' ' ')
  echo "gpu_check: TVM's CUDA runtime ($sidecar) did not load (missing: ${missing:-none that ldd names});" \
    "put the NVIDIA driver's libcuda.so.1 and CUDA 13's libcudart.so.13 on LD_LIBRARY_PATH" >&2
  exit 2
fi
exec > >(tee "$out/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
git rev-parse --short HEAD 2>/dev/null || true
start=$(date +%s)

echo "== 1. compile SmolLM2 for this GPU"
/usr/bin/time -f "compile %e s (wall)" mlc-magicdec compile smollm2 --target cuda -o "$art" --force
$python - "$art" <<'PY'
import json, sys
c = json.load(open(f"{sys.argv[1]}/mlc-magicdec-config.json"))
print("target", c["target"]["archs"], c["dtype"], "steps (s):", c["compile_seconds"])
PY
mlc-magicdec bench resources "$art" --json "$out/resources_$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .).json"

echo "== 2. lossless tests on CUDA"
MLC_MAGICDEC_TEST_TARGET=cuda $python -m pytest -q -p no:cacheprovider tests/test_lossless.py

echo "== 3. MagicDec benchmark (fp16, batch 1/8/32/64/128, context 4k/8k)"
mlc-magicdec bench grid "$art" --batch 1,8,32,64,128 --context 4096,8192 --new-tokens 64 --draft snapkv \
  --budget 256 --gamma 1,2,3,4 --repeats 3 --json "$out/magicdec_cuda.json" --plot "$out/magicdec_cuda_speedup.png" \
  | tee "$out/magicdec_cuda.txt"

echo "== 4. gamma/budget auto against plain and fixed settings"
mlc-magicdec bench auto "$art" --batch 1,8,32,64,128 --context 4096,8192 --new-tokens 64 --draft snapkv \
  --budget 256,1024 --gamma 1,2,3 --json "$out/auto_cuda.json" | tee "$out/auto_cuda.txt"

echo "gpu_check: done in $(( $(date +%s) - start )) s"
