#!/usr/bin/env bash
# The accelerator check: T5 1.1 large's sbs train step at batches 8, 32 and 64 and greedy
# decoding (64 new tokens) at batches 8 and 32, ours vs the HF PyTorch reference recipe on the
# same GPU (bf16 autocast + fused AdamW; bf16 weights for generate), with MFU against the card's
# published bf16 peak, compile seconds and the peak memory of both; JSON out. Runs on one GPU.
# Needs only python with jax (CUDA), flax, optax, orbax, torch and transformers: no TensorFlow,
# SeqIO or gin, and no data (random tokens).
#
#   benchmarks/accelerator_check.sh [OUT.json]          # on a GPU (default out: accelerator_check.json)
#   benchmarks/accelerator_check.sh --tiny [OUT.json]   # the same path with t5_1_1_tiny (a CPU smoke run)
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 0
fi
TINY=0
if [[ "${1:-}" == "--tiny" ]]; then
  TINY=1
  shift
fi
OUT="${1:-accelerator_check.json}"

# The settings of gin/sbs_large.gin (bf16 compute, scanned layers, minimal remat, micro-batches
# of 16 rows: 64 / 4) at fixed sequence lengths: inputs 256, label 8, rationale 128 tokens.
if (( TINY )); then
  args=(--config t5_1_1_tiny --dtype bfloat16 --scan_layers --remat_policy minimal
        --rows_per_microbatch 4 --batches 2 4 8 --decode_batches 2 4 --input_len 32
        --label_len 4 --rationale_len 16 --decode_len 8 --rounds 2)
else
  args=(--config t5_1_1_large --dtype bfloat16 --scan_layers --remat_policy minimal
        --rows_per_microbatch 16 --batches 8 32 64 --decode_batches 8 32 --input_len 256
        --label_len 8 --rationale_len 128 --decode_len 64 --rounds 3)
fi

export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" "$REPO_DIR/benchmarks/bench_sbs_step.py" "${args[@]}" --json_out "$OUT"
