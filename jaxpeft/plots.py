"""Reports from run folders and study files: a Markdown table and matplotlib plots.

Reads only what runs wrote (`config.json`, `metrics.jsonl`, `results.json`) under a root
folder, or a study file that keeps many runs' files in one (`pack_study`, `read_study`), so
it works on any mix of finished runs, sweeps, single runs and studies.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from jaxpeft.config import canonical_task, names_where, recorded_options
from jaxpeft.errors import JaxpeftError
from jaxpeft.evaluation import task_score
from jaxpeft.writer import (CONFIG, STUDY_SUFFIX, RESULTS, RunWriter, read_metrics, read_study,
                            split_rows, write_study)

log = logging.getLogger("jaxpeft")


def load_runs(root: Path) -> list:
    """Every finished run below `root` (a folder, or a study file): dicts with config,
    results, training and evaluation rows, folder (a study's run: its name in the study)."""
    if str(root).endswith(STUDY_SUFFIX) and Path(root).is_file():
        return [{"dir": Path(root) / run["name"], "config": run["config"],
                 "results": run["results"],
                 **dict(zip(("train_rows", "eval_rows"), split_rows(run["metrics"])))}
                for run in read_study(root)]
    runs = []
    for results in sorted(Path(root).rglob(RESULTS)):
        folder = results.parent
        if not (folder / CONFIG).is_file():
            continue
        try:
            runs.append(_read_run(folder))
        except JaxpeftError as e:  # one damaged or foreign folder never hides the others
            log.warning("skipped %s: %s", folder, e)
    return runs


def _read_run(folder: Path) -> dict:
    writer = RunWriter(folder)
    train_rows, eval_rows = read_metrics(folder)
    return {"dir": folder, "config": writer.read_config(), "results": writer.read_results(),
            "train_rows": train_rows, "eval_rows": eval_rows}


# Never a reason to keep runs apart: options that do not change what a run computes, and the
# seed (the report averages over it).
_NOT_SETTINGS = set(names_where("setting", False)) | {"seed"}
_OWN_COLUMNS = {"task", "method", "learning_rate", "lora_rank"}


def _settings(run) -> dict:
    c = recorded_options(run["config"]["run"])
    out = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()
           if k not in _NOT_SETTINGS}
    out["learning_rate"] = run["results"]["learning_rate"]  # the resolved one (default per method)
    return out


def _seed(run) -> int:
    return run["config"]["run"].get("seed", 0)


def _rank(run) -> Optional[int]:
    """The method's rank option, for methods that have one."""
    return run["config"]["resolved"]["peft"]["options"].get("rank")


def _mean_stat(run, key: str) -> Optional[float]:
    values = [r[f"train_{key}"] for r in run["train_rows"] if f"train_{key}" in r]
    return float(np.mean(values)) if values else None


def _varying(keys: list) -> dict:
    """Per method, the settings (other than task/method/lr/rank) in which two of its
    configurations on the same task differ: what tells its rows apart. Another method's
    options (AdaLoRA's schedule beside a LoRA row) never label a row, and neither does a
    setting that differs only from task to task (AdaLoRA's budget phases, set in steps of
    each task's run): the runs of one configuration across tasks stay one method row."""
    by_method_task = defaultdict(list)
    for k in keys:
        by_method_task[(k["method"], k["task"])].append(k)
    out = defaultdict(set)
    for (method, _), ks in by_method_task.items():
        out[method] |= {name for name in set().union(*ks) - _OWN_COLUMNS
                        if len({repr(k.get(name)) for k in ks}) > 1}
    return defaultdict(list, {method: sorted(names) for method, names in out.items()})


