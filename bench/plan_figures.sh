#!/usr/bin/env bash
# The cost model against MagicDec's published 8xH100 figures (bench published: the fitted GPU terms and every
# error), then its predictions for Llama-3.1-8B (config only, fp16) on 8xA100, 8xH100 and an RTX 4090, in
# both modes (realistic, the default, and --ideal): batch 1-256 x context 1k-128k, self-speculation through a
# compressed KV, acceptance alpha = 0.833 at every budget (the authors' table D). Takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
{ echo "command: mlc-magicdec bench published --json $out/published_fit.json"
  mlc-magicdec bench published --json "$out/published_fit.json"; } > "$out/published_fit.txt"
for hw in 8xA100 8xH100 rtx4090; do
  for mode in realistic ideal; do
    name=plan_llama31_8b_$(echo "$hw" | tr 'A-Z' 'a-z')
    args=(--model llama-3.1-8b --hardware "$hw" --batch 1,4,16,64,256 --context 1024,4096,16384,32768,65536,131072
          --alpha 0.833 --budget 256,512,1024,2048 --gamma 1,2,3,4,5,6)
    if [ "$mode" = ideal ]; then args+=(--ideal); name+=_ideal; fi
    { echo "command: mlc-magicdec plan ${args[*]}"; mlc-magicdec plan "${args[@]}"; } > "$out/$name.txt"
    mlc-magicdec plan "${args[@]}" --json > "$out/$name.json"
    mlc-magicdec plan "${args[@]}" --plot "$out/$name.png" > /dev/null
  done
done
