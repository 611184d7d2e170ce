#!/usr/bin/env bash
# One prepared GPU run for the `device` tool (about 6 minutes on an H100/H200): bf16 train
# steps of a bert-base-sized model and of MiniLM, both from their configs with random
# weights (benchmarks/configs: no hub, and the MiniLM weights package is too big to carry),
# for full / LoRA / BitFit, then the rest of the family on MiniLM, each beside the PyTorch
# transformers + peft peer on the same GPU, with the fraction of the GPU's measured bf16
# matmul rate. Results: $OUT (or /tmp) bench_*.json and the console tables. A failing
# method is reported and the rest still run; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$py" -c "import jax, flax, optax, transformers, torch, peft
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'transformers', transformers.__version__, 'torch', torch.__version__, 'peft',
      peft.__version__, jax.devices())" || exit 1
status=0
bench() {
    "$py" -m benchmarks.bench_train --random_weights --dtype=bfloat16 \
        --peak_shape=8192x8192x8192 "$@" || status=1
}
bench --model=bert-base --config_json=benchmarks/configs/bert-base/config.json \
    --shapes=32x128,128x128 --steps=20 --out="$out/bench_bert_base_bf16.json"
bench --model=minilm --config_json=benchmarks/configs/minilm/config.json \
    --shapes=32x128,128x128 --steps=20 --out="$out/bench_minilm_bf16.json"
bench --model=minilm --config_json=benchmarks/configs/minilm/config.json --shapes=32x128 \
    --methods=dora,ia3,vera,ln_tuning,adapter_houlsby,adapter_pfeiffer,prompt:prompt_head=virtual --steps=10 \
    --out="$out/bench_minilm_family_bf16.json"
exit $status
