#!/usr/bin/env bash
# The GPU check: one command, about 9-10 minutes on an H200 (`bash benchmarks/gpu_check.sh
# minilm` reruns one stage on a machine that is still warm). Stages, in order of need:
#   bert: bf16 train steps of a bert-base-sized model, full / LoRA / BitFit at 32x128 and
#      128x128, each beside the PyTorch transformers + peft peer;
#   profile: where the time goes (benchmarks.profile_step): kernels of bert-base full and
#      LoRA at 128x128;
#   minilm: every method on MiniLM at 32x128 beside the peer;
#   families: full fine-tuning and LoRA of each base-size family config (RoBERTa, XLM-R,
#      ELECTRA, DistilBERT, DeBERTa-v3, ModernBERT) at 32x128 beside the peer (not in the
#      default run: `bash benchmarks/gpu_check.sh families`).
# Models are built from benchmarks/configs with random weights (no hub, no weights package),
# and every measurement runs in one process per model (--in_process: a process per
# measurement spends about half of a 10-minute job on start-up and CUDA set-up; peak memory
# per method needs a process each, so it reads n/a here).
# Results: $OUT (or /tmp) bench_*.json, traces/*.json.gz (open in Perfetto) beside each
# step's optimized XLA program (traces/*.hlo.txt.gz, which names the kernels), and the
# console tables if the caller tees the log there.
# A failing method is reported and the rest still run; the exit status is non-zero if any
# failed.
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
bert=(--random_weights --dtype=bfloat16 --model=bert-base
      --config_json=benchmarks/configs/bert-base/config.json)
minilm=(--random_weights --dtype=bfloat16 --model=minilm
        --config_json=benchmarks/configs/minilm/config.json)
status=0
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(bert profile minilm)
for stage in "${stages[@]}"; do
    case $stage in
    bert) "$py" -m benchmarks.bench_train "${bert[@]}" --in_process \
            --peak_shape=8192x8192x8192 --shapes=32x128,128x128 --steps=20 \
            --out="$out/bench_bert_base_bf16.json" || status=1 ;;
    profile) "$py" -m benchmarks.profile_step "${bert[@]}" --methods=full,lora \
            --shapes=128x128 --steps=3 --trace_out="$out/traces" || status=1 ;;
    minilm) "$py" -m benchmarks.bench_train "${minilm[@]}" --in_process \
            --peak_shape=8192x8192x8192 --shapes=32x128 --steps=10 \
            --out="$out/bench_minilm_bf16.json" \
            --methods=full,lora,bitfit,dora,ia3,vera,ln_tuning,adapter_houlsby,adapter_pfeiffer,prompt:prompt_head=virtual \
            || status=1 ;;
    families) for name in roberta-base xlm-roberta-base electra-base distilbert-base \
                    deberta-v3-base modernbert-base; do
            lora=lora; [ "$name" = modernbert-base ] && lora=lora:lora_targets=qkv
            "$py" -m benchmarks.bench_train --random_weights --dtype=bfloat16 --in_process \
                --model="$name" --config_json="benchmarks/configs/$name/config.json" \
                --peak_shape=8192x8192x8192 --shapes=32x128 --steps=10 --methods=full,$lora \
                --out="$out/bench_${name}_bf16.json" || status=1
        done ;;
    *) echo "unknown stage $stage (bert, profile, minilm, families)"; exit 2 ;;
    esac
done
exit $status
