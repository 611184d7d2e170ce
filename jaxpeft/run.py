"""`train_and_evaluate`: one fine-tuning run from a `RunConfig`, with all its files.

The recipe reads top to bottom: validate the options, build the run (data, model, PEFT
method, optimizer; nothing is written yet), prepare the output folder, restore a checkpoint,
train with periodic evaluation and checkpoints, finish (results, predictions, peft export).
The pieces live in modules named for their noun: `config` (options and validation),
`distributed` (mesh and sharding), `evaluation` (scoring), `outputs` (the run folder),
`writer` (its files), `checkpointing` (orbax), `train` (the jitted steps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

import jaxpeft
from jaxpeft import distributed
from jaxpeft.checkpointing import Checkpointer
from jaxpeft.config import RunConfig, check_fits_model, validate
from jaxpeft.data import Task, load_split
from jaxpeft.data.batching import (Encoded, Packing, add_virtual_slots, bucket_lengths,
                                   num_train_batches, tokenize, train_batches)
from jaxpeft.errors import JaxpeftError, RunInterrupted
from jaxpeft.evaluation import Evaluator, main_metric_key, metric_columns, trivial_baseline
from jaxpeft.models import Pretrained, load_pretrained
from jaxpeft.models.checkpoint import portable_name
from jaxpeft.optim import OptimConfig, learning_rate_at, make_optimizer
from jaxpeft.outputs import RunLock, check_output_dir, prepare_output_dir
from jaxpeft.peft import (ParamCounts, Peft, combine, export_merged, export_peft, load_adapter,
                          peft_from_run, save_adapter)
from jaxpeft.train import (STEP_STATS, CompileCounter, check_compiler_options,
                           create_train_state, make_eval_step, make_train_step,
                           use_compilation_cache)
from jaxpeft.writer import RESULTS, RunWriter


@dataclasses.dataclass
class Setup:
    """What a run is built from, before anything is written: data, model, method, optimizer.

    `params` (the base tree with the method's leaves) is handed to the training state by
    `TrainLoop`, which then drops it here, so the base weights stay on the device once.
    """

    cfg: RunConfig
    task: Task
    pre: Pretrained
    peft: Peft
    model: Any
    params: Any
    train_enc: Encoded
    eval_encs: dict
    packing: Optional[Packing]
    optim: OptimConfig
    steps_per_epoch: int
    target: Optional[tuple]
    counts: ParamCounts
    cache_dir: Optional[str]

    @property
    def buckets(self) -> tuple:
        """Padded lengths of unpacked batches."""
        return bucket_lengths(self.cfg.max_seq_length)


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
                         "main_metric": main_metric_key(self.task)},
            "model_config": pre.config.to_dict(),
            "params": self.counts.to_dict(),
            "versions": {"jaxpeft": jaxpeft.__version__, "jax": jax.__version__,
                         "python": sys.version.split()[0]},
            "devices": {"kind": jax.devices()[0].device_kind, "count": jax.device_count(),
                        "processes": jax.process_count(), "platform": jax.default_backend(),
                        # The steps' speed depends on it (docs/performance.md), so say which.
                        "malloc": os.environ.get("GLIBC_TUNABLES") or "default"},
        }


def _encode_data(cfg: RunConfig, task: Task, tokenizer,
                 cache_dir: Optional[str]) -> tuple[Encoded, dict]:
    train = load_split(task, "train", cfg.data_dir or None, cfg.hub_dataset)
    evals = {name: load_split(task, name, cfg.data_dir or None, cfg.hub_dataset)
             for name in task.eval_splits}
    if cfg.max_train_samples:
        train = train.take(cfg.max_train_samples)
    if cfg.max_eval_samples:
        evals = {k: v.take(cfg.max_eval_samples) for k, v in evals.items()}
    return (tokenize(train, tokenizer, cfg.max_seq_length, cache_dir),
            {k: tokenize(v, tokenizer, cfg.max_seq_length, cache_dir) for k, v in evals.items()})


def build(cfg: RunConfig, task: Task) -> Setup:
    """Loads model and data and builds method and optimizer (user errors surface here)."""
    pre = load_pretrained(cfg.model, num_labels=task.num_labels, dtype=cfg.dtype, seed=cfg.seed)
    # RoBERTa's positions start after its padding index (as transformers counts them).
    position_offset = pre.config.position_offset
    peft = peft_from_run(cfg)
    check_fits_model(cfg, pre.config.max_position_embeddings - position_offset,
                     peft.virtual_tokens)
    cache_dir = str(Path(cfg.cache_dir).expanduser()) if cfg.cache_dir else None
    train_enc, eval_encs = _encode_data(cfg, task, pre.tokenizer, cache_dir)
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
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    optim = OptimConfig(learning_rate=cfg.resolved_learning_rate(), total_steps=total_steps,
                        warmup_steps=min(warmup, total_steps), weight_decay=cfg.weight_decay,
                        max_grad_norm=cfg.max_grad_norm)
    return Setup(cfg, task, pre, peft, model, params, train_enc, eval_encs, packing, optim,
                 steps_per_epoch, target, peft.count(params), cache_dir)


class Stopwatch:
    """Wall time of one phase, paused around others (evaluation, checkpoints)."""

    def __init__(self, elapsed: float = 0.0):
        self._elapsed, self._since = elapsed, None

    @property
    def elapsed(self) -> float:
        """Seconds counted so far."""
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self._elapsed + running

    @contextlib.contextmanager
    def running(self):
        """Counts time inside the block."""
        self._since = time.perf_counter()
        try:
            yield self
        finally:
            self._elapsed, self._since = self.elapsed, None

    @contextlib.contextmanager
    def paused(self):
        """Stops counting inside the block (of a `running` one)."""
        self._elapsed, self._since = self.elapsed, None
        try:
            yield
        finally:
            self._since = time.perf_counter()


def _check_finite(losses: list, step: int, out: Path) -> None:
    """Stops the run on a NaN/inf loss among the last `len(losses)` steps ending at `step`."""
    finite = np.isfinite(np.asarray(losses, np.float64))
    if not finite.all():
        bad = step - len(losses) + 1 + int(np.argmin(finite))
        raise JaxpeftError(f"non-finite training loss at step {bad} (try a lower "
                           f"--learning_rate); the best adapter and metrics so far are in {out}")


def _format_row(row: dict, keys: list) -> str:
    parts = []
    for k in keys:
        v, w = row.get(k), max(len(k), 8)
        parts.append(f"{v:>{w}.4f}" if isinstance(v, float) else f"{'-' if v is None else v!s:>{w}}")
    return "  ".join(parts)


class StopSignals:
    """While active, SIGTERM (preemption) and SIGINT only set `received`: the loop then
    checkpoints after the current step and stops cleanly. A second SIGINT interrupts at once.
    Installed only in the main thread (where Python delivers signals)."""

    def __init__(self):
        self.received, self._previous = None, {}

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step (checkpoint, "
                   "then exit)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class TrainLoop:
    """The training loop and what it carries between steps: state, best, log window, clock."""

    def __init__(self, setup: Setup, writer: RunWriter,
                 on_step: Optional[Callable[[int], None]] = None):
        self.setup, self.cfg, self.writer, self.on_step = setup, setup.cfg, writer, on_step
        self.out = Path(setup.cfg.output_dir)
        self.sharder = distributed.Sharder()
        mask = setup.peft.mask(setup.params)
        tx = make_optimizer(setup.optim, mask, setup.peft.lr_multipliers(setup.params))
        state, frozen = create_train_state(setup.params, mask, tx)
        self.state, self.frozen = self.sharder.replicate(state), self.sharder.replicate(frozen)
        self._base_paths = set(traverse_util.flatten_dict(setup.pre.params))
        setup.params, setup.pre = None, dataclasses.replace(setup.pre, params=None)
        self.train_step = make_train_step(setup.model, tx, self.cfg.xla_options())
        self.evaluator = Evaluator(make_eval_step(setup.model), setup.task,
                                   self.cfg.eval_batch_size, setup.buckets,
                                   setup.pre.tokenizer.pad_token_id, self.sharder,
                                   self.cfg.progress, setup.packing,
                                   setup.peft.virtual_tokens)
        self.ckpt = Checkpointer(self.out / "checkpoints")
        self.main_key = main_metric_key(setup.task)
        self.rng = jax.random.key(self.cfg.seed)
        self.step, self.examples, self.clock = 0, 0, Stopwatch()
        self.best, self.last_eval, self.recent_loss = None, None, None
        self.window, self.window_examples, self.window_t0 = [], 0, 0.0
        self.header_printed, self.compilations = False, 0
        self.signals = StopSignals()

    @property
    def params(self) -> Any:
        """The full parameter tree (trainable leaves from the state, frozen ones shared)."""
        return combine(self.state.trainable, self.frozen)

    def base_params(self) -> Any:
        """The base model's tree (the method's own leaves left out), for re-applying an
        adapter without loading the checkpoint again."""
        flat = traverse_util.flatten_dict(self.params)
        return traverse_util.unflatten_dict({p: v for p, v in flat.items()
                                             if p in self._base_paths})

    def restore(self) -> None:
        """Continues from the latest checkpoint (or from scratch if there is none yet)."""
        meta = {}
        if self.ckpt.latest_step() is not None:
            self.state, meta = self.ckpt.restore_intact(self.state)
            print(f"Resuming {self.out} from step {int(meta['step'])}")
        self.step, self.best = int(meta.get("step", 0)), meta.get("best")
        self.clock, self.examples = Stopwatch(float(meta.get("train_wall_s", 0.0))), \
            int(meta.get("examples", 0))
        self.window = list(meta.get("window", []))
        self.window_examples = int(meta.get("window_examples", 0))
        train_rows, eval_rows = self.writer.truncate_after(self.step)
        self.last_eval = eval_rows[-1] if eval_rows else None
        self.recent_loss = train_rows[-1]["train_loss"] if train_rows else None

    def run(self) -> None:
        """Trains to the last step, evaluating and checkpointing on the way."""
        cfg, total = self.cfg, self.setup.optim.total_steps
        # disable=None: tqdm turns itself off when stderr is not a terminal (log files).
        bar = tqdm(total=total, initial=self.step, dynamic_ncols=True,
                   disable=None if cfg.progress else True,
                   desc=f"train {self.setup.task.name} {cfg.method}")
        self.window_t0 = time.perf_counter()
        try:
            with CompileCounter.shared().counting() as compiles, self.clock.running(), \
                    self.signals:
                while self.step < total:
                    epoch, start = divmod(self.step, self.setup.steps_per_epoch)
                    for batch in train_batches(self.setup.train_enc, cfg.batch_size,
                                               self.setup.buckets,
                                               self.setup.pre.tokenizer.pad_token_id, cfg.seed,
                                               epoch, start=start, packing=self.setup.packing):
                        self._train_step(batch)
                        bar.update(1)
                        if self._after_step(bar):
                            break
                self.compilations = compiles()
        finally:
            bar.close()
            self.ckpt.close()

    def _train_step(self, batch: dict) -> None:
        n_real = int(batch["weights"].sum())
        self.state, metrics = self.train_step(self.state, self.sharder.batch(batch),
                                              self.rng, self.frozen)
        self.step += 1
        self.examples += n_real
        self.window.append(metrics)
        self.window_examples += n_real

    def _after_step(self, bar) -> bool:
        cfg, step = self.cfg, self.step
        done = step >= self.setup.optim.total_steps
        if step % cfg.log_every == 0 or done:
            self._log_window(bar)
        if (cfg.eval_every and step % cfg.eval_every == 0) or done \
                or step % self.setup.steps_per_epoch == 0:
            with self.clock.paused():
                self._evaluate()
        saved = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or done
        if saved:
            self._save_checkpoint()
        if self.on_step is not None:
            self.on_step(step)
        if self.signals.received is not None and not done:
            if not saved:
                self._save_checkpoint()
            name = signal.Signals(self.signals.received).name
            raise RunInterrupted(f"stopped by {name} at step {step} of "
                                 f"{self.setup.optim.total_steps}; checkpoint saved",
                                 self.signals.received)
        return done

    def _save_checkpoint(self) -> None:
        # The log window goes along, so the first train_loss row after resuming averages
        # the same steps as an uninterrupted run's.
        with self.clock.paused():
            self.ckpt.save(self.step, self.state, {
                "step": self.step, "best": self.best, "train_wall_s": self.clock.elapsed,
                "examples": self.examples,
                "window": [{k: float(v) for k, v in m.items()}
                           for m in jax.device_get(self.window)],
                "window_examples": self.window_examples})

    def _log_window(self, bar) -> None:
        # The loop's only host sync besides evaluation: the whole window is fetched at once.
        fetched = jax.device_get(self.window)
        losses = [float(m["loss"]) for m in fetched]
        now = time.perf_counter()
        self.recent_loss = float(np.mean(losses))
        _check_finite(losses, self.step, self.out)
        self.writer.log({
            "step": self.step, "epoch": round(self.step / self.setup.steps_per_epoch, 4),
            "train_loss": self.recent_loss,
            "train_learning_rate": learning_rate_at(self.setup.optim, self.step - 1),
            **{f"train_{k}": float(np.mean([float(m[k]) for m in fetched])) for k in STEP_STATS},
            "train_examples_per_s": self.window_examples / max(now - self.window_t0, 1e-9)})
        bar.set_postfix(loss=f"{self.recent_loss:.4f}")
        self.window, self.window_examples, self.window_t0 = [], 0, now

    def _evaluate(self) -> None:
        _check_finite(jax.device_get([m["loss"] for m in self.window]), self.step, self.out)
        row = {"step": self.step, "epoch": round(self.step / self.setup.steps_per_epoch, 4),
               **self.evaluator.evaluate(self.params, self.setup.eval_encs)}
        self.writer.log(row)
        self.last_eval = row
        columns = ["step", "epoch", "train_loss"] + metric_columns(self.setup.task)
        if not self.header_printed:
            tqdm.write("  ".join(f"{c:>{max(len(c), 8)}}" for c in columns))
            self.header_printed = True
        tqdm.write(_format_row({**row, "train_loss": self.recent_loss}, columns))
        if self.best is None or row[self.main_key] > self.best[self.main_key]:
            self.best = {k: v for k, v in row.items() if k.startswith("eval_") or k == "step"}
            if self.writer.enabled:
                save_adapter(self.out / "best", self.setup.peft, self.params,
                             base_model=self.cfg.model, config=self.setup.pre.config,
                             target=self.setup.target,
                             run={"task": self.setup.task.name,
                                  "max_seq_length": self.cfg.max_seq_length})


def _predict_and_export(loop: TrainLoop, writer: RunWriter) -> dict:
    """GLUE test predictions and the peft export, both from the best adapter."""
    setup, cfg, out = loop.setup, loop.cfg, loop.out
    pre = dataclasses.replace(setup.pre, params=loop.base_params())
    model, params, peft = load_adapter(out / "best", pre)
    extra = {}
    if cfg.do_predict:
        evaluator = dataclasses.replace(loop.evaluator, eval_step=make_eval_step(model),
                                        progress=False)
        extra["predictions"] = []
        for task, split, filename in setup.task.prediction_files():
            data = load_split(task, split, cfg.data_dir or None, cfg.hub_dataset)
            enc = tokenize(data, pre.tokenizer, cfg.max_seq_length, setup.cache_dir)
            path = out / "predict" / filename
            # AX shares MNLI's labels: the same evaluator names its predictions.
            predict = dataclasses.replace(evaluator, task=task).predict
            writer.write_predictions(path, data.idx, predict(params, enc, f"predict {split}"))
            extra["predictions"].append(str(path))
    if cfg.export_merged and writer.enabled:
        export_merged(out / "merged", peft, params, base_dir=pre.path, tokenizer=pre.tokenizer,
                      label_names=setup.task.label_names, target=setup.target)
        extra["merged_export"] = str(out / "merged")
    if cfg.export_peft and writer.enabled:
        # peft's base_model_name_or_path must be something PyTorch resolves (not an alias).
        export_peft(out / "peft", peft, params, base_model=portable_name(cfg.model),
                    target=setup.target)
        extra["peft_export"] = str(out / "peft")
    return extra


def finish(loop: TrainLoop, writer: RunWriter) -> dict:
    """Writes `results.json` (after predictions and export, if asked) and returns it."""
    setup, cfg = loop.setup, loop.cfg
    wall = loop.clock.elapsed
    results = {
        "task": setup.task.name, "method": cfg.method, "model": cfg.model,
        "params": setup.counts.to_dict(),
        "final": {k: v for k, v in (loop.last_eval or {}).items()
                  if k.startswith("eval_") or k == "step"},
        "best": loop.best, "main_metric": loop.main_key,
        "train": {"steps": loop.step, "epochs": loop.step / setup.steps_per_epoch,
                  "wall_s": wall, "examples": loop.examples,
                  "examples_per_s": loop.examples / wall if wall else 0.0,
                  "compilations": loop.compilations},
        "learning_rate": setup.optim.learning_rate,
        "baseline": trivial_baseline(setup.task, setup.eval_encs),
    }
    # results.json first: if a step after training fails, the run's results stay, and
    # --resume redoes only that step.
    writer.write_results(results)
    if cfg.do_predict or cfg.export_peft or cfg.export_merged:
        results.update(_predict_and_export(loop, writer))
        writer.write_results(results)
    tqdm.write(f"best {loop.main_key} {loop.best[loop.main_key]:.4f} at step "
               f"{loop.best['step']}; {results['train']['examples_per_s']:.1f} train "
               f"examples/s; results in {loop.out / RESULTS}")
    warning = baseline_warning(results)
    if warning:
        tqdm.write(warning)
    return results


def baseline_warning(results: dict) -> Optional[str]:
    """A warning line when a run's best main metric does not beat its trivial baseline."""
    key, base = results["main_metric"], results.get("baseline") or {}
    if results.get("best") is None or key not in base or results["best"][key] > base[key]:
        return None
    what = ("predicting " + " / ".join(repr(p) for p in dict.fromkeys(base["prediction"].values()))
            + " for every example") if "prediction" in base else "a constant prediction"
    return (f"warning: best {key} {results['best'][key]:.4f} does not beat the trivial baseline "
            f"{base[key]:.4f} ({what}): the model has learned nothing measurable yet")


