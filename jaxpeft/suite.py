"""The GLUE suite: one run_glue run per task with per-task recipes, then one table.

`run_suite` runs each task into `<output_dir>/<task>/` (a normal run folder), skipping tasks
whose results.json exists and resuming interrupted ones; a task that fails (say, no training
file offline) is reported in one line and the suite goes on. It then writes
- `glue.json` / `glue.md`: per task the GLUE metrics of the best evaluation, the task's
  GLUE score, the trivial baseline of its dev split, trainable parameters and training time;
  the GLUE score over the tasks run; and the reference rows of `jaxpeft/references.json`
  (published numbers and the BERT-base reference thresholds), each with its source and model;
- with `--do_predict`, `glue_submission.zip` holding the files the GLUE server expects.

The GLUE score of a task is the mean of its metrics (MRPC and QQP: F1 and accuracy; STS-B:
Pearson and Spearman; MNLI: matched and mismatched accuracy), and the suite's score the
unweighted mean over tasks, as the benchmark defines it; with fewer than the nine tasks the
tables say over which.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import zipfile
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from jaxpeft.config import RunConfig
from jaxpeft.data import get_task
from jaxpeft.distributed import supervise
from jaxpeft.errors import JaxpeftError
from jaxpeft.evaluation import glue_metric_keys, task_score
from jaxpeft.fileio import atomic_write_bytes, atomic_write_json
from jaxpeft.cli import run_command
from jaxpeft.run import train_and_evaluate
from jaxpeft.writer import RESULTS, RunWriter

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
SUBMISSION = "glue_submission.zip"
REFERENCES = Path(__file__).with_name("references.json")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A task's training defaults; `learning_rate` by method (others: the method's default)."""

    num_epochs: float
    batch_size: int
    max_seq_length: int
    learning_rate: tuple = ()  # ((method, lr), ...)
    warmup_ratio: Optional[float] = None
    weight_decay: Optional[float] = None


def _lora_paper(epochs, batch, lr):
    # LoRA paper (Hu et al. 2021), Table 9, RoBERTa-base: LoRA's learning rate (also used for
    # DoRA), max length 512, warmup ratio 0.06, weight decay 0.1. The MNLI, MRPC, QNLI, QQP,
    # RTE and STS-B values are those of github.com/microsoft/LoRA examples/NLU/roberta_base_*.sh
    # (8 GPUs, so the global batch was 8x this per-device one).
    return Recipe(epochs, batch, 512, (("lora", lr), ("dora", lr)), 0.06, 0.1)


RECIPES = {
    # BERT's fine-tuning recipe (Devlin et al. 2019, Sec. 4.1 and Appendix A.3): 3 epochs,
    # batch 32, sequences of 128 tokens, each method's own default learning rate.
    "standard": {t: Recipe(3, 32, 128) for t in GLUE_TASKS},
    "lora-paper": {
        "mnli": _lora_paper(30, 16, 5e-4), "sst2": _lora_paper(60, 16, 5e-4),
        "mrpc": _lora_paper(30, 16, 4e-4), "cola": _lora_paper(80, 32, 4e-4),
        "qnli": _lora_paper(25, 32, 4e-4), "qqp": _lora_paper(25, 16, 5e-4),
        "rte": _lora_paper(80, 32, 5e-4), "stsb": _lora_paper(40, 16, 4e-4),
        # WNLI is not in the paper: BERT's recipe.
        "wnli": Recipe(3, 32, 128),
    },
}


def task_config(base: RunConfig, task: str, recipe: str, explicit: set,
                output_dir: Path) -> RunConfig:
    """The run of one task: the recipe's values, except for flags given explicitly."""
    r = RECIPES[recipe][task]
    values = {"num_epochs": r.num_epochs, "batch_size": r.batch_size,
              "max_seq_length": r.max_seq_length, "warmup_ratio": r.warmup_ratio,
              "weight_decay": r.weight_decay,
              "learning_rate": dict(r.learning_rate).get(base.method)}
    chosen = {k: v for k, v in values.items() if v is not None and k not in explicit}
    return dataclasses.replace(base, **chosen, task=task, output_dir=str(output_dir / task))


