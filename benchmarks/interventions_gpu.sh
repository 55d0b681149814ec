#!/usr/bin/env bash
# A small intervention study on one GPU in under 4 minutes: 4 variants x 2 seeds of a
# Pythia-14m-shaped GPT-NeoX (hidden 128, 6 layers, 4 heads, vocabulary 50304) on generated
# Markov-chain tokens, 300 updates of 16 x 256 tokens each. Needs torch, transformers, numpy,
# pandas, matplotlib (no zarr, no snakemake). Outputs (CSV, effects.md, timing.json) go to
# $OUT (default ./interventions_gpu_out). Extra arguments go to the Python script, e.g.
#   benchmarks/interventions_gpu.sh --device cpu --vocab-size 256 --hidden-size 16 \
#       --num-layers 2 --num-heads 2 --final-step 8 --n-tokens 20000 --eval-tokens 64
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$PWD/interventions_gpu_out}"
mkdir -p "$out"
timeout 230 python "$here/interventions_gpu.py" --out "$out" "$@" 2>&1 | tee "$out/log.txt"
