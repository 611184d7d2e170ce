"""The PyTorch peer: the same fine-tuning run with transformers + peft, for comparison.

  python -m benchmarks.torch_run_glue --task=sst2 --method=lora --model=minilm \
      --data_dir=../shared/glue_data --max_steps=300 --out=/tmp/peer-sst2-lora.json
  python -m benchmarks.torch_run_glue --task=rte --method=lora --model=minilm \
      --data_dir=../shared/glue_data --num_epochs=3 --select_on=dev_half \
      --output_dir=runs/peer/rte-lora-seed0

Same data (read by jaxpeft's loader), same model, AdamW with the same hyper-parameters
(decoupled weight decay off for biases and LayerNorm, linear warmup then decay, global-norm
clipping), batches shuffled each epoch and padded per batch to their longest member (dynamic
padding, transformers' DataCollatorWithPadding), STS-B trained on standardized targets as
jaxpeft does, the same host metrics. With `--num_epochs` (and `--max_steps=0`) it runs the
standard recipe: an evaluation at the end of each epoch, the best one picked by
`--select_on` exactly as jaxpeft picks it (`dev_half`: jaxpeft's fixed selection half picks,
the held-out half scores, the same halves). Prints and writes dev metrics, train wall time
and examples/s; `--output_dir` writes a run folder (`config.json`, `results.json`,
`metrics.jsonl`, method `<method>-torch`) that `experiments.report` reads beside jaxpeft's
runs. Needs torch and peft (requirements-dev.txt).
"""

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from absl import app, flags

from benchmarks.torch_model import torch_model_for
from jaxpeft.data import get_task, load_split
from jaxpeft.evaluation import (SELECTIONS, main_metric_key, scored_parts, selection_key,
                                trivial_baseline)
from jaxpeft.fileio import atomic_write_json
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
flags.DEFINE_integer("max_steps", 300, "optimizer steps (0: --num_epochs)")
flags.DEFINE_float("num_epochs", 3.0, "epochs when --max_steps=0 (evaluated at each epoch end)")
flags.DEFINE_enum("select_on", "dev", list(SELECTIONS), "which dev examples pick the best "
                  "evaluation (as jaxpeft's --select_on)")
flags.DEFINE_integer("log_every", 50, "a training-loss row every N steps (--output_dir)")
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
flags.DEFINE_string("output_dir", "", "write a run folder the report reads (refused if it "
                    "holds files)")


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


def _evaluate(model, encode, task, dev, select_on, target, batch_size):
    """Every `--select_on` part of the dev split scored: `{prefix + metric: value}`, with
    the loss (cross-entropy, or MSE in the label scale) under `<prefix>loss`."""
    import torch.nn.functional as F

    preds, losses = [], []
    with torch.no_grad():
        for s in range(0, len(dev), batch_size):
            rows = np.arange(s, min(s + batch_size, len(dev)))
            batch = encode(dev, rows, standardize=False)
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            if task.is_regression:
                out = logits[:, 0] * target[1] + target[0]
                preds.append(out.numpy())
                losses.append(F.mse_loss(out, batch["labels"], reduction="none").numpy())
            else:
                preds.append(logits.argmax(-1).numpy())
                losses.append(F.cross_entropy(logits, batch["labels"], reduction="none").numpy())
    preds, losses = np.concatenate(preds), np.concatenate(losses)
    row = {}
    for prefix, rows in scored_parts(select_on, len(dev)).items():
        row[f"{prefix}loss"] = float(losses[rows].mean())
        for name, value in compute_metrics(task, preds[rows], dev.labels[rows]).items():
            row[f"{prefix}{name}"] = value
    return row


