"""Grids of runs: every combination of some `RunConfig` fields, each into its own folder.

A grid is written `"method=full,lora,bitfit;learning_rate=2e-5,1e-4"`: fields separated by
`;`, values by `,`. Runs whose folder already holds `results.json` are skipped, a failing
run is reported and the sweep goes on, and `sweep.json` in the root lists every run's status.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import traceback
from pathlib import Path
from typing import Sequence

import jax
from tqdm.auto import tqdm

from jaxpeft.config import RunConfig, names_where, parse_value, validate
from jaxpeft.distributed import supervise
from jaxpeft.errors import JaxpeftError, RunInterrupted
from jaxpeft.fileio import atomic_write_json
from jaxpeft.peft import peft_from_run
from jaxpeft.cli import run_command
from jaxpeft.run import train_and_evaluate
from jaxpeft.writer import RESULTS

log = logging.getLogger("jaxpeft")


def parse_grid(grid: str) -> dict:
    """`"a=1,2;b=x"` -> `{"a": [1, 2], "b": ["x"]}` with values typed as RunConfig's fields
    (tuple fields join their items with `+`: `lora_targets=query+value`)."""
    sweepable = names_where("sweepable")
    out = {}
    for part in filter(None, (p.strip() for p in grid.split(";"))):
        if "=" not in part:
            raise JaxpeftError(f"grid: {part!r} is not name=value1,value2,...")
        name, values = (s.strip() for s in part.split("=", 1))
        if name not in sweepable:
            raise JaxpeftError(f"grid: {name!r} is not a run setting that can vary")
        if name in out:
            raise JaxpeftError(f"grid: {name!r} appears twice")
        try:
            out[name] = [parse_value(name, v.strip()) for v in values.split(",") if v.strip()]
        except JaxpeftError as e:
            raise JaxpeftError(f"grid: {e}") from None
        if not out[name]:
            raise JaxpeftError(f"grid: {name!r} has no values")
    return out


def _fmt(v) -> str:
    if isinstance(v, tuple):
        text = "+".join(v)
    else:
        text = f"{v:g}" if isinstance(v, float) else str(v)
    # A value is part of one folder name: a path (`model=../m`) must not make it a path.
    return re.sub(r"[^\w.+-]", "_", text)


def expand(base: RunConfig, grid: dict, seeds: Sequence[int], root: Path) -> list:
    """Every (grid point, seed) as a RunConfig with its own output folder under `root`."""
    names = list(grid)
    runs = []
    for values in itertools.product(*(grid[n] for n in names)):
        point = dict(zip(names, values))
        for seed in seeds:
            label = ",".join(f"{n}={_fmt(v)}" for n, v in point.items()) or "base"
            folder = root / f"{label},seed={seed}"
            runs.append(dataclasses.replace(base, **point, seed=seed, output_dir=str(folder)))
    folders = [cfg.output_dir for cfg in runs]
    clash = next((f for f in folders if folders.count(f) > 1), None)
    if clash:
        raise JaxpeftError(f"grid: two grid points share the run folder {clash}; give values "
                           "that differ in letters or digits")
    return runs


def run_sweep(base: RunConfig, grid: str, seeds: Sequence[int], root: str,
              progress: bool = True) -> dict:
    """Runs the grid; returns (and writes to `<root>/sweep.json`) each run's status."""
    root_path = Path(root)
    runs = expand(base, parse_grid(grid), seeds, root_path)
    for cfg in runs:  # every run's options are checked before the first run starts
        validate(cfg, jax.device_count())
        peft_from_run(cfg)
    status = {}

    def record(name: str, outcome: str) -> None:
        status[name] = outcome  # sweep.json is current after every run, finished or not
        atomic_write_json(root_path / "sweep.json", {"grid": grid, "seeds": list(seeds),
                                                     "runs": status})

    bar = tqdm(runs, desc="sweep", disable=None if progress else True)
    for cfg in bar:
        name = Path(cfg.output_dir).name
        bar.set_postfix_str(name[:60])
        if (Path(cfg.output_dir) / RESULTS).is_file():
            record(name, "skipped (finished before)")
            continue
        try:
            train_and_evaluate(dataclasses.replace(cfg, progress=False,
                                                   resume=Path(cfg.output_dir).is_dir()))
            record(name, "ok")
        except RunInterrupted:
            record(name, "interrupted (checkpoint saved; rerun the sweep to continue)")
            raise  # a stop signal stops the sweep, not just this run
        except JaxpeftError as e:
            record(name, f"failed: {e}")
            tqdm.write(f"run {name} failed: {e}")
        except Exception as e:  # keep sweeping; the traceback goes to the log
            record(name, f"failed: {type(e).__name__}: {e}")
            tqdm.write(f"run {name} crashed: {type(e).__name__}: {e}")
            log.debug("%s", traceback.format_exc())
    failed = [n for n, s in status.items() if s.startswith("failed")]
    tqdm.write(f"sweep: {len(status) - len(failed)} of {len(status)} runs done"
               + (f"; failed: {', '.join(failed)}" if failed else ""))
    return status


def sweep_cli(base: RunConfig, grid: str, seeds: Sequence[str], root: str,
              progress: bool = True) -> int:
    """Command-line entry: user errors print one line; exit 1 if any run failed; a stop
    signal ends the sweep after checkpointing the current run."""
    supervised = supervise(base.multihost)
    if supervised is not None:
        return supervised

    def work() -> int:
        status = run_sweep(base, grid, [parse_value("seed", s) for s in seeds], root, progress)
        return 1 if any(s.startswith("failed") for s in status.values()) else 0

    return run_command(work, output_dir=root, resume_hint="rerun the same sweep to continue")