def summarize(runs: list) -> list:
    """One row per configuration (all settings but the seed): mean ± std, median, min and
    max over seeds.

    `setting` names the settings, other than task/method/lr/rank, that differ between rows
    of the same method (e.g. `train_pooler=True`); runs that differ in any setting are never
    averaged together.
    Runs that chose their checkpoint on a dev half (`--select_on=dev_half`) also carry
    `selection`, the mean of that half's metric; among rows that differ only in the learning
    rate, the one with the highest (over the seeds all of them ran) is `chosen`, so the rate
    is picked on examples that do not score it.
    """
    groups = defaultdict(list)
    for r in runs:
        groups[tuple(sorted(_settings(r).items()))].append(r)
    varying = _varying([dict(k) for k in groups])
    table = []
    for key, group in groups.items():
        s = dict(key)
        main = group[0]["results"]["main_metric"]
        picked_by = group[0]["results"].get("selected_by", main)
        best = np.array([g["results"]["best"][main] for g in group], np.float64)
        baseline = (group[0]["results"].get("baseline") or {}).get(main)
        scores = [task_score(s["task"], g["results"]["best"]) for g in group]
        params = group[0]["results"]["params"]
        stats = {}
        for stat in ("update_ratio", "loss_decrease"):
            values = [v for v in (_mean_stat(g, stat) for g in group) if v is not None]
            stats[stat] = float(np.mean(values)) if values else None
        table.append({
            "task": s["task"], "method": s["method"], "learning_rate": s["learning_rate"],
            "rank": _rank(group[0]),
            "setting": ", ".join(f"{n}={s.get(n)}" for n in varying[s["method"]]),
            "metric": main.removeprefix("eval_"), "mean": float(best.mean()),
            "std": float(best.std(ddof=1)) if len(best) > 1 else 0.0, "seeds": len(group),
            "median": float(np.median(best)), "min": float(best.min()), "max": float(best.max()),
            # A cell at or below the constant prediction's score has learned nothing.
            "baseline": baseline,
            "trivial": baseline is not None and float(np.median(best)) <= baseline + 1e-9,
            "task_scores": [x for x in scores if x is not None],
            "baseline_score": task_score(s["task"], group[0]["results"].get("baseline") or {}),
            "selection": None if picked_by == main else float(np.mean(
                [g["results"]["best"][picked_by] for g in group])), "chosen": False,
            "selection_by_seed": {} if picked_by == main else {
                _seed(g): g["results"]["best"][picked_by]
                for g in group},
            # Breaks ties (RTE's and WNLI's halves of 138 and 36 examples tie often).
            "selection_loss_by_seed": {_seed(g): g["results"]["best"].get("select_loss",
                                                                           np.inf)
                                       for g in group},
            "trainable": params["trainable"], "percent": params["percent"],
            "steps": group[0]["results"]["train"]["steps"], **stats,
            # The runs' folders, lowest seed first: the one whose curve the report draws.
            "dirs": [g["dir"] for g in sorted(group, key=_seed)],
            "wall_s": float(np.mean([g["results"]["train"]["wall_s"] for g in group])),
            "examples_per_s": float(np.mean([g["results"]["train"]["examples_per_s"]
                                             for g in group]))})
    _mark_chosen(table)
    return sorted(table, key=lambda t: (t["task"], t["method"], t["setting"], t["learning_rate"],
                                        t["rank"] or 0))


def _mark_chosen(table: list) -> None:
    """Marks, per (task, method, rank, setting), the learning rate with the best selection
    mean over the seeds every rate ran (rows without one are never chosen); a tie goes to the
    lower selection-half loss at the chosen checkpoints, so the choice never depends on the
    order runs were read in. Seeds added at the chosen rate afterwards do not move the
    choice: a mean over three seeds is not compared with another rate's single draw. With no
    seed in common, all seeds count. The chosen row's `grid_edge` says where its rate lies in
    the grid: "low" or "high" at an end (the peak may lie beyond it), "single" when no other
    rate ran, None inside."""
    by_setup = defaultdict(list)
    for t in table:
        t["grid_edge"] = None
        if t["selection"] is not None:
            by_setup[(t["task"], t["method"], t["rank"], t["setting"])].append(t)
    for rows in by_setup.values():
        scores = _selection_scores(rows)
        best = max(rows, key=lambda t: scores[id(t)])
        rates = sorted(t["learning_rate"] for t in rows)
        best["chosen"] = True
        best["grid_edge"] = ("single" if len(rates) == 1 else
                             "low" if best["learning_rate"] == rates[0] else
                             "high" if best["learning_rate"] == rates[-1] else None)


