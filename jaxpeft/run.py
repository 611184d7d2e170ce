"""`train_and_evaluate`: one fine-tuning run from a `RunConfig`, with all its files.

Builds data, model, PEFT method and optimizer; trains with the jitted `train_step`
(batches sharded over a `data` mesh axis, parameters replicated); evaluates every
`eval_every` steps and at the end of each epoch on the full validation split(s); writes
`config.json`, `metrics.jsonl`, `results.json`, the best adapter (`best/`), orbax
checkpoints (`checkpoints/`), and optionally GLUE test predictions and a peft export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

import jaxpeft
from jaxpeft.checkpointing import Checkpointer
from jaxpeft.data import HUB_DATASET, get_task, load_split
from jaxpeft.data.batching import (Packing, bucket_lengths, eval_batches, num_train_batches,
                                   tokenize, train_batches)
from jaxpeft.data.tasks import TSV_LABELS, Task
from jaxpeft.errors import JaxpeftError
from jaxpeft.metrics import compute_metrics
from jaxpeft.models import load_pretrained
from jaxpeft.optim import OptimConfig, learning_rate_at, make_optimizer
from jaxpeft.peft import (METHODS, LoraConfig, add_lora, count_params, export_peft, load_adapter,
                          lora_model, save_adapter, trainable_mask)
from jaxpeft.train import STEP_STATS, create_train_state, make_eval_step, make_train_step
from jaxpeft.writer import CONFIG, RESULTS, RunWriter

log = logging.getLogger("jaxpeft")

# Learning rates that work for each method when --learning_rate is not given.
DEFAULT_LR = {"full": 2e-5, "lora": 5e-4, "bitfit": 1e-3}
# Fields that may differ between a run and its resumption.
_RESUMABLE = {"resume", "overwrite", "progress", "multihost"}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; `experiments/run_glue.py` exposes each as a flag."""

    task: str = "sst2"
    model: str = "bert-base-uncased"
    method: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = ("query", "value")
    lora_rslora: bool = False
    train_pooler: bool = False
    standardize_targets: bool = True  # regression head outputs std * raw + mean of train labels
    learning_rate: Optional[float] = None  # None: DEFAULT_LR[method]
    batch_size: int = 32
    eval_batch_size: int = 128
    num_epochs: float = 3.0
    max_steps: int = 0  # > 0 overrides num_epochs
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_seq_length: int = 128
    packing: bool = True  # pack several examples per row (training batches; wins on GLUE)
    eval_every: int = 0  # 0: at the end of each epoch (and of training) only
    log_every: int = 50
    seed: int = 0
    data_dir: str = ""  # empty: the hub
    hub_dataset: str = HUB_DATASET
    cache_dir: str = "~/.cache/jaxpeft"  # tokenized data; empty disables
    max_train_samples: int = 0
    max_eval_samples: int = 0
    output_dir: str = "runs/sst2-lora"
    overwrite: bool = False
    resume: bool = False
    checkpoint_every: int = 500  # 0: only at the end
    dtype: str = "float32"
    do_predict: bool = False
    export_peft: bool = False
    multihost: bool = False
    progress: bool = True

    def resolved_learning_rate(self) -> float:
        """The learning rate in force (the method's default when none was given)."""
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]

    def lora(self) -> Optional[LoraConfig]:
        """The LoRA options, for the LoRA method."""
        if self.method != "lora":
            return None
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=tuple(self.lora_targets), use_rslora=self.lora_rslora)


