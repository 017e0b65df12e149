#!/usr/bin/env bash
# Issue #6's figures on this machine (SmolLM2-135M fp32, llvm): the calibrated cost model's prediction error
# over a MagicDec grid, and gamma/budget='auto' against every fixed setting. About 35 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
art=${ARTIFACT:-$HOME/.cache/mlc-magicdec/artifacts/smollm2-llvm}
threads=${THREADS:-2}
[ -d "$art" ] || mlc-magicdec compile smollm2 --target llvm -o "$art"
mkdir -p "$out"
uptime | tee "$out/auto_load.txt"

# 1. The grid (step costs side by side, acceptance from real runs), then calibration on the same machine
#    right after it, and the prediction error of the calibrated model over the grid.
mlc-magicdec bench grid "$art" --batch 1,4,8,16 --context 1024,4096,8192 --new-tokens 64 --draft snapkv \
  --budget 256,1024 --gamma 1,2,3,4,5 --threads "$threads" --json "$out/costmodel_grid.json" | tee "$out/costmodel_grid.txt"
mlc-magicdec plan --calibrate "$art" --against "$out/costmodel_grid.json" --batch 1,4,8,16 \
  --context 1024,4096,8192 --threads "$threads" --json "$out/costmodel_calibration.json" \
  | tee "$out/costmodel_calibration.txt"

# 2. Automatic against fixed: plain, every fixed (gamma, budget) and auto on the same prefilled prompts,
#    interleaved repeats (auto uses the calibration just cached).
mlc-magicdec bench auto "$art" --batch 1,8 --context 1024,4096,8192 --new-tokens 48 --draft snapkv \
  --budget 256,1024 --gamma 1,2,3,4,5 --repeats 3 --threads "$threads" --json "$out/auto_vs_fixed.json" | tee "$out/auto_vs_fixed.txt"
uptime | tee -a "$out/auto_load.txt"