def _selection_scores(rows: list) -> dict:
    """Per row (by `id`) of one setup's learning rates: (selection metric, minus selection
    loss), each the mean over the seeds every row ran, or over all its seeds with none in
    common: the key the rate is chosen by."""
    common = set.intersection(*(set(t["selection_by_seed"]) for t in rows))
    out = {}
    for t in rows:
        seeds = common or set(t["selection_by_seed"])
        out[id(t)] = (float(np.mean([t["selection_by_seed"][k] for k in seeds])),
                      -float(np.mean([t["selection_loss_by_seed"][k] for k in seeds])))
    return out


def _sci(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2e}"


def markdown_table(table: list) -> str:
    """The summary as a Markdown table (step sizes: means over the logged training steps)."""
    lines = ["| task | method | setting | lr | rank | trainable | % | best metric (mean ± std; "
             "median [min, max]) | seeds | steps | ‖Δθ‖/‖θ‖ per step | −⟨g,Δθ⟩ per step | "
             "train s | ex/s | selection half | trivial baseline |",
             "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for t in table:
        spread = (f" ± {t['std']:.4f}; {t['median']:.4f} [{t['min']:.4f}, {t['max']:.4f}]"
                  if t["seeds"] > 1 else "")  # no spread from a single seed
        selection = "—" if t["selection"] is None else (
            f"{t['selection']:.4f}" + (" **chosen**" if t["chosen"] else ""))
        lines.append(
            f"| {t['task']} | {t['method']} | {t['setting'] or '—'} | {t['learning_rate']:g} | "
            f"{t['rank'] or '—'} | {t['trainable']:,} | {t['percent']:.3f} | {t['metric']} "
            f"{t['mean']:.4f}{spread} | {t['seeds']} | {t['steps']} | "
            f"{_sci(t['update_ratio'])} | {_sci(t['loss_decrease'])} | {t['wall_s']:.0f} | "
            f"{t['examples_per_s']:.1f} | {selection} | {_baseline_cell(t)} |")
    return "\n".join(lines) + "\n"


def _baseline_cell(t: dict) -> str:
    if t["baseline"] is None:
        return "—"
    return f"{t['baseline']:.4f}" + (" **trivial**" if t["trivial"] else "")


def glue_table(table: list) -> list:
    """Per method (and rank, setting): the chosen learning rate's GLUE task scores on each
    task (median over seeds, with min and max), and the GLUE score, the mean of the task
    medians over the tasks the method has. Only rows the selection half chose are used, so
    every number is scored on examples that did not pick it."""
    methods = defaultdict(dict)
    for t in table:
        if t["chosen"] and t["task_scores"]:
            methods[(t["method"], t["rank"], t["setting"])][t["task"]] = t
    out = []
    for (method, rank, setting), tasks in sorted(methods.items(), key=str):
        cells = {task: {"median": float(np.median(t["task_scores"])),
                        "min": float(min(t["task_scores"])),
                        "max": float(max(t["task_scores"])), "seeds": len(t["task_scores"]),
                        "learning_rate": t["learning_rate"], "trivial": t["trivial"],
                        "grid_edge": t.get("grid_edge"),
                        "baseline": t["baseline_score"], "wall_s": t["wall_s"]}
                 for task, t in tasks.items()}
        first = next(iter(tasks.values()))
        row = {"method": method, "rank": rank, "setting": setting,
               "trainable": first["trainable"], "percent": first["percent"], "tasks": cells,
               "train_s": float(sum(c["wall_s"] * c["seeds"] for c in cells.values()))}
        out.append(row | {"score": shared_score(row, list(cells))})
    return out


def _method_label(row: dict) -> str:
    """A table row's method as the tables and plots name it: `lora r8 train_pooler=True`."""
    return " ".join(x for x in (row["method"], f"r{row['rank']}" if row["rank"] else "",
                                row["setting"]) if x)


def shared_tasks(rows: list) -> list:
    """The tasks that more than half of `glue_table`'s rows ran: the set over which their
    GLUE scores compare (a mean over CoLA and MRPC is not comparable with one over MRPC
    alone). A row that lacks one of them has no score on the set, rather than the set
    shrinking to what the least complete row ran."""
    counts = Counter(task for r in rows for task in r["tasks"])
    return sorted(t for t, n in counts.items() if 2 * n > len(rows))


def shared_score(row: dict, tasks: list) -> Optional[float]:
    """One `glue_table` row's GLUE score over `tasks` (the mean of its task medians); None
    when the row lacks one of them."""
    if not tasks or any(t not in row["tasks"] for t in tasks):
        return None
    return float(np.mean([row["tasks"][t]["median"] for t in tasks]))


# A chosen rate at an end of its grid, as the GLUE table marks it: the peak may lie beyond
# the grid, so the choice is provisional until the next rate has run.
_EDGE_MARKS = {"low": " ↓", "high": " ↑"}


def glue_markdown(rows: list) -> str:
    """`glue_table` as Markdown: a column per task (median [min, max] over seeds, the chosen
    learning rate below it, † when at or below the trivial baseline, ↓ or ↑ when the chosen
    rate is the lowest or highest of its grid, "one rate" when no other ran), the GLUE score
    over the tasks present, trainable parameters and the training seconds of the chosen
    runs. When the rows ran different tasks, a column gives each row's score over
    `shared_tasks` (— for a row that lacks one of them)."""
    tasks = sorted({task for r in rows for task in r["tasks"]})
    shared = shared_tasks(rows)
    extra = bool(shared) and any(sorted(r["tasks"]) != shared for r in rows)
    lines = ["| method | trainable | " + " | ".join(tasks) + " | GLUE score (tasks) | " +
             (f"score on {', '.join(shared)} | " if extra else "") + "train s |",
             "|---|---:|" + "---|" * len(tasks) + "---:|" + ("---:|" if extra else "") + "---:|"]
    for r in rows:
        label = _method_label(r)
        cells = []
        for task in tasks:
            c = r["tasks"].get(task)
            if c is None:
                cells.append("—")
                continue
            spread = f" [{c['min']:.3f}, {c['max']:.3f}]" if c["seeds"] > 1 else ""
            edge = _EDGE_MARKS.get(c.get("grid_edge"), "")
            alone = " (one rate)" if c.get("grid_edge") == "single" else ""
            cells.append(f"{c['median']:.4f}{' †' if c['trivial'] else ''}{edge}{spread}<br>"
                         f"lr {c['learning_rate']:g}{alone}, {c['seeds']} seed"
                         f"{'s' if c['seeds'] > 1 else ''}")
        lines.append(f"| {label} | {r['trainable']:,} | " + " | ".join(cells) +
                     f" | {r['score']:.4f} ({len(r['tasks'])}) | " +
                     (f"{_score_cell(shared_score(r, shared))} | " if extra else "") +
                     f"{r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _score_cell(score: Optional[float]) -> str:
    return "—" if score is None else f"{score:.4f}"


def _label(run) -> str:
    return run["dir"].name


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # a legend beside the axes stays in
    plt.close(fig)
    return path


# More methods than this on one pair of axes hide each other: the plot switches to one panel
# per method, all on the same loss and metric scales.
_OVERLAY_MAX = 6


def _curves_plot(task: str, task_runs: list, rows: list, main: str, out: Path) -> Path:
    """Training and validation loss, and the validation metric, against steps.

    With a selection protocol, one curve per method (and rank, setting): the lowest seed at
    its chosen learning rate; otherwise one per run. A dotted line marks the training loss of
    the best input-blind model (`constant_train_loss`, recorded in the runs' baselines): a
    training curve that stays on it has learned the label frequencies and nothing else. Up to
    `_OVERLAY_MAX` methods share one pair of axes; more get a panel each (`_curves_grid`).
    """
    import matplotlib.pyplot as plt

    chosen = sorted((t for t in rows if t["chosen"]),
                    key=lambda t: (t["method"], t["rank"] or 0, t["setting"]))
    if chosen:
        by_dir = {r["dir"]: r for r in task_runs}
        curves = [(by_dir[t["dirs"][0]], f"{_method_label(t)} lr {t['learning_rate']:g}")
                  for t in chosen]
    else:
        curves = [(r, _label(r)) for r in task_runs]
    prior = _constant_train_loss([r for r, _ in curves])
    if prior is None:
        prior = _constant_train_loss(task_runs)
    if chosen and len(curves) > _OVERLAY_MAX:
        return _curves_grid(task, curves, main, prior, out)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20" if len(curves) > 10 else "tab10").colors
    for i, (r, label) in enumerate(curves):
        color = colors[i % len(colors)]
        train, evals = _curve(r, main)
        if train:
            ax1.plot(*zip(*train), lw=1, color=color, label=label)
        if evals:
            ax1.plot([e[0] for e in evals], [e[1] for e in evals], "--o", ms=3, color=color)
            ax2.plot([e[0] for e in evals], [e[2] for e in evals], "-o", ms=3, color=color,
                     label=label)
    if prior is not None:
        ax1.axhline(prior, color="black", ls=":", lw=1.2,
                    label=f"constant prediction's training loss {prior:.3f}")
    ax1.set(xlabel="step", ylabel="loss",
            title=f"{task}: loss (solid: training, dashed: validation)")
    ax2.set(xlabel="step", ylabel=main, title=f"{task}: validation {main}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if len(curves) <= 20:  # beyond that a legend hides more than it tells
        fig.legend(*ax1.get_legend_handles_labels(), fontsize=6, loc="center left",
                   bbox_to_anchor=(1.0, 0.5))
    return _save(fig, out / f"{task}_curves.png")


def _curve(run: dict, main: str) -> tuple[list, list]:
    """A run's (step, training loss) and (step, validation loss, validation `main`) points."""
    train = [(x["step"], x["train_loss"]) for x in run["train_rows"]]
    evals = [(x["step"], x["eval_loss"], x[main]) for x in run["eval_rows"] if main in x]
    return train, evals


def _curves_grid(task: str, curves: list, main: str, prior: Optional[float],
                 out: Path) -> Path:
    """`_curves_plot` with one panel per curve: loss on the left axis (training solid,
    validation dashed, the constant prediction dotted), the validation metric on the right.
    Every panel has the same two scales, so panels compare at a glance; steps are each run's
    own (a longer budget is named in its title)."""
    import matplotlib.pyplot as plt

    ncols = 4
    nrows = -(-len(curves) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.8 * nrows + 0.6),
                             sharey=True, squeeze=False)
    points = [_curve(r, main) for r, _ in curves]
    metric = [e[2] for _, evals in points for e in evals]
    pad = 0.05 * ((max(metric) - min(metric)) or 1.0) if metric else 0.0
    legend = {}  # one entry per kind of line, whichever panel drew it first
    for ax, (_, label), (train, evals) in zip(axes.flat, curves, points):
        metric_ax = ax.twinx()
        drawn = []
        if train:
            drawn += ax.plot(*zip(*train), lw=1, color="tab:blue", label="training loss")
        if evals:
            drawn += ax.plot([e[0] for e in evals], [e[1] for e in evals], "--o", ms=3,
                             color="tab:blue", label="validation loss")
            drawn += metric_ax.plot([e[0] for e in evals], [e[2] for e in evals], "-o", ms=3,
                                    color="tab:red", label=f"validation {main}")
        if prior is not None:
            drawn.append(ax.axhline(prior, color="black", ls=":", lw=1.2,
                                    label=f"constant prediction's training loss {prior:.3f}"))
        for line in drawn:
            legend.setdefault(line.get_label(), line)
        if metric:
            metric_ax.set_ylim(min(metric) - pad, max(metric) + pad)
        metric_ax.tick_params(axis="y", colors="tab:red", labelsize=7)
        ax.tick_params(labelsize=7)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(curves):]:
        ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_ylabel("loss")
    for ax in axes.flat[max(0, len(curves) - ncols):len(curves)]:  # each column's lowest
        ax.set_xlabel("step")
    fig.suptitle(f"{task}: loss (left) and validation {main} (right, red) per method", y=1.01)
    fig.legend(handles=list(legend.values()), fontsize=8, loc="lower center", ncol=4,
               bbox_to_anchor=(0.5, -0.02))
    return _save(fig, out / f"{task}_curves.png")


def _constant_train_loss(runs: list) -> Optional[float]:
    """The recorded constant prediction's training loss of `runs` (runs written before it was
    recorded lack it); None when none has it or they disagree (different training sets)."""
    values = {round(v, 6): v for r in runs
              if (v := (r["results"].get("baseline") or {}).get("train_loss")) is not None}
    return next(iter(values.values())) if len(values) == 1 else None


def _rank_plot(task: str, rows: list, main: str, out: Path) -> Optional[Path]:
    """Best metric and trainable count against the rank, one curve per (lr, setting)."""
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    for t in rows:
        if t["rank"]:
            lines[(t["learning_rate"], t["setting"])].append(t)
    lines = {k: sorted(v, key=lambda t: t["rank"]) for k, v in lines.items() if len(v) > 1}
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    twin = ax.twinx()
    for (lr, setting), pts in sorted(lines.items()):
        ranks = [t["rank"] for t in pts]
        ax.errorbar(ranks, [t["mean"] for t in pts], [t["std"] for t in pts],
                    marker="o", capsize=3, label=f"lr {lr:g} {setting}".strip())
        twin.plot(ranks, [t["trainable"] for t in pts], "s--", color="gray")
    ax.set(xscale="log", xlabel="LoRA rank", ylabel=main, title=f"{task}: LoRA rank")
    ax.set_xticks(ranks, [str(k) for k in ranks])
    ax.legend(fontsize=7, loc="lower left")
    twin.set(yscale="log", ylabel="trainable parameters (gray)")
    return _save(fig, out / f"{task}_rank.png")


def _lr_plot(task: str, rows: list, main: str, out: Path) -> Optional[Path]:
    """Best metric (and step sizes) against the learning rate, one curve per method setup.

    Where the rate was chosen on a dev half, the first panel shows what it was chosen by: the
    selection half's metric over the seeds every rate ran, the chosen rate ringed (a peak
    inside the grid, not at its edge, is what makes the choice believable); the held-out
    scores are the report's tables and `_methods_plot`."""
    import matplotlib.pyplot as plt

    curves = defaultdict(list)
    for t in rows:
        curves[(t["method"], t["rank"], t["setting"])].append(t)
    curves = {k: sorted(v, key=lambda t: t["learning_rate"]) for k, v in curves.items()
              if len(v) > 1}
    if not curves:
        return None
    selected = all(t["selection"] is not None for v in curves.values() for t in v)
    selection = {i: score[0] for v in curves.values() if selected
                 for i, score in _selection_scores(v).items()}
    panels = [("selection", f"selection half's {main.removeprefix('eval_')}", "linear")
              if selected else ("mean", main, "linear")]
    if any(t["update_ratio"] is not None for v in curves.values() for t in v):
        panels += [("update_ratio", "‖Δθ‖/‖θ‖ per step", "log"),
                   ("loss_decrease", "−⟨g,Δθ⟩ per step", "log")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    # A family study draws a dozen curves or more: twenty colours and a marker per curve keep
    # them apart, and one legend beside the panels keeps it off the data.
    colors = plt.get_cmap("tab20" if len(curves) > 10 else "tab10").colors
    for ax, (key, ylabel, yscale) in zip(axes[0], panels):
        value = (lambda t: selection[id(t)]) if key == "selection" else (lambda t: t[key])
        for i, (_, pts) in enumerate(sorted(curves.items(), key=str)):
            label = _method_label(pts[0])
            pts = [t for t in pts if t[key] is not None]
            ax.errorbar([t["learning_rate"] for t in pts], [value(t) for t in pts],
                        [t["std"] for t in pts] if key == "mean" else None,
                        marker="osD^vPX*"[i % 8], ms=4, capsize=3,
                        color=colors[i % len(colors)], label=label)
            if key == "selection":
                ax.plot([t["learning_rate"] for t in pts if t["chosen"]],
                        [value(t) for t in pts if t["chosen"]], "o", ms=10, mfc="none",
                        color=colors[i % len(colors)])
        ax.set(xscale="log", yscale=yscale, xlabel="learning rate", ylabel=ylabel,
               title=f"{task}: {ylabel} vs learning rate")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="center left",
               bbox_to_anchor=(1.0, 0.5))
    return _save(fig, out / f"{task}_lr.png")


def _methods_plot(task: str, rows: list, out: Path) -> Optional[Path]:
    """Each method's GLUE task score at its chosen learning rate, one point per seed, the
    median as a bar, and the trivial baseline as a line."""
    import matplotlib.pyplot as plt

    chosen = sorted((t for t in rows if t["chosen"] and t["task_scores"]),
                    key=lambda t: (t["method"], t["rank"] or 0, t["setting"]))
    if not chosen:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(chosen) + 2), 4.5))
    labels = []
    for i, t in enumerate(chosen):
        ax.bar(i, np.median(t["task_scores"]), color="#c6dbef", width=0.6)
        ax.plot([i] * len(t["task_scores"]), t["task_scores"], "o", color="#08519c", ms=4)
        labels.append(_method_label(t))
    if chosen[0]["baseline_score"] is not None:
        ax.axhline(chosen[0]["baseline_score"], color="gray", ls="--", lw=1,
                   label="trivial baseline")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(chosen)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="GLUE task score (held-out dev half)",
           title=f"{task}: each method at its chosen rate (points: seeds)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / f"{task}_methods.png")