def validate(cfg: RunConfig) -> Task:
    """Checks every option a user can get wrong; returns the task."""
    task = get_task(cfg.task)
    if not task.has_train:
        raise JaxpeftError(f"task {task.name} is test-only (diagnostic); train on mnli and "
                           "predict ax with its model")
    if cfg.method not in METHODS:
        raise JaxpeftError(f"unknown method {cfg.method!r}; choose one of: {', '.join(METHODS)}")
    cfg.lora()  # validates rank, alpha, dropout, targets
    checks = [
        (cfg.learning_rate is None or cfg.learning_rate > 0,
         f"--learning_rate must be > 0, got {cfg.learning_rate}"),
        (cfg.batch_size > 0, f"--batch_size must be > 0, got {cfg.batch_size}"),
        (cfg.eval_batch_size > 0, f"--eval_batch_size must be > 0, got {cfg.eval_batch_size}"),
        (cfg.max_steps > 0 or cfg.num_epochs > 0,
         "give --num_epochs > 0 or --max_steps > 0"),
        (cfg.max_steps >= 0, f"--max_steps must be >= 0, got {cfg.max_steps}"),
        (0 <= cfg.warmup_ratio < 1, f"--warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}"),
        (cfg.warmup_steps >= 0, f"--warmup_steps must be >= 0, got {cfg.warmup_steps}"),
        (cfg.weight_decay >= 0, f"--weight_decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.max_grad_norm >= 0, f"--max_grad_norm must be >= 0, got {cfg.max_grad_norm}"),
        (cfg.max_seq_length >= 8, f"--max_seq_length must be >= 8, got {cfg.max_seq_length}"),
        (cfg.eval_every >= 0, f"--eval_every must be >= 0, got {cfg.eval_every}"),
        (cfg.log_every > 0, f"--log_every must be > 0, got {cfg.log_every}"),
        (cfg.checkpoint_every >= 0,
         f"--checkpoint_every must be >= 0, got {cfg.checkpoint_every}"),
        (cfg.max_train_samples >= 0 and cfg.max_eval_samples >= 0,
         "--max_train_samples and --max_eval_samples must be >= 0"),
        (cfg.dtype in ("float32", "bfloat16"),
         f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}"),
        (not (cfg.export_peft and cfg.method != "lora"),
         "--export_peft needs --method=lora (peft's format holds LoRA adapters)"),
        (not (cfg.resume and cfg.overwrite), "give --resume or --overwrite, not both"),
        (bool(cfg.output_dir), "--output_dir must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise JaxpeftError(message)
    n = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        if getattr(cfg, name) % n:
            raise JaxpeftError(f"--{name}={getattr(cfg, name)} must be a multiple of the "
                               f"{n} devices (each gets an equal share)")
    return task


def _comparable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in _RESUMABLE}


def prepare_output_dir(cfg: RunConfig, config_dict: dict) -> bool:
    """Makes `output_dir` ready; returns True when resuming. Never clobbers a run unasked."""
    out = Path(cfg.output_dir)
    existing = out.is_dir() and any(out.iterdir())
    if existing and cfg.overwrite:
        shutil.rmtree(out)
        existing = False
    if cfg.resume:
        if not (out / CONFIG).is_file():
            if existing:
                raise JaxpeftError(f"{out}: --resume given, but this folder holds no run "
                                   f"({CONFIG} missing)")
            return False  # nothing to resume yet: start fresh
        old = RunWriter(out).read_config()["run"]
        new = json.loads(json.dumps(config_dict["run"]))  # as it would read back from disk
        diff = sorted(k for k in set(_comparable(old)) | set(_comparable(new))
                      if old.get(k) != new.get(k))
        if diff:
            raise JaxpeftError(f"{out}: --resume with different settings than the run there "
                               f"({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)})")
        return True
    if existing:
        what = "a finished run" if (out / RESULTS).is_file() else "an unfinished or other run"
        raise JaxpeftError(f"{out}: output folder holds {what}; pass --resume to continue it, "
                           "--overwrite to replace it, or choose another --output_dir")
    return False


class _CompileCounter:
    """Counts XLA compilations while active (via jax.monitoring)."""

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


_COMPILES = None


def _compile_counter() -> _CompileCounter:
    global _COMPILES
    if _COMPILES is None:  # one listener per process: jax.monitoring has no unregister
        _COMPILES = _CompileCounter()
    return _COMPILES


class _Sharder:
    """Puts host batches onto the `data` mesh axis; params are replicated."""

    def __init__(self):
        # Auto axes: the compiler propagates the batch sharding through the model (GSPMD).
        self.mesh = jax.make_mesh((jax.device_count(),), ("data",),
                                  axis_types=(jax.sharding.AxisType.Auto,))
        self.data = NamedSharding(self.mesh, PartitionSpec("data"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    def batch(self, batch: dict) -> dict:
        """Device arrays for the model inputs, labels and weights (this process's rows)."""
        out = {}
        for k, v in batch.items():
            if k == "index":  # host-side bookkeeping only
                continue
            per = v.shape[0] // jax.process_count()
            lo = jax.process_index() * per
            out[k] = jax.make_array_from_process_local_data(self.data, v[lo:lo + per])
        return out

    def gather(self, tree):
        """Host numpy copies of (possibly multi-host) arrays."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.process_allgather(tree, tiled=True)
        return jax.device_get(tree)


def _eval_suffix(task: Task, split: str) -> str:
    if len(task.eval_splits) == 1:
        return ""
    return "_" + split.removeprefix("validation_")


def score(eval_step, params, enc, task: Task, batch_size: int, buckets, pad_id: int,
          sharder: _Sharder, desc: str = "", progress: bool = False):
    """Predictions and per-example losses for every example of `enc`, in split order.

    All batches are dispatched before any result is fetched, so the host syncs once.
    """
    preds = np.zeros(len(enc), np.float32 if task.is_regression else np.int64)
    loss = np.zeros(len(enc), np.float64)
    scored = np.zeros(len(enc), np.int64)
    indices, pending = [], []
    for batch in tqdm(eval_batches(enc, batch_size, buckets, pad_id),
                      total=num_train_batches(len(enc), batch_size), desc=desc, leave=False,
                      disable=not progress):
        result = eval_step(params, sharder.batch(batch))
        indices.append(batch["index"])  # host-side: never gathered across processes
        pending.append({k: result[k] for k in ("predictions", "loss")})
    for index, result in zip(indices, sharder.gather(pending)):
        real = index >= 0
        preds[index[real]] = result["predictions"][real]
        loss[index[real]] = result["loss"][real]
        np.add.at(scored, index[real], 1)
    if not (scored == 1).all():  # a bug, not a user error: every example exactly once
        raise AssertionError(f"{desc}: {int((scored != 1).sum())} examples not scored once")
    return preds, loss


def evaluate(eval_step, params, encs: dict, task: Task, cfg: RunConfig, pad_id: int,
             sharder: _Sharder, buckets, progress: bool) -> dict:
    """Scores every example of each eval split once; metrics on host."""
    out = {}
    losses = []
    for split, enc in encs.items():
        preds, loss = score(eval_step, params, enc, task, cfg.eval_batch_size, buckets, pad_id,
                            sharder, f"eval {split}", progress)
        suffix = _eval_suffix(task, split)
        out[f"eval_loss{suffix}"] = float(loss.mean())
        out[f"eval_examples{suffix}"] = len(preds)
        losses.append(float(loss.mean()))
        for name, value in compute_metrics(task, preds, enc.labels).items():
            out[f"eval_{name}{suffix}"] = value
    if len(encs) > 1:
        out["eval_loss"] = float(np.mean(losses))
    return out


def _check_finite(losses: list, step: int, out: Path) -> None:
    """Stops the run on a NaN/inf loss among the last `len(losses)` steps ending at `step`."""
    finite = np.isfinite(np.asarray(losses, np.float64))
    if not finite.all():
        bad = step - len(losses) + 1 + int(np.argmin(finite))
        raise JaxpeftError(f"non-finite training loss at step {bad} (try a lower "
                           f"--learning_rate); the best adapter and metrics so far are in {out}")


def main_metric_key(task: Task) -> str:
    """The results key that picks the best checkpoint (MNLI: matched accuracy)."""
    return f"eval_{task.main_metric}{_eval_suffix(task, task.eval_splits[0])}"


def _format_row(row: dict, keys: list) -> str:
    parts = []
    for k in keys:
        v, w = row.get(k), max(len(k), 8)
        parts.append(f"{v:>{w}.4f}" if isinstance(v, float) else f"{'-' if v is None else v!s:>{w}}")
    return "  ".join(parts)


def predict(eval_step, params, task: Task, cfg: RunConfig, tokenizer, sharder, buckets,
            writer: RunWriter, cache_dir: Optional[str]) -> list:
    """Writes GLUE submission files for the test split(s) into `<output_dir>/predict/`."""
    written = []
    names = TSV_LABELS.get(task.name, task.label_names)
    for split, filename in task.submission.items():
        data = load_split(task, split, cfg.data_dir or None, cfg.hub_dataset)
        enc = tokenize(data, tokenizer, cfg.max_seq_length, cache_dir)
        preds, _ = score(eval_step, params, enc, task, cfg.eval_batch_size, buckets,
                         tokenizer.pad_token_id, sharder, f"predict {split}")
        if task.is_regression:
            values = [f"{min(max(float(p), 0.0), 5.0):.3f}" for p in preds]
        else:
            values = [names[int(p)] for p in preds]
        path = Path(cfg.output_dir) / "predict" / filename
        writer.write_predictions(path, data.idx, values)
        written.append(str(path))
    return written


def _load_eval_splits(task, cfg):
    splits = {}
    for name in task.eval_splits:
        split = load_split(task, name, cfg.data_dir or None, cfg.hub_dataset)
        splits[name] = split.take(cfg.max_eval_samples) if cfg.max_eval_samples else split
    return splits


def train_and_evaluate(cfg: RunConfig,
                       on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Runs one fine-tuning job and returns the contents of `results.json`.

    `on_step(step)` is called after every optimizer step (for tests and tooling).
    """
    if cfg.multihost:
        jax.distributed.initialize()
    task = validate(cfg)
    lora = cfg.lora()
    lr = cfg.resolved_learning_rate()
    is_writer = jax.process_index() == 0
    cache_dir = os.path.expanduser(cfg.cache_dir) if cfg.cache_dir else None

    # ---- data and model (errors here happen before anything is written) ----------------
    pre = load_pretrained(cfg.model, num_labels=task.num_labels, dtype=cfg.dtype, seed=cfg.seed)
    # RoBERTa's positions start after its padding index (as transformers counts them).
    position_offset = pre.config.pad_token_id + 1 if pre.config.model_type == "roberta" else 0
    max_len = pre.config.max_position_embeddings - position_offset
    if cfg.max_seq_length > max_len:
        raise JaxpeftError(f"--max_seq_length={cfg.max_seq_length} exceeds what {cfg.model} "
                           f"supports ({max_len})")
    train_split = load_split(task, "train", cfg.data_dir or None, cfg.hub_dataset)
    if cfg.max_train_samples:
        train_split = train_split.take(cfg.max_train_samples)
    eval_splits = _load_eval_splits(task, cfg)
    tok = pre.tokenizer
    train_enc = tokenize(train_split, tok, cfg.max_seq_length, cache_dir)
    eval_encs = {k: tokenize(v, tok, cfg.max_seq_length, cache_dir) for k, v in eval_splits.items()}
    buckets = bucket_lengths(cfg.max_seq_length)
    packing = None
    if cfg.packing:
        # Row counts are a multiple of the device count, so rows shard evenly.
        packing = Packing(cfg.max_seq_length, position_offset=position_offset,
                          row_multiple=math.lcm(2, jax.device_count()))

    model, params = pre.model, pre.params
    target = None
    if task.is_regression and cfg.standardize_targets:
        # A fixed map to the label scale: the head starts at the mean instead of near 0.
        target = (float(np.mean(train_split.labels)), float(np.std(train_split.labels)) or 1.0)
        model = model.clone(runtime=dataclasses.replace(
            model.runtime, target_mean=target[0], target_std=target[1]))
    if lora is not None:
        params = add_lora(params, lora, jax.random.key(cfg.seed + 1))
        model = lora_model(model, lora)
    mask = trainable_mask(params, cfg.method, cfg.train_pooler)
    counts = count_params(params, mask)

    steps_per_epoch = num_train_batches(len(train_enc), cfg.batch_size)
    total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * steps_per_epoch)
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    optim_cfg = OptimConfig(learning_rate=lr, total_steps=total_steps,
                            warmup_steps=min(warmup, total_steps), weight_decay=cfg.weight_decay,
                            max_grad_norm=cfg.max_grad_norm)
    tx = make_optimizer(optim_cfg, params, mask)

    config_dict = {
        "run": dataclasses.asdict(cfg),
        "resolved": {"learning_rate": lr, "total_steps": total_steps, "warmup_steps":
                     optim_cfg.warmup_steps, "steps_per_epoch": steps_per_epoch,
                     "train_examples": len(train_enc),
                     "eval_examples": {k: len(v) for k, v in eval_encs.items()},
                     "bucket_lengths": list(buckets), "model_path": str(pre.path),
                     "newly_initialized": list(pre.newly_initialized),
                     "lora_scale": lora.scale if lora else None,
                     "target_mean_std": target,
                     "main_metric": main_metric_key(task)},
        "model_config": pre.config.to_dict(),
        "params": counts.to_dict(),
        "versions": {"jaxpeft": jaxpeft.__version__, "jax": jax.__version__,
                     "python": sys.version.split()[0]},
        "devices": {"kind": jax.devices()[0].device_kind, "count": jax.device_count(),
                    "processes": jax.process_count(), "platform": jax.default_backend()},
    }
    resuming = prepare_output_dir(cfg, config_dict) if is_writer else cfg.resume
    out = Path(cfg.output_dir)
    writer = RunWriter(out, enabled=is_writer)
    if not resuming:
        writer.write_config(config_dict)
    if is_writer:
        tqdm.write(f"{task.name} / {cfg.method} / {cfg.model}: {counts}")

    # ---- state, steps, checkpoints ----------------------------------------------------
    sharder = _Sharder()
    state = jax.device_put(create_train_state(params, mask, tx), sharder.replicated)
    del params
    train_step = make_train_step(model, tx)
    eval_step = make_eval_step(model)
    ckpt = Checkpointer(out / "checkpoints")
    rng = jax.random.key(cfg.seed)
    step, best, meta, last_eval = 0, None, {}, None
    if resuming and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        step = int(meta["step"])
        best = meta.get("best")
        writer.truncate_after(step)
        print(f"Resuming {out} from step {step}")
    elif resuming:
        writer.truncate_after(0)
    recent_loss = None
    if resuming:
        rows = writer.rows()
        evals = [r for r in rows if main_metric_key(task) in r]
        last_eval = evals[-1] if evals else None
        logged = [r["train_loss"] for r in rows if "learning_rate" in r]
        recent_loss = logged[-1] if logged else None
    train_wall = float(meta.get("train_wall_s", 0.0))
    examples_seen = int(meta.get("examples", 0))

    main_key = main_metric_key(task)
    columns = ["step", "epoch", "train_loss"] + [
        k for k in ["eval_loss"] + [f"eval_{m}{_eval_suffix(task, s)}"
                                    for s in task.eval_splits for m in task.metrics]]
    counter = _compile_counter()
    compiles_before = counter.count
    counter.active = True
    pad_id = tok.pad_token_id
    header_printed = False

    def bookkeeping():
        return {"step": step, "best": best, "train_wall_s": train_wall, "examples": examples_seen}

    def do_eval(epoch_f: float, train_loss: Optional[float]):
        nonlocal best, last_eval, header_printed
        row = {"step": step, "epoch": round(epoch_f, 4), "train_loss": train_loss}
        row.update(evaluate(eval_step, state.params, eval_encs, task, cfg, pad_id, sharder,
                            buckets, cfg.progress))
        writer.log(row)
        last_eval = row
        if not header_printed:
            tqdm.write("  ".join(f"{c:>{max(len(c), 8)}}" for c in columns))
            header_printed = True
        tqdm.write(_format_row(row, columns))
        if best is None or row[main_key] > best[main_key]:
            best = {k: v for k, v in row.items() if k.startswith("eval_") or k == "step"}
            if is_writer:
                save_adapter(out / "best", jax.device_get(state.params), mask, method=cfg.method,
                             base_model=cfg.model, config=pre.config, lora=lora,
                             train_pooler=cfg.train_pooler, target=target)

    bar = tqdm(total=total_steps, initial=step, desc=f"train {task.name} {cfg.method}",
               disable=not cfg.progress, dynamic_ncols=True)
    window, window_examples, window_t0 = [], 0, time.perf_counter()
    t0 = time.perf_counter()
    try:
        while step < total_steps:
            epoch, start = divmod(step, steps_per_epoch)
            for batch in train_batches(train_enc, cfg.batch_size, buckets, pad_id, cfg.seed,
                                       epoch, start=start, packing=packing):
                n_real = int(batch["weights"].sum())
                state, metrics = train_step(state, sharder.batch(batch), rng)
                step += 1
                examples_seen += n_real
                window.append(metrics)
                window_examples += n_real
                bar.update(1)
                end_of_epoch = step % steps_per_epoch == 0
                done = step >= total_steps
                if step % cfg.log_every == 0 or done:
                    # The only host sync of the loop (besides eval): fetch the window at once.
                    fetched = jax.device_get(window)
                    losses = [float(m["loss"]) for m in fetched]
                    now = time.perf_counter()
                    recent_loss = float(np.mean(losses))
                    row = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                           "train_loss": recent_loss,
                           "learning_rate": learning_rate_at(optim_cfg, step - 1),
                           **{k: float(np.mean([m[k] for m in fetched])) for k in STEP_STATS},
                           "examples_per_s": window_examples / max(now - window_t0, 1e-9)}
                    _check_finite(losses, step, out)
                    writer.log(row)
                    bar.set_postfix(loss=f"{recent_loss:.4f}")
                    window, window_examples, window_t0 = [], 0, now
                if (cfg.eval_every and step % cfg.eval_every == 0) or end_of_epoch or done:
                    _check_finite(jax.device_get([m["loss"] for m in window]), step, out)
                    train_wall += time.perf_counter() - t0
                    do_eval(step / steps_per_epoch, recent_loss)
                    t0 = time.perf_counter()
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or done:
                    train_wall += time.perf_counter() - t0
                    ckpt.save(step, state, bookkeeping())
                    t0 = time.perf_counter()
                if on_step is not None:
                    on_step(step)
                if done:
                    break
        train_wall += time.perf_counter() - t0
    finally:
        bar.close()
        counter.active = False
        ckpt.close()
    compilations = counter.count - compiles_before

    results = {
        "task": task.name, "method": cfg.method, "model": cfg.model,
        "params": counts.to_dict(),
        "final": {k: v for k, v in (last_eval or {}).items()
                  if k.startswith("eval_") or k == "step"},
        "best": best,
        "main_metric": main_key,
        "train": {"steps": step, "epochs": step / steps_per_epoch, "wall_s": train_wall,
                  "examples": examples_seen,
                  "examples_per_s": examples_seen / train_wall if train_wall else 0.0,
                  "compilations": compilations},
        "learning_rate": lr,
    }
    if cfg.do_predict or cfg.export_peft:
        # `pre.params` is still the untouched base (the train state owns copies).
        best_model, best_params = load_adapter(out / "best", pre)
        if cfg.do_predict:
            results["predictions"] = predict(make_eval_step(best_model), best_params, task, cfg,
                                             tok, sharder, buckets, writer, cache_dir)
        if cfg.export_peft and is_writer:
            export_peft(out / "peft", best_params, trainable_mask(best_params, "lora",
                                                                  cfg.train_pooler),
                        lora, base_model=cfg.model, train_pooler=cfg.train_pooler,
                        target=target)
            results["peft_export"] = str(out / "peft")
    writer.write_results(results)
    tqdm.write(f"best {main_key} {best[main_key]:.4f} at step {best['step']}; "
               f"{results['train']['examples_per_s']:.1f} train examples/s; "
               f"results in {out / RESULTS}")
    return results


def cli_main(cfg: RunConfig) -> int:
    """Runs `train_and_evaluate` for the command line: user errors print one line, exit 1."""
    from absl import logging as absl_logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # orbax and jax log every checkpoint step at INFO through absl: keep the console readable.
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        train_and_evaluate(cfg)
    except JaxpeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; continue with --resume (output in {cfg.output_dir})",
              file=sys.stderr)
        return 130
    return 0
