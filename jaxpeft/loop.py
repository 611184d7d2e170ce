"""The training loop (`TrainLoop`) and the small pieces it is made of: the log window of
step metrics (`LogWindow`), the best evaluation and its adapter (`BestTracker`), the clock
that pauses around evaluation (`Stopwatch`) and the stop signals (`StopSignals`).
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxpeft import distributed, tuning
from jaxpeft.checkpointing import Checkpointer
from jaxpeft.data.batching import train_batches
from jaxpeft.errors import JaxpeftError, RunInterrupted
from jaxpeft.evaluation import Evaluator, metric_columns, selection_key
from jaxpeft.optim import make_optimizer, make_schedule
from jaxpeft.peft import combine, save_adapter
from jaxpeft.setup import Setup
from jaxpeft.train import (STEP_STATS, CompileCounter, check_compiler_options,
                           create_train_state, make_eval_step, make_train_step)
from jaxpeft.writer import RunWriter


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


def check_finite(losses, step: int, out: Path) -> None:
    """Stops the run on a NaN/inf loss among the last `len(losses)` steps ending at `step`."""
    finite = np.isfinite(np.asarray(losses, np.float64))
    if not finite.all():
        bad = step - len(losses) + 1 + int(np.argmin(finite))
        raise JaxpeftError(f"non-finite training loss at step {bad} (try a lower "
                           f"--learning_rate); the best adapter and metrics so far are in {out}")


class LogWindow:
    """The step metrics since the last training row. They stay on the device until the row
    is written, the loop's one host sync besides evaluation; a checkpoint carries them, so
    the first row after resuming averages the same steps as an uninterrupted run's."""

    def __init__(self, metrics: tuple = (), examples: int = 0):
        self.metrics, self.examples = list(metrics), examples
        self.since = time.perf_counter()

    def add(self, metrics: dict, examples: int) -> None:
        """One step's metrics (device arrays) and its real example count."""
        self.metrics.append(metrics)
        self.examples += examples

    def losses(self) -> list:
        """The window's losses, fetched."""
        return [float(m["loss"]) for m in jax.device_get(self.metrics)]

    def row(self, step: int, out: Path) -> dict:
        """The training row's means (loss, `STEP_STATS`, examples/s) and a fresh window;
        stops the run on a non-finite loss."""
        fetched = jax.device_get(self.metrics)
        losses = [float(m["loss"]) for m in fetched]
        check_finite(losses, step, out)
        now = time.perf_counter()
        row = {"train_loss": float(np.mean(losses)),
               **{f"train_{k}": float(np.mean([float(m[k]) for m in fetched]))
                  for k in STEP_STATS},
               "train_examples_per_s": self.examples / max(now - self.since, 1e-9)}
        self.metrics, self.examples, self.since = [], 0, now
        return row

    def state(self) -> dict:
        """What a checkpoint keeps of the window."""
        return {"window": [{k: float(v) for k, v in m.items()}
                           for m in jax.device_get(self.metrics)],
                "window_examples": self.examples}


class BestTracker:
    """The best evaluation by the task's main metric; each new best's adapter goes to
    `<out>/best` (by the writing process)."""

    def __init__(self, key: str, best: Optional[dict] = None):
        self.key, self.best = key, best

    def update(self, row: dict) -> bool:
        """Whether `row` is a new best (then it becomes `best`)."""
        if self.best is not None and row[self.key] <= self.best[self.key]:
            return False
        self.best = {k: v for k, v in row.items()
                     if k.startswith(("eval_", "select_")) or k == "step"}
        return True