def _glue_plot(rows: list, out: Path) -> Optional[Path]:
    """The GLUE score over `shared_tasks` (named in the title) of each method that ran them
    all, so that the bars compare; none when no task is shared."""
    import matplotlib.pyplot as plt

    shared = shared_tasks(rows)
    scored = [(r, shared_score(r, shared)) for r in rows]
    rows, scores = [r for r, x in scored if x is not None], [x for _, x in scored if x is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(rows) + 2), 4.5))
    labels = [_method_label(r) for r in rows]
    bars = ax.bar(range(len(rows)), scores, color="#6baed6")
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    baselines = [rows[0]["tasks"][t]["baseline"] for t in shared]
    if None not in baselines:
        ax.axhline(np.mean(baselines), color="gray", ls="--", lw=1,
                   label="trivial baseline (constant prediction)")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="GLUE score (mean of task medians)",
           title=f"GLUE score on {', '.join(shared)} (each method that ran them all)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "glue_scores.png")


def write_plots(runs: list, table: list, out: Path) -> list:
    """Loss curves, validation metric vs steps, metric/params vs rank, metric vs lr (the
    selection half's, where the rate was chosen on one), each method's score at its chosen
    rate, and the GLUE scores (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({canonical_task(r["config"]["run"]["task"]) for r in runs}):
        task_runs = [r for r in runs if canonical_task(r["config"]["run"]["task"]) == task]
        main = task_runs[0]["results"]["main_metric"]
        rows = [t for t in table if t["task"] == task]
        written.append(_curves_plot(task, task_runs, rows, main, out))
        written += [p for p in (_rank_plot(task, rows, main, out),
                                _lr_plot(task, rows, main, out),
                                _methods_plot(task, rows, out)) if p is not None]
    glue = _glue_plot(glue_table(table), out)
    return written + ([glue] if glue is not None else [])


def report_cli(roots, out_md: str = "", plots_dir: str = "", pack: str = "") -> int:
    """`write_report` (or, with `pack`, `pack_study`) for the command line: prints the path
    written; user errors are one `error:` line."""
    from jaxpeft.cli import run_command

    if pack:
        return run_command(lambda: print(pack_study(roots, pack)))
    return run_command(lambda: print(write_report(roots, out_md, plots_dir)))


def _gather(roots) -> tuple[list, list]:
    """`(roots, runs)`: every finished run under `roots`, each once. A run is the same run
    wherever it is read from: its folder, and a study file it was packed into (a study
    extended from itself and the folders it came from), count once, as their config and
    results say; two runs of one configuration in different folders are two runs."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    runs, seen = [], set()
    for root in roots:
        if not Path(root).exists():
            raise JaxpeftError(f"{root}: no such folder or study file")
        for run in load_runs(Path(root)):
            identity = json.dumps([run["config"], run["results"]], sort_keys=True)
            if identity not in seen:
                seen.add(identity)
                runs.append(run)
    if not runs:
        where = ", ".join(f"`{r}`" for r in roots)
        raise JaxpeftError(f"{where}: no finished runs (no {RESULTS} below)")
    return roots, runs