def suite_root(base: RunConfig) -> Path:
    """The suite's folder: --output_dir, or runs/glue-<method>."""
    return Path(base.output_dir or f"runs/glue-{base.method}")


def run_suite(base: RunConfig, tasks: tuple = GLUE_TASKS, recipe: str = "standard",
              explicit: frozenset = frozenset()) -> dict:
    """Runs (or skips, or resumes) each task, then writes glue.json, glue.md and, with
    `do_predict`, the submission zip; returns glue.json's contents. `explicit` names the
    options given on the command line, which the recipe does not override."""
    if recipe not in RECIPES:
        raise JaxpeftError(f"--recipe={recipe!r} is not one of: {', '.join(RECIPES)}")
    unknown = [t for t in tasks if t not in GLUE_TASKS]
    if unknown:
        raise JaxpeftError(f"--tasks: {', '.join(unknown)} not GLUE tasks; choose from "
                           f"{', '.join(GLUE_TASKS)}")
    root = suite_root(base)
    outcomes = {}
    for name in tasks:
        cfg = task_config(base, name, recipe, set(explicit), root)
        folder = Path(cfg.output_dir)
        if (folder / RESULTS).is_file():
            try:
                outcomes[name] = {"status": "done", "results": RunWriter(folder).read_results()}
                tqdm.write(f"[{name}] finished earlier: {folder / RESULTS}")
            except JaxpeftError as e:  # a damaged run is named and skipped; the suite goes on
                tqdm.write(f"[{name}] skipped: {e}")
                outcomes[name] = {"status": "failed", "reason": str(e)}
            continue
        if (folder / "config.json").is_file():
            cfg = dataclasses.replace(cfg, resume=True, overwrite=False)
        tqdm.write(f"[{name}] {cfg.num_epochs:g} epochs" if not cfg.max_steps
                   else f"[{name}] {cfg.max_steps} steps")
        try:
            outcomes[name] = {"status": "done", "results": train_and_evaluate(cfg)}
        except JaxpeftError as e:
            tqdm.write(f"[{name}] not run: {e}")
            outcomes[name] = {"status": "failed", "reason": str(e)}
    summary = summarize(base, recipe, outcomes)
    atomic_write_json(root / "glue.json", summary)
    atomic_write_bytes(root / "glue.md", glue_markdown(summary).encode())
    if base.do_predict:
        summary["submission"] = write_submission(root)
        atomic_write_json(root / "glue.json", summary)
    tqdm.write(f"GLUE score {_fmt(summary['score'])} over {summary['scored_tasks']} of 9 tasks; "
               f"table in {root / 'glue.md'}")
    return summary


def summarize(base: RunConfig, recipe: str, outcomes: dict) -> dict:
    """glue.json: the per-task rows, the suite's score, and the reference rows."""
    rows, scores = {}, []
    references = _references(base.model)
    thresholds = {}
    for ref in references:
        if ref["kind"] == "threshold":
            for task, values in ref["values"].items():
                thresholds.setdefault(task, {}).update(values)
    for name, outcome in outcomes.items():
        if outcome["status"] != "done":
            rows[name] = {"status": outcome["status"], "reason": outcome["reason"]}
            continue
        res = outcome["results"]
        best, baseline = res["best"], res.get("baseline", {})
        keys = glue_metric_keys(name)
        score, base_score = task_score(name, best), task_score(name, baseline)
        rows[name] = {"status": "done", "metrics": {k: best[k] for k in keys}, "score": score,
                      "baseline": {k: baseline.get(k) for k in keys},
                      "baseline_score": base_score,
                      "beats_baseline": base_score is None or score > base_score,
                      "threshold": thresholds.get(name),
                      "meets_threshold": _meets(best, thresholds.get(name)),
                      "trainable": res["params"]["trainable"],
                      "train_s": res["train"]["wall_s"], "steps": res["train"]["steps"],
                      "best_step": best["step"]}
        scores.append(score)
    return {"model": base.model, "method": base.method, "recipe": recipe, "tasks": rows,
            # None, not NaN, when no task scored: glue.json stays strict JSON.
            "score": float(sum(scores) / len(scores)) if scores else None,
            "scored_tasks": len(scores), "references": references}


