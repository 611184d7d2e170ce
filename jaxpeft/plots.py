"""Reports from run folders: a Markdown table and matplotlib plots.

Reads only what runs wrote (`config.json`, `metrics.jsonl`, `results.json`) under a root
folder, so it works on any mix of finished runs, sweeps or single runs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxpeft.writer import CONFIG, METRICS, RESULTS


def load_runs(root: Path) -> list:
    """Every finished run below `root`: dicts with config, results, metric rows, folder."""
    runs = []
    for results in sorted(Path(root).rglob(RESULTS)):
        folder = results.parent
        if not (folder / CONFIG).is_file():
            continue
        rows = []
        if (folder / METRICS).is_file():
            rows = [json.loads(l) for l in (folder / METRICS).read_text().splitlines() if l.strip()]
        runs.append({"dir": folder, "config": json.loads((folder / CONFIG).read_text()),
                     "results": json.loads(results.read_text()), "rows": rows})
    return runs


def _key(run) -> tuple:
    c = run["config"]["run"]
    rank = c["lora_rank"] if c["method"] == "lora" else None
    return (c["task"], c["method"], run["results"]["learning_rate"], rank)


def summarize(runs: list) -> list:
    """One row per (task, method, learning rate, rank), mean ± std over seeds."""
    groups = defaultdict(list)
    for r in runs:
        groups[_key(r)].append(r)
    table = []
    for (task, method, lr, rank), group in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2], kv[0][3] or 0)):
        main = group[0]["results"]["main_metric"]
        best = np.array([g["results"]["best"][main] for g in group], np.float64)
        params = group[0]["results"]["params"]
        table.append({
            "task": task, "method": method, "learning_rate": lr, "rank": rank,
            "metric": main.removeprefix("eval_"), "mean": float(best.mean()),
            "std": float(best.std(ddof=1)) if len(best) > 1 else 0.0, "seeds": len(group),
            "trainable": params["trainable"], "percent": params["percent"],
            "steps": group[0]["results"]["train"]["steps"],
            "wall_s": float(np.mean([g["results"]["train"]["wall_s"] for g in group])),
            "examples_per_s": float(np.mean([g["results"]["train"]["examples_per_s"]
                                             for g in group]))})
    return table


def markdown_table(table: list) -> str:
    """The summary as a Markdown table."""
    lines = ["| task | method | lr | rank | trainable | % | best metric (mean ± std) | seeds "
             "| steps | train s | ex/s |",
             "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for t in table:
        lines.append(
            f"| {t['task']} | {t['method']} | {t['learning_rate']:g} | {t['rank'] or '—'} | "
            f"{t['trainable']:,} | {t['percent']:.3f} | {t['metric']} {t['mean']:.4f} ± "
            f"{t['std']:.4f} | {t['seeds']} | {t['steps']} | {t['wall_s']:.0f} | "
            f"{t['examples_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _label(run) -> str:
    return run["dir"].name


def write_plots(runs: list, table: list, out: Path) -> list:
    """Loss curves, validation metric vs steps, metric/params vs rank, metric vs lr (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({r["config"]["run"]["task"] for r in runs}):
        task_runs = [r for r in runs if r["config"]["run"]["task"] == task]
        main = task_runs[0]["results"]["main_metric"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in task_runs:
            train = [(x["step"], x["train_loss"]) for x in r["rows"] if "learning_rate" in x]
            evals = [(x["step"], x["eval_loss"], x.get(main)) for x in r["rows"] if main in x]
            line = ax1.plot(*zip(*train), lw=1, label=f"{_label(r)} train")[0] if train else None
            if evals:
                ax1.plot([e[0] for e in evals], [e[1] for e in evals], "--o", ms=3,
                         color=line.get_color() if line else None, label=f"{_label(r)} val")
                ax2.plot([e[0] for e in evals], [e[2] for e in evals], "-o", ms=3,
                         label=_label(r))
        ax1.set(xlabel="step", ylabel="loss", title=f"{task}: training and validation loss")
        ax2.set(xlabel="step", ylabel=main, title=f"{task}: validation {main}")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            if len(task_runs) <= 12:
                ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / f"{task}_curves.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

        rows = [t for t in table if t["task"] == task]
        ranks = sorted({t["rank"] for t in rows if t["rank"]})
        if len(ranks) > 1:
            lora = {t["rank"]: t for t in rows if t["rank"]}
            fig, ax = plt.subplots(figsize=(6, 4.5))
            ax.errorbar(ranks, [lora[k]["mean"] for k in ranks], [lora[k]["std"] for k in ranks],
                        marker="o", capsize=3)
            ax.set(xscale="log", xlabel="LoRA rank", ylabel=main, title=f"{task}: LoRA rank")
            ax.set_xticks(ranks, [str(k) for k in ranks])
            twin = ax.twinx()
            twin.plot(ranks, [lora[k]["trainable"] for k in ranks], "s--", color="gray")
            twin.set(yscale="log", ylabel="trainable parameters")
            fig.tight_layout()
            path = out / f"{task}_rank.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)

        methods = sorted({t["method"] for t in rows})
        if any(len({t["learning_rate"] for t in rows if t["method"] == m}) > 1 for m in methods):
            fig, ax = plt.subplots(figsize=(6, 4.5))
            for m in methods:
                pts = sorted((t["learning_rate"], t["mean"], t["std"]) for t in rows
                             if t["method"] == m and t["rank"] in (None, 8))
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                                marker="o", capsize=3, label=m)
            ax.set(xscale="log", xlabel="learning rate", ylabel=main,
                   title=f"{task}: metric vs learning rate")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = out / f"{task}_lr.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def write_report(root: str, out_md: str = "", plots_dir: str = "") -> Path:
    """Writes `<root>/report.md` (or `out_md`) and PNGs (in `plots_dir` or `<root>/plots`)."""
    from jaxpeft.errors import JaxpeftError
    from jaxpeft.fileio import atomic_write_bytes

    runs = load_runs(Path(root))
    if not runs:
        raise JaxpeftError(f"{root}: no finished runs (no {RESULTS} below this folder)")
    table = summarize(runs)
    md_path = Path(out_md) if out_md else Path(root) / "report.md"
    plots = write_plots(runs, table, Path(plots_dir) if plots_dir else Path(root) / "plots")
    text = [f"# Report: {len(runs)} runs under `{root}`", "", markdown_table(table), ""]
    text += [f"![{p.stem}]({p.relative_to(md_path.parent) if p.is_relative_to(md_path.parent) else p})"
             for p in plots]
    atomic_write_bytes(md_path, ("\n".join(text) + "\n").encode())
    return md_path