def main(_):
    import transformers

    f = flags.FLAGS
    if f.threads:
        torch.set_num_threads(f.threads)
    out_dir = Path(f.output_dir) if f.output_dir else None
    if out_dir is not None and out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"error: {out_dir}: --output_dir holds files; choose a new folder")
    task = get_task(f.task)
    lr = f.learning_rate or METHODS[f.method].default_learning_rate
    tok, model = build_model(f, task.num_labels)
    train = load_split(task, "train", f.data_dir)
    dev = load_split(task, task.eval_splits[0], f.data_dir)
    collate = transformers.DataCollatorWithPadding(tok)
    # STS-B: jaxpeft's default --standardize_targets (the head learns (y - mean) / std).
    target = ((float(train.labels.mean()), float(train.labels.std()) or 1.0)
              if task.is_regression else (0.0, 1.0))

    def encode(split, rows, standardize=True):
        b = None if split.text_b is None else [split.text_b[i] for i in rows]
        enc = tok([split.text_a[i] for i in rows], b, truncation=True,
                  max_length=f.max_seq_length)
        batch = collate([{k: enc[k][j] for k in enc} for j in range(len(rows))])
        labels = split.labels[rows]
        if task.is_regression and standardize:
            labels = (labels - target[0]) / target[1]
        dtype = torch.float32 if task.is_regression else torch.long
        batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch

    steps_per_epoch = math.ceil(len(train) / f.batch_size)
    total = f.max_steps or math.ceil(f.num_epochs * steps_per_epoch)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = lambda n: n.endswith(".bias") or "LayerNorm" in n  # noqa: E731
    opt = torch.optim.AdamW([
        {"params": [p for n, p in trainable if not no_decay(n)], "weight_decay": f.weight_decay},
        {"params": [p for n, p in trainable if no_decay(n)], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = transformers.get_linear_schedule_with_warmup(
        opt, int(round(f.warmup_ratio * total)), total)
    rng = np.random.default_rng(f.seed)
    main_key = main_metric_key(task)
    picked_by = selection_key(task, f.select_on)
    rows_out, best, window = [], None, []
    step, examples, order, pos = 0, 0, rng.permutation(len(train)), 0
    wall = 0.0
    t0 = time.perf_counter()
    model.train()
    while step < total:
        if pos >= len(order):
            order, pos = rng.permutation(len(train)), 0
        rows = order[pos:pos + f.batch_size]
        pos += f.batch_size
        loss = model(**encode(train, rows)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], f.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        examples += len(rows)
        window.append(loss.item())
        if step % f.log_every == 0:
            rows_out.append({"step": step, "epoch": step / steps_per_epoch,
                             "train_loss": float(np.mean(window))})
            window = []
        # With --max_steps, one evaluation at the end (as before); else each epoch's end.
        if step == total or (not f.max_steps and step % steps_per_epoch == 0):
            wall += time.perf_counter() - t0
            model.eval()
            row = {"step": step, "epoch": step / steps_per_epoch,
                   **_evaluate(model, encode, task, dev, f.select_on, target,
                             f.eval_batch_size)}
            model.train()
            rows_out.append(row)
            if best is None or row[picked_by] > best[picked_by]:
                best = row
            t0 = time.perf_counter()
    n_trainable = sum(p.numel() for _, p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    result = {"task": task.name, "method": f.method, "model": f.model, "learning_rate": lr,
              "steps": step, "batch_size": f.batch_size, "train_wall_s": wall,
              "examples_per_s": examples / wall, "threads": torch.get_num_threads(),
              "attention": model.config._attn_implementation,
              "torch": torch.__version__, "transformers": transformers.__version__,
              **{k: v for k, v in best.items() if k.startswith(("eval_", "select_"))}}
    print(json.dumps(result, indent=2))
    if f.out:
        with open(f.out, "w") as fh:
            json.dump(result, fh, indent=2)
    if out_dir is not None:
        _write_run_folder(out_dir, f, task, lr, best, rows_out, step, steps_per_epoch, wall,
                          examples, n_trainable, n_total, main_key, picked_by, dev, result,
                          train.labels)


def _write_run_folder(out_dir, f, task, lr, best, rows, steps, steps_per_epoch, wall,
                      examples, n_trainable, n_total, main_key, picked_by, dev, result,
                      train_labels):
    """A run folder in jaxpeft's layout, so `experiments.report` lists the peer beside
    jaxpeft's runs (method `<method>-torch`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    options = {"rank": f.lora_rank, "alpha": f.lora_alpha} if f.method == "lora" else {}
    run = {"task": task.name, "model": f.model, "method": f"{f.method}-torch",
           "learning_rate": lr, "batch_size": f.batch_size, "num_epochs": f.num_epochs,
           "max_steps": f.max_steps, "warmup_ratio": f.warmup_ratio,
           "weight_decay": f.weight_decay, "max_grad_norm": f.max_grad_norm,
           "max_seq_length": f.max_seq_length, "seed": f.seed, "select_on": f.select_on,
           "data_dir": f.data_dir, "eval_batch_size": f.eval_batch_size}
    atomic_write_json(out_dir / "config.json", {
        "run": run, "resolved": {"learning_rate": lr, "total_steps": steps,
                                 "steps_per_epoch": steps_per_epoch,
                                 "peft": {"method": f.method, "options": options}},
        "versions": {"torch": result["torch"], "transformers": result["transformers"],
                     "commit": None}, "peer": {"attention": result["attention"],
                                               "threads": result["threads"]}})
    with open(out_dir / "metrics.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    atomic_write_json(out_dir / "results.json", {
        "task": task.name, "method": f"{f.method}-torch", "model": f.model,
        "params": {"trainable": n_trainable, "total": n_total,
                   "percent": 100.0 * n_trainable / n_total},
        "final": {k: v for k, v in rows[-1].items() if k.startswith("eval_") or k == "step"},
        "best": best, "main_metric": main_key, "selected_by": picked_by,
        "train": {"steps": steps, "epochs": steps / steps_per_epoch, "wall_s": wall,
                  "examples": examples, "examples_per_s": examples / wall},
        "learning_rate": lr, "baseline": trivial_baseline(task, {task.eval_splits[0]: dev},
                                                          f.select_on, train_labels)})
    print(f"wrote {out_dir}: results.json, config.json, metrics.jsonl")


if __name__ == "__main__":
    app.run(main)
