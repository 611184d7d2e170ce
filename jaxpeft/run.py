"""`train_and_evaluate`: one fine-tuning run from a `RunConfig`, with all its files.

The recipe reads top to bottom: validate the options, build the run (`setup.build`: data,
model, PEFT method, optimizer; nothing is written yet), prepare the output folder, restore a
checkpoint, train with periodic evaluation and checkpoints (`loop.TrainLoop`), finish
(results, predictions, exports from the best adapter). The other pieces live in modules named
for their noun: `config` (options and validation), `distributed` (mesh and sharding),
`evaluation` (scoring), `outputs` (the run folder), `writer` (its files), `checkpointing`
(orbax), `train` (the jitted steps), `cli` (the command-line runner).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Optional

import jax
from flax import traverse_util
from tqdm.auto import tqdm

from jaxpeft import distributed
from jaxpeft.cli import run_command
from jaxpeft.config import RunConfig, validate
from jaxpeft.data import load_split
from jaxpeft.data.batching import tokenize
from jaxpeft.evaluation import main_metric_key, trivial_baseline
from jaxpeft.loop import TrainLoop
from jaxpeft.models.checkpoint import portable_name
from jaxpeft.outputs import (LENGTH, ResumePlan, RunLock, check_output_dir,
                             prepare_output_dir)
from jaxpeft.peft import export_merged, export_peft
from jaxpeft.peft.adapters import read_adapter_weights
from jaxpeft.setup import Setup, build
from jaxpeft.train import check_compiler_options, use_compilation_cache
from jaxpeft.writer import CONFIG, METRICS, RESULTS, RunWriter


def best_params(directory: Path, frozen: Any) -> Any:
    """The full tree of a run's best adapter: its saved (trainable) leaves put into the
    places `frozen` leaves empty."""
    flat = dict(traverse_util.flatten_dict(frozen))
    for name, value in read_adapter_weights(directory).items():
        path = tuple(name.split("/"))
        if flat.get(path, 0) is not None:  # a frozen leaf, or no leaf at all
            raise AssertionError(f"{directory}: {name} is not a trainable leaf of this run")
        flat[path] = jax.numpy.asarray(value)
    return traverse_util.unflatten_dict(flat)


def predict_and_export(setup: Setup, loop: TrainLoop, writer: RunWriter) -> dict:
    """GLUE test predictions and the exports asked for, all from the best adapter, whose
    leaves join the loop's frozen tree (the base weights are never loaded twice)."""
    cfg, out = setup.cfg, loop.out
    params, peft = best_params(out / "best", loop.frozen), setup.peft
    exported = params
    if (cfg.export_merged or cfg.export_peft) and jax.process_count() > 1:
        # Base weights sharded over several processes: every process joins the gather, and
        # process 0 exports from the host copy (predictions keep the device tree).
        exported = best_params(out / "best", loop.sharder.gather(loop.frozen))
    extra = {}
    if cfg.do_predict:
        evaluator = dataclasses.replace(loop.evaluator, progress=False)
        extra["predictions"] = []
        for task, split, filename in setup.task.prediction_files():
            data = load_split(task, split, cfg.data_dir or None, cfg.hub_dataset)
            enc = tokenize(data, setup.pre.tokenizer, cfg.max_seq_length, setup.cache_dir)
            path = out / "predict" / filename
            # AX shares MNLI's labels: the same evaluator names its predictions.
            predict = dataclasses.replace(evaluator, task=task).predict
            writer.write_predictions(path, data.idx, predict(params, enc, f"predict {split}"))
            extra["predictions"].append(str(path))
    if cfg.export_merged and writer.enabled:
        export_merged(out / "merged", peft, exported, base_dir=setup.pre.path,
                      tokenizer=setup.pre.tokenizer, label_names=setup.task.label_names,
                      target=setup.target)
        extra["merged_export"] = str(out / "merged")
    if cfg.export_peft and writer.enabled:
        # peft's base_model_name_or_path must be something PyTorch resolves (not an alias).
        export_peft(out / "peft", peft, exported, base_model=portable_name(cfg.model),
                    target=setup.target, config=setup.pre.config)
        extra["peft_export"] = str(out / "peft")
    return extra


def mesh_line(devices: dict) -> str:
    """`mesh data:2,fsdp:4 over 8 cpu devices: per device, parameters 11.2 MiB, optimizer
    state 20.1 MiB` (from config.json's `devices`)."""
    held = devices["bytes_per_device"]
    return (f"mesh {devices['mesh']} over {devices['count']} {devices['platform']} devices: "
            f"per device, parameters {held['params'] / 2**20:.1f} MiB, optimizer state "
            f"{held['optimizer_state'] / 2**20:.1f} MiB")


