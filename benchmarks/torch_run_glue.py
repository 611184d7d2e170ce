"""The PyTorch peer: the same fine-tuning run with transformers + peft, for comparison.

  python -m benchmarks.torch_run_glue --task=sst2 --method=lora --model=minilm \
      --data_dir=../shared/glue_data --max_steps=300 --out=/tmp/peer-sst2-lora.json

Same data (read by jaxpeft's loader), same model, AdamW with the same hyper-parameters
(decoupled weight decay off for biases and LayerNorm, linear warmup then decay, global-norm
clipping), batches shuffled each epoch and padded per batch to their longest member (dynamic
padding, transformers' DataCollatorWithPadding), the same host metrics. Prints and writes
dev metrics, train wall time and examples/s. Needs torch and peft (requirements-dev.txt).
"""

import json
import time

import numpy as np
import torch
from absl import app, flags

from benchmarks.torch_model import torch_model_for
from jaxpeft.data import get_task, load_split
from jaxpeft.metrics import compute_metrics
from jaxpeft.models.checkpoint import resolve_model_dir
from jaxpeft.config import RunConfig
from jaxpeft.peft import METHODS, peft_from_run

flags.DEFINE_string("task", "sst2", "GLUE task")
flags.DEFINE_string("model", "minilm", "model folder, hub id or 'minilm'")
flags.DEFINE_enum("method", "lora", list(METHODS), "what to train")
flags.DEFINE_float("learning_rate", None, "peak learning rate (default: jaxpeft's per method)")
flags.DEFINE_integer("batch_size", 32, "examples per step")
flags.DEFINE_integer("eval_batch_size", 128, "examples per eval batch")
flags.DEFINE_integer("max_steps", 300, "optimizer steps")
flags.DEFINE_float("warmup_ratio", 0.06, "warmup fraction")
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay")
flags.DEFINE_float("max_grad_norm", 1.0, "clipping norm")
flags.DEFINE_integer("max_seq_length", 128, "truncation length")
flags.DEFINE_integer("lora_rank", 8, "LoRA r")
flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_integer("threads", 0, "torch threads (0: torch's default)")
flags.DEFINE_string("data_dir", "../shared/glue_data", "GLUE folder")
flags.DEFINE_string("out", "", "write the result JSON here too")


def build_model(f, num_labels):
    """The transformers model with the method's trainable parameters."""
    import transformers

    path = resolve_model_dir(f.model)
    torch.manual_seed(f.seed)
    # SDPA named explicitly (transformers' default today): the fused attention kernel, so
    # the peer is never timed on the slower eager path.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, attn_implementation="sdpa")
    peft = peft_from_run(RunConfig(method=f.method, lora_rank=f.lora_rank,
                                   lora_alpha=f.lora_alpha))
    return transformers.AutoTokenizer.from_pretrained(path), torch_model_for(model, peft)


def main(_):
    import transformers

    f = flags.FLAGS
    if f.threads:
        torch.set_num_threads(f.threads)
    task = get_task(f.task)
    lr = f.learning_rate or METHODS[f.method].default_learning_rate
    tok, model = build_model(f, task.num_labels)
    train = load_split(task, "train", f.data_dir)
    dev = load_split(task, task.eval_splits[0], f.data_dir)
    collate = transformers.DataCollatorWithPadding(tok)

    def encode(split, rows):
        b = None if split.text_b is None else [split.text_b[i] for i in rows]
        enc = tok([split.text_a[i] for i in rows], b, truncation=True,
                  max_length=f.max_seq_length)
        batch = collate([{k: enc[k][j] for k in enc} for j in range(len(rows))])
        dtype = torch.float32 if task.is_regression else torch.long
        batch["labels"] = torch.tensor(split.labels[rows], dtype=dtype)
        return batch

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = lambda n: n.endswith(".bias") or "LayerNorm" in n  # noqa: E731
    opt = torch.optim.AdamW([
        {"params": [p for n, p in trainable if not no_decay(n)], "weight_decay": f.weight_decay},
        {"params": [p for n, p in trainable if no_decay(n)], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = transformers.get_linear_schedule_with_warmup(
        opt, int(round(f.warmup_ratio * f.max_steps)), f.max_steps)
    rng = np.random.default_rng(f.seed)
    model.train()
    step, examples, order, pos = 0, 0, rng.permutation(len(train)), 0
    t0 = time.perf_counter()
    while step < f.max_steps:
        if pos >= len(order):
            order, pos = rng.permutation(len(train)), 0
        rows = order[pos:pos + f.batch_size]
        pos += f.batch_size
        batch = encode(train, rows)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], f.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        examples += len(rows)
    wall = time.perf_counter() - t0
    model.eval()
    preds = []
    with torch.no_grad():
        for s in range(0, len(dev), f.eval_batch_size):
            logits = model(**encode(dev, np.arange(s, min(s + f.eval_batch_size, len(dev))))).logits
            preds.append(logits[:, 0].numpy() if task.is_regression else logits.argmax(-1).numpy())
    metrics = compute_metrics(task, np.concatenate(preds), dev.labels)
    result = {"task": task.name, "method": f.method, "model": f.model, "learning_rate": lr,
              "steps": step, "batch_size": f.batch_size, "train_wall_s": wall,
              "examples_per_s": examples / wall, "threads": torch.get_num_threads(),
              "attention": model.config._attn_implementation,
              "torch": torch.__version__, "transformers": transformers.__version__,
              **{f"eval_{k}": v for k, v in metrics.items()}}
    print(json.dumps(result, indent=2))
    if f.out:
        with open(f.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    app.run(main)