def pack_study(roots, path: str) -> Path:
    """Writes the finished runs under `roots` into one study file (`.jsonl.gz`), each named
    by its folder relative to its root; `write_report` reads it like a folder."""
    from jaxpeft.errors import JaxpeftError

    if not path.endswith(STUDY_SUFFIX):
        raise JaxpeftError(f"--pack={path}: a study file's name ends in {STUDY_SUFFIX}")
    roots, runs = _gather(roots)
    records = []
    for run in runs:
        root = next(Path(r) for r in roots if run["dir"].is_relative_to(r))
        # A root that is itself a run folder names its run by the folder's name.
        relative = run["dir"].relative_to(root)
        records.append({"name": relative.as_posix() if relative.parts else run["dir"].name,
                        "config": run["config"], "results": run["results"],
                        "metrics": run["train_rows"] + run["eval_rows"]})
    return write_study(path, records)


def _commits(runs) -> str:
    """The source commits the runs name (config.json's `versions.commit`)."""
    found = sorted({r["config"].get("versions", {}).get("commit") or "not recorded"
                    for r in runs})
    return ", ".join(f"`{c}`" for c in found)


def write_report(roots, out_md: str = "", plots_dir: str = "") -> Path:
    """Writes a Markdown report and PNGs for the runs under `roots` (a folder or several).

    Defaults: `<first root>/report.md` and `<first root>/plots/`. A root may also be a single
    run's folder, so a report can combine chosen runs from different sweeps.
    """
    from jaxpeft.fileio import atomic_write_bytes

    roots, runs = _gather(roots)
    where = ", ".join(f"`{r}`" for r in roots)
    table = summarize(runs)
    first = Path(roots[0])
    default_md, default_plots = first / "report.md", first / "plots"
    if first.is_file():  # a study file: name.md and name-plots/ beside it
        stem = first.parent / first.name.removesuffix(STUDY_SUFFIX)
        default_md, default_plots = Path(f"{stem}.md"), Path(f"{stem}-plots")
    md_path = Path(out_md) if out_md else default_md
    plots = write_plots(runs, table, Path(plots_dir) if plots_dir else default_plots)
    text = [f"# Report: {len(runs)} runs under {where}", "",
            f"jaxpeft source of the runs: {_commits(runs)}.", "", markdown_table(table), ""]
    glue = glue_table(table)
    if glue:
        text += ["## GLUE task scores at the learning rate the selection half chose", "",
                 "Median over seeds [min, max] on the held-out dev halves; † at or below the "
                 "task's trivial baseline (a constant prediction); ↓ or ↑ where the chosen "
                 "rate is the lowest or highest of its grid (the peak may lie beyond it).",
                 "", glue_markdown(glue), ""]
    text += [f"![{p.stem}]({p.relative_to(md_path.parent) if p.is_relative_to(md_path.parent) else p})"
             for p in plots]
    atomic_write_bytes(md_path, ("\n".join(text) + "\n").encode())
    return md_path