def train_and_evaluate(cfg: RunConfig,
                       on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Runs one fine-tuning job and returns the contents of `results.json`.

    `on_step(step)` is called after every optimizer step (for tests and tooling).
    """
    cfg = cfg.with_output_dir()
    distributed.initialize(cfg.multihost)

    def check():
        task = validate(cfg, jax.device_count())
        check_output_dir(cfg)  # before the model loads: a mistake here costs seconds
        check_compiler_options(cfg.xla_options())
        return task

    # With several processes, a user error on any of them stops all with its message.
    task = distributed.agree(check)
    if cfg.compilation_cache and cfg.cache_dir:
        use_compilation_cache(Path(cfg.cache_dir).expanduser() / "xla")
    setup = distributed.agree(lambda: build(cfg, task))
    config_dict = setup.config_dict()
    writer = RunWriter(cfg.output_dir, enabled=distributed.is_writer())
    with RunLock(cfg.output_dir) if writer.enabled else contextlib.nullcontext():
        return _run_locked(cfg, setup, config_dict, writer, on_step)


def _run_locked(cfg: RunConfig, setup: Setup, config_dict: dict, writer: RunWriter,
                on_step: Optional[Callable[[int], None]]) -> dict:
    task = setup.task
    # Process 0 decides (it alone reads and writes the folder); the others follow.
    resuming = distributed.agree(
        lambda: prepare_output_dir(cfg, config_dict) if writer.enabled else None)
    resuming = cfg.resume if resuming is None else resuming
    if not resuming:
        writer.write_config(config_dict)
    if writer.enabled:
        tqdm.write(f"{task.name} / {cfg.method} / {cfg.model}: {setup.counts}")
    loop = TrainLoop(setup, writer, on_step)
    if resuming:
        loop.restore()
        done = writer.read_results()
        if done is not None and loop.step >= setup.optim.total_steps:
            return _after_finished(loop, writer, done)
    if cfg.tensorboard:
        writer.start_tensorboard(config_dict, loop.step)
    try:
        loop.run()
        return finish(loop, writer)
    finally:
        writer.close()


def _after_finished(loop: TrainLoop, writer: RunWriter, results: dict) -> dict:
    """`--resume` on a finished run: nothing is retrained or rewritten except what was asked
    after training (predictions, peft export), done from `best/`."""
    cfg = loop.cfg
    loop.ckpt.close()
    asked = [w for w, on in (("predictions", cfg.do_predict), ("the peft export", cfg.export_peft),
                             ("the merged model", cfg.export_merged)) if on]
    if asked:
        results = {**results, **_predict_and_export(loop, writer)}
        writer.write_results(results)
        tqdm.write(f"{loop.out}: finished earlier; wrote " + ", ".join(asked))
    else:
        tqdm.write(f"{loop.out}: finished earlier at step {loop.step}; nothing to do")
    return results


def cli_logging() -> None:
    """Console logging for the scripts: warnings as plain lines, absl's INFO chatter off."""
    from absl import logging as absl_logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # orbax and jax log every checkpoint step at INFO through absl: keep the console readable.
    absl_logging.set_verbosity(absl_logging.WARNING)


def cli_main(cfg: RunConfig, work: Optional[Callable[[RunConfig], Any]] = None,
             resume_hint: str = "continue with --resume") -> int:
    """Runs `work` (default `train_and_evaluate`) for the command line: user errors print
    one line and return 1."""
    cli_logging()
    if work is None:
        cfg, work = cfg.with_output_dir(), train_and_evaluate
    try:
        work(cfg)
    except JaxpeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:
        print(f"{e}; {resume_hint} (output in {cfg.output_dir})", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"interrupted; {resume_hint} (output in {cfg.output_dir})", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"error: no space left on device ({e.filename or cfg.output_dir}); files "
              "written before are intact; free space and continue with --resume",
              file=sys.stderr)
        return 1
    return 0
