#!/usr/bin/env bash
# One prepared GPU run for the `device` tool (well under 8 minutes on an H100/H200):
# bf16 train steps of a bert-base-sized model (random weights from
# benchmarks/configs/bert-base, no hub needed) and of MiniLM, for full / LoRA / BitFit,
# with the PyTorch transformers + peft peer on the same GPU, and the fraction of the GPU's
# measured bf16 matmul rate. Results: $OUT (or /tmp) bench_*.json and the console table.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
python -c "import jax; print(jax.devices())"
python -m benchmarks.bench_train --random_weights --config_json=benchmarks/configs/bert-base/config.json \
    --model=bert-base --dtype=bfloat16 --shapes=32x128,128x128 --steps=20 --peak_shape=8192x8192x8192 \
    --out="$out/bench_bert_base_bf16.json"
python -m benchmarks.bench_train --model=minilm --dtype=bfloat16 --shapes=32x128,128x128 --steps=20 \
    --peak_shape=8192x8192x8192 --out="$out/bench_minilm_bf16.json"
