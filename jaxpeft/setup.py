"""`build`: what a run is made of, before anything is written: data, model, PEFT method,
optimizer (`Setup`), and the initial parameter tree, kept apart so that the base weights
exist once, in the training loop's hands.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

import jaxpeft
from jaxpeft import hostmem
from jaxpeft.config import RunConfig, check_fits_model
from jaxpeft.data import Split, Task, load_split
from jaxpeft.data.batching import (Encoded, Packing, add_virtual_slots, bucket_lengths,
                                   num_train_batches, tokenize)
from jaxpeft.evaluation import main_metric_key, selection_key
from jaxpeft.models import Pretrained, load_pretrained
from jaxpeft.optim import OptimConfig
from jaxpeft.peft import ParamCounts, Peft, peft_from_run


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run is built from except the parameters: `pre` holds the model, tokenizer
    and config (its `params` are None: `build` returns the tree separately)."""

    cfg: RunConfig
    task: Task
    pre: Pretrained
    peft: Peft
    model: Any  # pre.model with the method's hooks and the regression output map
    train_enc: Encoded
    eval_encs: dict
    packing: Optional[Packing]
    optim: OptimConfig
    steps_per_epoch: int
    target: Optional[tuple]  # (mean, std) of a standardized regression target
    counts: ParamCounts
    cache_dir: Optional[str]

    @property
    def buckets(self) -> tuple:
        """Padded lengths of unpacked batches."""
        return bucket_lengths(self.cfg.max_seq_length)

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding id."""
        return self.pre.tokenizer.pad_token_id

    def config_dict(self) -> dict:
        """`config.json`: every option, what was resolved from them, model and machine."""
        cfg, pre = self.cfg, self.pre
        return {
            "run": cfg.to_dict(),
            "resolved": {"learning_rate": self.optim.learning_rate,
                         "total_steps": self.optim.total_steps,
                         "warmup_steps": self.optim.warmup_steps,
                         "steps_per_epoch": self.steps_per_epoch,
                         "train_examples": len(self.train_enc),
                         "eval_examples": {k: len(v) for k, v in self.eval_encs.items()},
                         "bucket_lengths": list(self.buckets), "model_path": str(pre.path),
                         "newly_initialized": list(pre.newly_initialized),
                         "peft": self.peft.to_dict(), "target_mean_std": self.target,
                         "main_metric": main_metric_key(self.task),
                         "selected_by": selection_key(self.task, cfg.select_on)},
            "model_config": pre.config.to_dict(),
            "params": self.counts.to_dict(),
            "versions": {"jaxpeft": jaxpeft.__version__, "commit": source_commit(),
                         "jax": jax.__version__, "python": sys.version.split()[0]},
            "devices": {"kind": jax.devices()[0].device_kind, "count": jax.device_count(),
                        "processes": jax.process_count(), "platform": jax.default_backend(),
                        # The steps' speed depends on it (docs/performance.md), so say which.
                        "malloc": hostmem.describe()},
        }


def source_commit() -> Optional[str]:
    """The git commit of the jaxpeft source that runs (with `+changes` when the checkout has
    uncommitted edits), or None outside a git checkout: result tables name it."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _read_data(cfg: RunConfig, task: Task) -> tuple[Split, dict]:
    train = load_split(task, "train", cfg.data_dir or None, cfg.hub_dataset)
    evals = {name: load_split(task, name, cfg.data_dir or None, cfg.hub_dataset)
             for name in task.eval_splits}
    if cfg.max_train_samples:
        train = train.take(cfg.max_train_samples)
    if cfg.max_eval_samples:
        evals = {k: v.take(cfg.max_eval_samples) for k, v in evals.items()}
    return train, evals


def build(cfg: RunConfig, task: Task,
          warmup_steps: Optional[int] = None) -> tuple[Setup, Any]:
    """`(setup, params)`: model and data loaded, method and optimizer built (user errors
    surface here); `params` is the base tree with the method's leaves. `warmup_steps`, when
    given, overrides the options' warmup (an extended run keeps the one it started with)."""
    # The data first: a mistake in it costs seconds, not a model load.
    train, evals = _read_data(cfg, task)
    # The run says itself whether a new head is trained (a resumed run restores it).
    pre = load_pretrained(cfg.model, num_labels=task.num_labels, dtype=cfg.dtype, seed=cfg.seed,
                          warn_fresh=False)
    # RoBERTa's positions start after its padding index (as transformers counts them).
    position_offset = pre.config.position_offset
    peft = peft_from_run(cfg)
    check_fits_model(cfg, pre.config.max_position_embeddings - position_offset,
                     peft.virtual_tokens)
    cache_dir = str(Path(cfg.cache_dir).expanduser()) if cfg.cache_dir else None
    train_enc = tokenize(train, pre.tokenizer, cfg.max_seq_length, cache_dir)
    eval_encs = {k: tokenize(v, pre.tokenizer, cfg.max_seq_length, cache_dir)
                 for k, v in evals.items()}
    packing = None
    if cfg.packing:
        # Row counts are a multiple of the device count, so packed rows shard evenly. The
        # model prepends a soft prompt to unpacked rows itself; packed rows reserve its slots
        # before each example.
        packing = Packing(cfg.max_seq_length + peft.virtual_tokens,
                          position_offset=position_offset,
                          row_multiple=math.lcm(2, jax.device_count()))
        train_enc = add_virtual_slots(train_enc, peft.virtual_tokens)
    model, target = pre.model, None
    if task.is_regression and cfg.standardize_targets:
        # A fixed map to the label scale: the head starts at the mean instead of near 0.
        labels = np.asarray(train_enc.labels, np.float64)
        target = (float(labels.mean()), float(labels.std()) or 1.0)
        model = model.clone(runtime=dataclasses.replace(
            model.runtime, target_mean=target[0], target_std=target[1]))
    model, params = peft.init(model, pre.params, jax.random.key(cfg.seed + 1))
    steps_per_epoch = num_train_batches(len(train_enc), cfg.batch_size)
    total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * steps_per_epoch)
    warmup = warmup_steps if warmup_steps is not None else (
        cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps)))
    optim = OptimConfig(learning_rate=cfg.resolved_learning_rate(), total_steps=total_steps,
                        warmup_steps=min(warmup, total_steps), weight_decay=cfg.weight_decay,
                        max_grad_norm=cfg.max_grad_norm)
    setup = Setup(cfg, task, dataclasses.replace(pre, params=None), peft, model, train_enc,
                  eval_encs, packing, optim, steps_per_epoch, target, peft.count(params),
                  cache_dir)
    return setup, params
