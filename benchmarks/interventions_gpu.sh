#!/usr/bin/env bash
# The decisive intervention study at Pythia-14m shape on one GPU, in one process
# (config/interventions_gpu.yaml: mlp layer 3 targeted, rank regulariser +-0.3 on 16 seeds each,
# positive control lr x 3 against baseline on 8 seeds each; 48 runs of 2000 constant-rate
# updates of 32 x 512 tokens). Needs torch, transformers, numpy, pandas, matplotlib, pyyaml,
# jsonschema (no zarr, no snakemake). Tokens: generated Markov-chain tokens (4M, vocabulary
# 50304) unless arguments say otherwise, e.g. --tokens data/tokens.npy. Outputs (CSV,
# effects.md, timing.json) go to $OUT (default ./interventions_gpu_out); finished runs are kept
# there and an interrupted study resumes. Extra arguments go to benchmarks/interventions_gpu.py,
# e.g. a CPU smoke test:
#   benchmarks/interventions_gpu.sh --override '{"device": "cpu", "vocab_size": 256,
#     "sizes": {"14m": {"hidden_size": 16, "num_layers": 2, "num_heads": 2}}, ...}'
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$PWD/interventions_gpu_out}"
mkdir -p "$out"
# deterministic cuBLAS (with torch.use_deterministic_algorithms in the run)
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
if [ "$#" -eq 0 ]; then
  set -- --generated 4000000
fi
python "$here/interventions_gpu.py" --out "$out" "$@" 2>&1 | tee -a "$out/log.txt"