class TrainLoop:
    """The training loop: state, frozen weights, step count, log window, best, clock."""

    def __init__(self, setup: Setup, params: Any, writer: RunWriter,
                 on_step: Optional[Callable[[int], None]] = None):
        self.setup, self.cfg, self.writer, self.on_step = setup, setup.cfg, writer, on_step
        self.out = Path(setup.cfg.output_dir)
        self.sharder = distributed.Sharder(self.cfg.mesh)
        mask = setup.peft.mask(params)
        tx = setup.peft.wrap_optimizer(
            make_optimizer(setup.optim, mask, setup.peft.lr_multipliers(params)),
            setup.optim.total_steps)
        # `frozen`: the base weights that do not train, held once (in their shards) and
        # handed to the export; the state is made in its shards.
        self.state, self.frozen = create_train_state(self.sharder.place(params), mask, tx,
                                                     self.sharder.shardings)
        self.tx = tx
        # With --train_step_xla_options=auto the options (and so the step) wait for `run`:
        # a resumed run takes the ones its checkpoint was trained with, a new one measures.
        auto = self.cfg.train_step_xla_options == tuning.AUTO
        self.step_options = None if auto else self.cfg.xla_options()
        self.train_step = None if auto else self._make_step(self.step_options)
        self.tune_s = 0.0
        self.schedule = make_schedule(setup.optim)
        self.evaluator = Evaluator(make_eval_step(setup.model), setup.task,
                                   self.cfg.eval_batch_size, setup.buckets, setup.pad_id,
                                   self.sharder, self.cfg.progress, setup.packing,
                                   setup.peft.virtual_tokens, self.cfg.select_on)
        self.rng = jax.random.key(self.cfg.seed)
        self.step, self.examples, self.clock = 0, 0, Stopwatch()
        self.best, self.window = BestTracker(
            selection_key(setup.task, self.cfg.select_on)), LogWindow()
        self.last_eval, self.recent_loss, self.compilations = None, None, 0
        self.header_printed, self.signals = False, StopSignals()

    def _make_step(self, options: dict):
        return make_train_step(self.setup.model, self.tx, options,
                               self.sharder.shardings(self.state), self.setup.peft.penalty)

    def choose_step_options(self) -> None:
        """`--train_step_xla_options=auto`: the options chosen earlier for this program on
        this machine, else the fastest candidate timed on the run's longest early batch
        (`jaxpeft.tuning`); builds the train step with them."""
        setup, cfg = self.setup, self.cfg
        batch = self._longest_early_batch()
        if batch is None:  # nothing to train on, so nothing to time
            self._use_step_options({})
            return
        batch = self.sharder.batch(batch)
        program = {"model": setup.pre.config.to_dict(), "peft": setup.peft.to_dict(),
                   "batch": {k: list(v.shape) for k, v in batch.items()},
                   "dtype": cfg.dtype, "mesh": self.sharder.describe()}
        xla_dir = cfg.xla_cache_dir()
        cache = tuning.OptionsCache(xla_dir / "step_options.json" if xla_dir else None)
        key = tuning.program_key(program)
        options, how = cache.get(key), "chosen earlier for this program on this machine"
        if options is None:
            start = time.perf_counter()
            options, measured = tuning.choose(self._make_step, check_compiler_options,
                                              self.state, batch, self.rng, self.frozen)
            self.tune_s = time.perf_counter() - start
            cache.put(key, options, measured)
            how = ("measured: " + ", ".join(f"{tuning.describe(m['options'])} "
                                            f"{m['step_ms']:.0f} ms" for m in measured)
                   if measured else f"no candidates on {jax.default_backend()}")
        self._use_step_options(options)
        if self.writer.enabled:
            tqdm.write(f"train step XLA options (auto): {tuning.describe(options)} ({how})")

    def _use_step_options(self, options: dict) -> None:
        self.step_options, self.train_step = dict(options), self._make_step(options)

    def _longest_early_batch(self) -> Optional[dict]:
        """The first batch of the longest bucket among the first epoch's early batches (None
        if the epoch has none)."""
        setup, cfg, longest = self.setup, self.cfg, None
        batches = train_batches(setup.train_enc, cfg.batch_size, setup.buckets, setup.pad_id,
                                cfg.seed, 0, packing=setup.packing)
        for i, batch in enumerate(batches):
            if longest is None or batch["input_ids"].shape[-1] > \
                    longest["input_ids"].shape[-1]:
                longest = batch
            if longest["input_ids"].shape[-1] >= max(setup.buckets) or i >= 64:
                break
        return longest

    @functools.cached_property
    def ckpt(self) -> Checkpointer:
        """The run's checkpoints, opened on first use: the folder is prepared by then."""
        return Checkpointer(self.out / "checkpoints")

    def memory(self) -> dict:
        """The mesh and the bytes one device holds of the parameters (trainable and frozen)
        and of the optimizer state (config.json's `devices`)."""
        return {"mesh": self.sharder.describe(),
                "bytes_per_device": {
                    "params": distributed.bytes_per_device((self.state.trainable, self.frozen)),
                    "optimizer_state": distributed.bytes_per_device(self.state.opt_state)}}

    @property
    def params(self) -> Any:
        """The full parameter tree (trainable leaves from the state, frozen ones shared)."""
        return combine(self.state.trainable, self.frozen)

    def restore(self) -> None:
        """Continues from the latest checkpoint (or from scratch if there is none yet)."""
        meta = {}
        if self.ckpt.latest_step() is not None:
            self.state, meta = self.ckpt.restore_intact(self.state)
            print(f"Resuming {self.out} from step {int(meta['step'])}")
        self.step = int(meta.get("step", 0))
        if self.train_step is None and isinstance(meta.get("step_options"), dict):
            self._use_step_options(meta["step_options"])  # as the first part was trained
        self.best = BestTracker(self.best.key, meta.get("best"))
        self.clock = Stopwatch(float(meta.get("train_wall_s", 0.0)))
        self.examples = int(meta.get("examples", 0))
        self.window = LogWindow(meta.get("window", ()), int(meta.get("window_examples", 0)))
        train_rows, eval_rows = self.writer.truncate_after(self.step)
        self.last_eval = eval_rows[-1] if eval_rows else None
        self.recent_loss = train_rows[-1]["train_loss"] if train_rows else None

    def run(self) -> None:
        """Trains to the last step, evaluating and checkpointing on the way."""
        setup, total = self.setup, self.setup.optim.total_steps
        if self.train_step is None:
            self.choose_step_options()
        # disable=None: tqdm turns itself off when stderr is not a terminal (log files).
        bar = tqdm(total=total, initial=self.step, dynamic_ncols=True,
                   disable=None if self.cfg.progress else True,
                   desc=f"train {setup.task.name} {self.cfg.method}")
        self.window.since = time.perf_counter()
        try:
            with CompileCounter.shared().counting() as compiles, self.clock.running(), \
                    self.signals:
                while self.step < total:
                    epoch, start = divmod(self.step, setup.steps_per_epoch)
                    for batch in train_batches(setup.train_enc, self.cfg.batch_size,
                                               setup.buckets, setup.pad_id, self.cfg.seed,
                                               epoch, start=start, packing=setup.packing):
                        self.state, metrics = self.train_step(
                            self.state, self.sharder.batch(batch), self.rng, self.frozen)
                        self.step += 1
                        n_real = int(batch["weights"].sum())
                        self.examples += n_real
                        self.window.add(metrics, n_real)
                        bar.update(1)
                        if self._after_step(bar):
                            break
                self.compilations = compiles()
        finally:
            bar.close()
            self.ckpt.close()

    def _after_step(self, bar) -> bool:
        cfg, step = self.cfg, self.step
        done = step >= self.setup.optim.total_steps
        if step % cfg.log_every == 0 or done:
            self._log(bar)
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
        with self.clock.paused():
            self.ckpt.save(self.step, self.state, {
                "step": self.step, "best": self.best.best, "train_wall_s": self.clock.elapsed,
                "examples": self.examples, "step_options": self.step_options,
                **self.window.state()})

    def _log(self, bar) -> None:
        row = self.window.row(self.step, self.out)
        self.recent_loss = row["train_loss"]
        self.writer.log({"step": self.step,
                         "epoch": round(self.step / self.setup.steps_per_epoch, 4),
                         "train_loss": row.pop("train_loss"),
                         "train_learning_rate": float(self.schedule(self.step - 1)), **row})
        bar.set_postfix(loss=f"{self.recent_loss:.4f}")

    def _evaluate(self) -> None:
        check_finite(self.window.losses(), self.step, self.out)
        row = {"step": self.step, "epoch": round(self.step / self.setup.steps_per_epoch, 4),
               **self.evaluator.evaluate(self.params, self.setup.eval_encs)}
        self.writer.log(row)
        self.last_eval = row
        columns = ["step", "epoch", "train_loss"] + metric_columns(self.setup.task,
                                                                   self.cfg.select_on)
        if not self.header_printed:
            tqdm.write("  ".join(f"{c:>{max(len(c), 8)}}" for c in columns))
            self.header_printed = True
        tqdm.write(_format_row({**row, "train_loss": self.recent_loss}, columns))
        if self.best.update(row):
            # Every process takes part: with parameters sharded over several processes the
            # trainable leaves are gathered to the host before process 0 writes them.
            trainable = self.sharder.gather(self.state.trainable)
            if not self.writer.enabled:
                return
            setup = self.setup
            save_adapter(self.out / "best", setup.peft, combine(trainable, self.frozen),
                         base_model=self.cfg.model,
                         config=setup.pre.config, target=setup.target,
                         run={"task": setup.task.name,
                              "max_seq_length": self.cfg.max_seq_length})


def _format_row(row: dict, keys: list) -> str:
    parts = []
    for k in keys:
        v, w = row.get(k), max(len(k), 8)
        parts.append(f"{v:>{w}.4f}" if isinstance(v, float) else f"{'-' if v is None else v!s:>{w}}")
    return "  ".join(parts)
