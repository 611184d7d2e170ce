#!/usr/bin/env bash
# The GPU check: one command meant to finish in 10 minutes on an H200 (the last default run,
# then bert, profile and minilm, took 9-10; the candidates stage has not yet run on a GPU:
# run it alone first, `bash benchmarks/gpu_check.sh candidates`, where time is short).
# `bash benchmarks/gpu_check.sh minilm` reruns one stage on a machine that is still warm.
# Stages, in order of need:
#   candidates: bf16 train steps of a bert-base-sized model at 32x128 and 128x128, full
#      fine-tuning and LoRA as they are and with each candidate fix of full fine-tuning's
#      GPU step switched on (`jaxpeft.models.Runtime`: one-hot lookups of the position and
#      token-type tables, the suspect: every token's gradient lands in one of the two
#      token-type rows by atomic adds; that and the word table's gradient summed in sorted
#      order; one fused query/key/value product; cuDNN's fused attention, which needs
#      attention dropout off, beside XLA's with it off too), each beside the PyTorch peer
#      (measured once per distinct peer setting); a second run can time one candidate
#      alone (`bench_train --methods=full,full:sorted_word_grads=true ...`);
#   bert: full / LoRA / BitFit as they are, at 32x128 and 128x128, 20 steps (not in the
#      default run: candidates holds full's and LoRA's);
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
[ ${#stages[@]} -gt 0 ] || stages=(candidates profile minilm)
quiet=attention_probs_dropout_prob=0
candidates=full,full:onehot_small_tables=true,full:onehot_small_tables=true:sorted_word_grads=true
candidates+=,full:fused_qkv=true
candidates+=,full:$quiet,full:$quiet:attention_implementation=cudnn
candidates+=,lora,lora:fused_qkv=true,lora:$quiet:attention_implementation=cudnn
for stage in "${stages[@]}"; do
    case $stage in
    candidates) "$py" -m benchmarks.bench_train "${bert[@]}" --in_process \
            --peak_shape=8192x8192x8192 --shapes=128x128,32x128 --steps=10 \
            --methods="$candidates" --out="$out/bench_bert_base_candidates.json" || status=1 ;;
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
    *) echo "unknown stage $stage (candidates, bert, profile, minilm, families)"; exit 2 ;;
    esac
done
exit $status