def _exports_asked(cfg: RunConfig) -> list:
    return [what for what, on in (("predictions", cfg.do_predict),
                                  ("the peft export", cfg.export_peft),
                                  ("the merged model", cfg.export_merged)) if on]


def finish(setup: Setup, loop: TrainLoop, writer: RunWriter) -> dict:
    """Writes `results.json` (after predictions and export, if asked) and returns it."""
    cfg, wall, best = setup.cfg, loop.clock.elapsed, loop.best
    results = {
        "task": setup.task.name, "method": cfg.method, "model": cfg.model,
        "params": setup.counts.to_dict(),
        "final": {k: v for k, v in (loop.last_eval or {}).items()
                  if k.startswith("eval_") or k == "step"},
        "best": best.best, "main_metric": main_metric_key(setup.task), "selected_by": best.key,
        "train": {"steps": loop.step, "epochs": loop.step / setup.steps_per_epoch,
                  "wall_s": wall, "examples": loop.examples,
                  "examples_per_s": loop.examples / wall if wall else 0.0,
                  "compilations": loop.compilations,
                  # What --train_step_xla_options=auto chose (else the options given).
                  "xla_options": loop.step_options, "xla_options_tune_s": loop.tune_s},
        "learning_rate": setup.optim.learning_rate,
        "baseline": trivial_baseline(setup.task, setup.eval_encs, cfg.select_on,
                                     setup.train_enc.labels),
    }
    # results.json first: if a step after training fails, the run's results stay, and
    # --resume redoes only that step.
    writer.write_results(results)
    if _exports_asked(cfg):
        results.update(predict_and_export(setup, loop, writer))
        writer.write_results(results)
    main = results["main_metric"]
    scored = "" if best.key == main else f" ({main} {best.best[main]:.4f})"
    tqdm.write(f"best {best.key} {best.best[best.key]:.4f} at step {best.best['step']}{scored}; "
               f"{results['train']['examples_per_s']:.1f} train examples/s")
    warning = baseline_warning(results)
    if warning:
        tqdm.write(warning)
    if writer.enabled:
        tqdm.write(f"wrote {loop.out}: " + ", ".join(run_files(loop.out, results)))
    return results


def run_files(out: Path, results: dict, only_exports: bool = False) -> list:
    """The files and folders a finished run wrote into `out`, for the final line (only the
    predictions and exports with `only_exports`)."""
    names = [] if only_exports else [RESULTS, CONFIG, METRICS, "best/ (adapter)",
                                     "checkpoints/"]
    names += [os.path.relpath(p, out) for p in results.get("predictions", ())]
    if "peft_export" in results:
        names.append("peft/ (peft export)")
    if "merged_export" in results:
        names.append("merged/ (merged model)")
    return names


def baseline_warning(results: dict) -> Optional[str]:
    """A warning line when a run's best main metric does not beat its trivial baseline."""
    key, base = results["main_metric"], results.get("baseline") or {}
    if results.get("best") is None or key not in base or results["best"][key] > base[key]:
        return None
    what = ("predicting " + " / ".join(repr(p) for p in dict.fromkeys(base["prediction"].values()))
            + " for every example") if "prediction" in base else "a constant prediction"
    return (f"warning: best {key} {results['best'][key]:.4f} does not beat the trivial baseline "
            f"{base[key]:.4f} ({what}): the model has learned nothing measurable yet")


def fresh_leaves_notice(setup: Setup, frozen: Any) -> list:
    """Lines naming the leaves the checkpoint did not have (a new head): trained ones are
    said once; frozen ones (which would stay random) are a warning."""
    fresh = setup.pre.newly_initialized
    flat = traverse_util.flatten_dict(frozen)
    trained = [p for p in fresh if flat.get(tuple(p.split("/")), 0) is None]
    idle = [p for p in fresh if p not in trained]
    source = f"not in the checkpoint of {setup.cfg.model}"
    lines = []
    if trained:
        lines.append(f"new: {', '.join(trained)} ({source}; initialised with seed "
                     f"{setup.cfg.seed} and trained)")
    if idle:
        lines.append(f"warning: {', '.join(idle)} {'is' if len(idle) == 1 else 'are'} {source}"
                     f" and {setup.cfg.method} does not train "
                     f"{'it' if len(idle) == 1 else 'them'}: random weights in the model")
    return lines


