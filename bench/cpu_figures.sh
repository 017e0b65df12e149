#!/usr/bin/env bash
# Reproduce the CPU figures in bench/results/ (SmolLM2-135M fp32, llvm). Takes about two hours on 2 cores.
# The llama.cpp peers need the optional extra: pip install 'mlc-magicdec[peers]' (CMAKE_ARGS="-DGGML_NATIVE=ON").
# Run on a quiet machine: every table is a ratio measured side by side in one run, but other load still adds noise.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
art=${ARTIFACT:-$(mktemp -d)/smollm2}
threads=${THREADS:-2}
mkdir -p "$out"

# Compile time, three times (the artifact records each step's seconds in mlc-magicdec-config.json).
for i in 1 2 3; do
  /usr/bin/time -f "compile %e s" mlc-magicdec compile smollm2 --target llvm --quantization none -o "$art" \
    --force 2>&1 | tail -1
done | tee "$out/compile_time.txt"

# Plain decoding against transformers (issue: foundation): batch 1 and 8 at a 4,096-token context.
mlc-magicdec bench peers "$art" --batch 1,8 --context 4096 --new-tokens 32 --repeats 3 \
  --json "$out/plain_vs_transformers.json" | tee "$out/plain_vs_transformers.txt"

# Acceptance of both draft views at budgets 128-1024 on 4k prompts, gamma 1-5.
mlc-magicdec bench grid "$art" --batch 8 --context 4096 --new-tokens 128 --draft snapkv,streamingllm \
  --budget 128,256,512,1024 --gamma 1,2,3,4,5 --json "$out/acceptance_4k.json" | tee "$out/acceptance_4k.txt"

# The MagicDec table and plot: batch 1-16 x context 1k-8k, best gamma per cell.
mlc-magicdec bench grid "$art" --batch 1,4,8,16 --context 1024,2048,4096,8192 --new-tokens 128 --draft snapkv \
  --budget 256 --gamma 1,2,3,4,5 --json "$out/magicdec_cpu.json" --plot "$out/magicdec_cpu_speedup.png" \
  | tee "$out/magicdec_cpu.txt"

# Issue #5 (CPU speed). The machine's roofline: triad bandwidth, matmul FLOP/s, bytes per step, tokens/s allowed.
mlc-magicdec bench roofline "$art" --batch 1,8 --context 1024,4096,8192 --threads "$threads" \
  --json "$out/roofline.json" | tee "$out/roofline.txt"

# The kernel profile (VM instrument) of a decode, verify (gamma 2) and draft (SnapKV 256) step at batch 1 and 8
# x 8k. profile_nosplit_b*.txt was measured the same way on an artifact compiled from commit 4b2906f (before key
# splitting); profile_before.txt/profile_after.txt on artifacts of commits 36a9bfc and 19065c8 (row tiles).
for batch in 1 8; do
  mlc-magicdec bench profile "$art" --batch "$batch" --context 8192 --gamma 2 --budget 256 --threads "$threads" \
    --json "$out/profile_split_b$batch.json" | tee "$out/profile_split_b$batch.txt"
done

# Ours (plain and MagicDec) against transformers and llama.cpp, flash attention off and on, prompt lookup at
# batch 1: batch 1 and 8 x 1k, 4k, 8k contexts, 128 new tokens, medians of 3 (1 for the slowest peers). The
# peers_b*_c*.txt files were measured when the llama.cpp runs also included F32 copies of the GGUF (F16 and F32
# KV); today's runs compare with llama.cpp as shipped only.
# One command per cell, so that each cell's table is written as soon as it is measured.
for batch in 8 1; do
  for context in 8192 4096 1024; do
    mlc-magicdec bench peers "$art" --batch "$batch" --context "$context" --new-tokens 128 --repeats 3 \
      --peer-repeats 1 --draft snapkv --budget 256 --gamma 2 --threads "$threads" \
      --json "$out/peers_b${batch}_c${context}.json" | tee "$out/peers_b${batch}_c${context}.txt"
  done
done

# Issue #16: the GGUF's own Q4_1 blocks (--quantization gguf, the default for a quantized GGUF on the CPU) and
# an fp16 KV cache, against llama.cpp as shipped (the same GGUF, its default F16 KV). Compile time three times.
q4=${Q4_ARTIFACT:-$(mktemp -d)/smollm2-q4}
for i in 1 2 3; do
  /usr/bin/time -f "compile %e s" mlc-magicdec compile smollm2 --target llvm --kv-dtype float16 -o "$q4" \
    --force 2>&1 | tail -1
done | tee "$out/compile_time_quantized.txt"
mlc-magicdec bench peers "$q4" --batch 1,8 --context 1024,4096,8192 --new-tokens 64 --repeats 3 \
  --threads "$threads" --json "$out/quantized_peers.json" | tee "$out/quantized_peers.txt"
mlc-magicdec bench memory "$q4" --batch 8 --context 8192 --threads "$threads" \
  --json "$out/quantized_memory.json" | tee "$out/quantized_memory.txt"
for batch in 1 8; do
  mlc-magicdec bench profile "$q4" --batch "$batch" --context 1024,8192 --gamma 2 --threads "$threads" \
    --json "$out/quantized_profile_b$batch.json" | tee "$out/quantized_profile_b$batch.txt"
done