def _meets(best: dict, threshold: Optional[dict]) -> Optional[bool]:
    """Whether every thresholded metric reaches its value (None: no threshold for the task)."""
    if not threshold:
        return None
    return all(best.get(f"eval_{k}", -math.inf) >= v for k, v in threshold.items())


def _references(model: str) -> list:
    rows = json.loads(REFERENCES.read_text())["rows"]
    for row in rows:
        row["same_model"] = row["model"] is None or row["model"] == model
    return rows


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def glue_markdown(summary: dict) -> str:
    """glue.md: the task table, the score, and the reference rows."""
    lines = [f"# GLUE: {summary['method']} on {summary['model']} (recipe {summary['recipe']})",
             "", "| task | metrics (best eval) | task score | trivial baseline | beats it | "
             "BERT-base reference threshold | meets it | trainable | train s |",
             "|---|---|---:|---:|:---:|---|:---:|---:|---:|"]
    for name, row in summary["tasks"].items():
        if row["status"] != "done":
            lines.append(f"| {name} | not run: {row['reason']} |" + " |" * 7)
            continue
        metrics = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in row["metrics"].items())
        threshold = ", ".join(f"{k} {v:g}" for k, v in (row["threshold"] or {}).items()) or "—"
        meets = {None: "—", True: "yes", False: "**no**"}[row["meets_threshold"]]
        lines.append(f"| {name} | {metrics} | {row['score']:.4f} | "
                     f"{_fmt(row['baseline_score'])} | {'yes' if row['beats_baseline'] else '**no**'}"
                     f" | {threshold} | {meets} | {row['trainable']:,} | {row['train_s']:.0f} |")
    lines += ["", f"**GLUE score {_fmt(summary['score'])}** over {summary['scored_tasks']} of "
              "9 tasks (mean of the task scores; a task's score is the mean of its metrics). "
              "The trivial baseline predicts each dev split's majority class (STS-B: a "
              "constant).", "", "## References", "",
              "| reference | model | " + " | ".join(GLUE_TASKS) + " |",
              "|---|---|" + "---:|" * len(GLUE_TASKS)]
    for ref in summary["references"]:
        model = ref["model"] or "any"
        if not ref["same_model"]:
            model += " (**another model**)"
        cells = [", ".join(f"{k} {v:.3f}" for k, v in ref["values"].get(t, {}).items()) or "—"
                 for t in GLUE_TASKS]
        lines.append(f"| {ref['name']} | {model} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {ref['name']}: {ref['source']}" for ref in summary["references"]]
    return "\n".join(lines) + "\n"


def write_submission(root: Path) -> dict:
    """`glue_submission.zip` from each task's predict/ folder; says which files are missing
    (the GLUE server wants all of them)."""
    expected = [(t, filename) for t in GLUE_TASKS
                for _, _, filename in get_task(t).prediction_files()]
    buf, present, missing = io.BytesIO(), [], []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for task, filename in expected:
            path = root / task / "predict" / filename
            if path.is_file():
                z.write(path, arcname=filename)
                present.append(filename)
            else:
                missing.append(filename)
    atomic_write_bytes(root / SUBMISSION, buf.getvalue())
    if missing:
        tqdm.write(f"{root / SUBMISSION}: incomplete, missing {', '.join(missing)} (the GLUE "
                   "server needs every file)")
    else:
        tqdm.write(f"{root / SUBMISSION}: {len(present)} files, ready to upload")
    return {"path": str(root / SUBMISSION), "files": present, "missing": missing}



def suite_cli(base: RunConfig, tasks: tuple, recipe: str, explicit: frozenset) -> int:
    """`run_suite` for the command line: user errors are one line and exit status 1, and so
    is a suite in which some task did not run."""
    base = dataclasses.replace(base, output_dir=str(suite_root(base)))
    supervised = supervise(base.multihost)
    if supervised is not None:
        return supervised

    def work() -> int:
        summary = run_suite(base, tasks, recipe, explicit)
        # A task that did not run fails the command, so scripts and CI notice.
        return int(any(row["status"] != "done" for row in summary["tasks"].values()))

    return run_command(work, output_dir=base.output_dir,
                       resume_hint="rerun the same command to continue")