def train_and_evaluate(cfg: RunConfig,
                       on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Runs one fine-tuning job and returns the contents of `results.json`.

    `on_step(step)` is called after every optimizer step (for tests and tooling).
    """
    cfg = cfg.with_output_dir()
    distributed.initialize(cfg.multihost, cfg.multihost_timeout)

    def check():
        task = validate(cfg, jax.device_count())
        plan = check_output_dir(cfg)  # before the model loads: a mistake here costs seconds
        check_compiler_options(cfg.xla_options())
        return task, plan

    # With several processes, a user error on any of them stops all with its message.
    task, plan = distributed.agree(check)
    if cfg.compilation_cache and cfg.cache_dir:
        use_compilation_cache(cfg.xla_cache_dir())
    # An extended run keeps its warmup; the decay is recomputed for the new total.
    warmup = plan.warmup_steps if plan is not None and plan.extends else None
    setup, params = distributed.agree(lambda: build(cfg, task, warmup_steps=warmup))
    writer = RunWriter(cfg.output_dir, enabled=distributed.is_writer())
    # The loop takes the tree over: from here on the base weights live in it alone.
    loop = TrainLoop(setup, params, writer, on_step)
    del params
    with RunLock(cfg.output_dir) if writer.enabled else contextlib.nullcontext():
        return _run_locked(setup, loop, writer, plan)


def _run_locked(setup: Setup, loop: TrainLoop, writer: RunWriter,
                plan: Optional[ResumePlan]) -> dict:
    cfg, config_dict = setup.cfg, setup.config_dict()
    config_dict["devices"].update(loop.memory())
    # Under the lock, process 0 checks the folder again (it alone writes it; an error there
    # stops every process). The others keep the plan `check` found: the folder is on a
    # filesystem every process sees, as orbax's checkpoints require.
    plan = distributed.agree(lambda: prepare_output_dir(cfg) if writer.enabled else plan)
    resuming = plan is not None
    if not resuming:
        writer.write_config(config_dict)
    if writer.enabled:
        tqdm.write(f"{setup.task.name} / {cfg.method} / {cfg.model}: {setup.counts}")
        if jax.device_count() > 1:
            tqdm.write(mesh_line(config_dict["devices"]))
        if not resuming:  # a resumed run restores these leaves: nothing new about them
            for line in fresh_leaves_notice(setup, loop.frozen):
                tqdm.write(line)
    if resuming:
        loop.restore()
        if plan is not None and plan.changed:
            record_changes(setup, loop, writer, plan, config_dict)
        done = writer.read_results()
        if done is not None and loop.step >= setup.optim.total_steps:
            return _after_finished(setup, loop, writer, done)
    if cfg.tensorboard:
        writer.start_tensorboard(config_dict, loop.step)
    try:
        loop.run()
        return finish(setup, loop, writer)
    finally:
        writer.close()


def record_changes(setup: Setup, loop: TrainLoop, writer: RunWriter, plan: ResumePlan,
                   config_dict: dict) -> None:
    """A resumed run with changed settings: config.json takes the new ones and keeps the
    saved run's under `history` (from which step each held); an extension says so."""
    history = plan.saved.get("history")
    entry = {"until_step": loop.step, "run": plan.saved["run"],
             "resolved": plan.saved["resolved"], "changed": plan.changed}
    writer.write_config({**config_dict,
                         "history": (history if isinstance(history, list) else []) + [entry]})
    if not writer.enabled:
        return
    if plan.extends:
        tqdm.write(f"extending {loop.out} from {plan.saved_total_steps} to {plan.total_steps} "
                   f"steps at step {loop.step}: the learning rate now decays to 0 at step "
                   f"{plan.total_steps} (warmup stays {plan.warmup_steps} steps)")
    other = {k: v for k, v in plan.changed.items() if k not in LENGTH}
    if other:
        tqdm.write("changed on resume: " + ", ".join(f"{k} {a!r} -> {b!r}"
                                                      for k, (a, b) in other.items()))


def _after_finished(setup: Setup, loop: TrainLoop, writer: RunWriter, results: dict) -> dict:
    """`--resume` on a finished run: nothing is retrained or rewritten except what was asked
    after training (predictions, exports), done from `best/`."""
    loop.ckpt.close()
    asked = _exports_asked(setup.cfg)
    if asked:
        made = predict_and_export(setup, loop, writer)
        results = {**results, **made}
        writer.write_results(results)
        tqdm.write(f"{loop.out}: finished earlier; wrote "
                   + ", ".join(run_files(loop.out, made, only_exports=True)))
    else:
        tqdm.write(f"{loop.out}: finished earlier at step {loop.step}; nothing to do")
    return results


def train_cli(cfg: RunConfig) -> int:
    """`train_and_evaluate` for the command line (`jaxpeft.cli.run_command`; with
    --multihost under `distributed.supervise`)."""
    cfg = cfg.with_output_dir()
    supervised = distributed.supervise(cfg.multihost, cfg.output_dir)
    if supervised is not None:
        return supervised
    return run_command(lambda: train_and_evaluate(cfg), output_dir=cfg.output_dir)
