"""experiments/sweep.py and experiments/report.py on a tiny model."""

import json
import shutil
from pathlib import Path

import matplotlib.pyplot
import numpy as np
import pytest

from jaxpeft import plots
from jaxpeft.errors import JaxpeftError
from jaxpeft.config import RunConfig
from jaxpeft.plots import (_glue_plot, _mark_chosen, _varying, glue_markdown, glue_table,
                           pack_study, shared_tasks, write_report)
from jaxpeft.sweep import expand, parse_grid, run_sweep, sweep_cli
from jaxpeft.writer import read_study

# End-to-end runs of several seconds each: left out of the fast core (pytest -m "not slow").
pytestmark = pytest.mark.slow


def test_parse_grid_types_and_errors(tmp_path):
    grid = parse_grid("method=full,lora; learning_rate=2e-5,1e-3;lora_targets=query+value,key")
    assert grid == {"method": ["full", "lora"], "learning_rate": [2e-5, 1e-3],
                    "lora_targets": [("query", "value"), ("key",)]}
    runs = expand(RunConfig(), grid, [0, 1], tmp_path)
    assert len(runs) == 2 * 2 * 2 * 2
    assert runs[0].output_dir == str(tmp_path / "method=full,learning_rate=2e-05,"
                                                 "lora_targets=query+value,seed=0")
    for bad, msg in [("lr=1", "not a run setting"), ("method", "not name=value"),
                     ("lora_rank=a", "not a number"), ("output_dir=x", "not a run setting"),
                     ("seed=1;seed=2", "appears twice")]:
        with pytest.raises(JaxpeftError, match=msg):
            parse_grid(bad)


def test_sweep_then_report(tiny_model, glue_dir, tmp_path, caplog, monkeypatch):
    base = RunConfig(task="sst2", model=str(tiny_model), method="lora", data_dir=str(glue_dir),
                     max_train_samples=64, batch_size=16, max_steps=4, log_every=2,
                     eval_every=2, max_eval_samples=64, max_seq_length=64, cache_dir="",
                     progress=False, select_on="dev_half")
    root = tmp_path / "sweep"
    status = run_sweep(base, "learning_rate=1e-3,1e-2", [0, 1], str(root), progress=False)
    assert list(status.values()) == ["ok"] * 4
    again = run_sweep(base, "learning_rate=1e-3,1e-2", [0, 1], str(root), progress=False)
    assert all(s.startswith("skipped") for s in again.values())
    # a run failing as it loads (truncated weights) is reported and does not stop the next
    # one; a path in a grid value stays inside one folder name under the root
    damaged = tmp_path / "damaged-model"
    shutil.copytree(tiny_model, damaged)
    (damaged / "model.safetensors").write_bytes(b"\0" * 16)
    mixed = run_sweep(base, f"model={damaged},{tiny_model}", [0], str(tmp_path / "mixed"),
                      progress=False)
    [bad, good] = mixed
    assert "/" not in bad and mixed[bad].startswith(f"failed: {damaged}")
    assert "not a readable safetensors file" in mixed[bad]
    assert mixed[good] == "ok" and (tmp_path / "mixed" / good / "results.json").is_file()
    # options are checked for every grid point before any run starts
    for grid, message in (("lora_rank=2,0", "LoRA rank"),
                          ("max_seq_length=64,4", "--max_seq_length must be >= 8")):
        with pytest.raises(JaxpeftError, match=message):
            run_sweep(base, grid, [0], str(tmp_path / "bad"), progress=False)
        assert not (tmp_path / "bad").exists()
    summary = json.loads((root / "sweep.json").read_text())
    assert len(summary["runs"]) == 4

    # A damaged run and a folder of another tool are skipped with a warning, not fatal.
    shutil.copytree(root / "learning_rate=0.01,seed=1", root / "damaged")
    (root / "damaged" / "results.json").write_text("{")
    (root / "other-tool").mkdir()
    (root / "other-tool" / "config.json").write_text('{"model_type": "bert"}')
    (root / "other-tool" / "results.json").write_text('{"accuracy": 0.9}')
    md = write_report(str(root))
    assert f"skipped {root / 'damaged'}: {root / 'damaged' / 'results.json'}: the run " \
        "results file is not valid JSON" in caplog.text
    assert f"skipped {root / 'other-tool'}: " in caplog.text
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| sst2 ")]
    assert [r.split(" | ")[:5] for r in rows] == [["| sst2", "lora", "—", "0.001", "8"],
                                                   ["| sst2", "lora", "—", "0.01", "8"]]
    for row in rows:  # two seeds each: mean ± std, and the step sizes were logged
        cells = row.split(" | ")
        assert " ± " in cells[7] and cells[8] == "2" and cells[10] != "—" and cells[11] != "—"
    # The learning rate is picked by the selection half's mean over seeds.
    selection = {}
    for run in (root / f"learning_rate={lr},seed={seed}" for lr in ("0.001", "0.01")
                for seed in (0, 1)):
        results = json.loads((run / "results.json").read_text())
        selection.setdefault(results["learning_rate"], []).append(
            results["best"]["select_accuracy"])
    picked = max(selection, key=lambda lr: np.mean(selection[lr]))
    chosen = [r.split(" | ")[3] for r in rows if "**chosen**" in r]
    assert chosen == [f"{picked:g}"]
    # The GLUE table: the chosen rate's held-out score, median over seeds, † when it does not
    # beat the constant prediction (as the baseline column marks the cell **trivial**).
    held_out = [json.loads((root / f"learning_rate={picked:g},seed={seed}" / "results.json")
                           .read_text()) for seed in (0, 1)]
    median = float(np.median([r["best"]["eval_accuracy"] for r in held_out]))
    trivial = median <= held_out[0]["baseline"]["eval_accuracy"] + 1e-9
    # A grid of two rates has no inside: the chosen one is marked as its lower or upper end.
    edge = " ↓" if picked == min(selection) else " ↑"
    [glue_row] = [line for line in text.splitlines() if line.startswith("| lora r8 |")]
    assert glue_row.split(" | ")[2].startswith(f"{median:.4f}{' †' if trivial else ''}{edge} [")
    assert f"lr {picked:g}, 2 seeds" in glue_row and glue_row.endswith(
        f" | {median:.4f} (1) | {sum(r['train']['wall_s'] for r in held_out):.0f} |")
    assert ("**trivial**" in next(r for r in rows if "**chosen**" in r)) == trivial
    # Every run records the constant prediction's training loss (one training set, one value);
    # the curves plot draws it, and one curve per method: its lowest seed at the chosen rate.
    priors = {json.loads((r / "results.json").read_text())["baseline"]["train_loss"]
              for r in root.glob("learning_rate=*")}
    assert len(priors) == 1 and 0 < priors.pop() <= np.log(2)
    figures, runs = [], plots.load_runs(root)
    with monkeypatch.context() as patch:
        patch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
        plots._curves_plot("sst2", runs, plots.summarize(runs), "eval_accuracy", tmp_path)
    train_ax, metric_ax = figures[0].axes
    prior = runs[0]["results"]["baseline"]["train_loss"]
    [line] = [ln for ln in train_ax.lines if list(ln.get_ydata()) == [prior, prior]]
    assert line.get_label().startswith("constant prediction's training loss")
    [curve] = metric_ax.lines
    assert curve.get_label() == f"lora r8 lr {picked:g}"
    [seed0] = [r for r in runs if r["dir"] == root / f"learning_rate={picked:g},seed=0"]
    assert list(curve.get_ydata()) == [x["eval_accuracy"] for x in seed0["eval_rows"]]
    matplotlib.pyplot.close(figures[0])
    pngs = sorted(p.name for p in (root / "plots").glob("*.png"))
    assert pngs == ["glue_scores.png", "sst2_curves.png", "sst2_lr.png", "sst2_methods.png"]
    assert all((root / "plots" / p).stat().st_size > 10_000 for p in pngs)

    # Runs that differ in another setting are never averaged together; the column names it.
    other = tmp_path / "pooler"
    assert run_sweep(base, "train_pooler=true;learning_rate=1e-3", [0], str(other),
                     progress=False) == {"train_pooler=True,learning_rate=0.001,seed=0": "ok"}
    text = write_report([str(root), str(other)], str(tmp_path / "both.md")).read_text()
    rows = [line.split(" | ")[1:5] for line in text.splitlines() if line.startswith("| sst2 ")]
    assert rows == [["lora", "train_pooler=False", "0.001", "8"],
                    ["lora", "train_pooler=False", "0.01", "8"],
                    ["lora", "train_pooler=True", "0.001", "8"]]

    # A study file keeps the runs in one file; its report has the same table.
    study = pack_study([str(root), str(other)], str(tmp_path / "study.jsonl.gz"))
    assert study.stat().st_size < 60_000
    packed = write_report(str(study), str(tmp_path / "packed.md")).read_text()
    table = lambda t: [l for l in t.splitlines() if l.startswith("|")]  # noqa: E731
    assert table(packed) == table(text)
    assert (tmp_path / "study-plots" / "sst2_curves.png").is_file()
    # A study extended from itself and the folders it came from holds each run once, and a
    # report over a study and its folders counts each run once.
    again = pack_study([str(study), str(root), str(other)], str(tmp_path / "again.jsonl.gz"))
    assert [r["name"] for r in read_study(again)] == [r["name"] for r in read_study(study)]
    names = [r["name"] for r in read_study(study)]
    pack_study([str(study), str(root)], str(study))  # extended in place: still each run once
    assert [r["name"] for r in read_study(study)] == names
    both = write_report([str(study), str(root)], str(tmp_path / "twice.md")).read_text()
    assert table(both) == table(text)
    with pytest.raises(JaxpeftError, match="ends in .jsonl.gz"):
        pack_study(str(root), str(tmp_path / "study.json"))
    # A root that is one run's folder names that run by its folder.
    single = pack_study(str(root / "learning_rate=0.001,seed=0"), str(tmp_path / "one.jsonl.gz"))
    assert [r["name"] for r in read_study(single)] == ["learning_rate=0.001,seed=0"]


def test_report_on_empty_or_missing_folder(tmp_path):
    with pytest.raises(JaxpeftError, match="no finished runs"):
        write_report(str(tmp_path))
    with pytest.raises(JaxpeftError, match="no such folder or study file"):
        write_report([str(tmp_path), str(tmp_path / "nope")])


def test_sweep_seeds_that_are_not_numbers_are_one_error_line(tmp_path, capsys):
    code = sweep_cli(RunConfig(), "learning_rate=1e-3", ["0", "a"], str(tmp_path / "s"))
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == "error: seed='a' is not a number"
    assert not (tmp_path / "s").exists()


def test_a_damaged_study_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(JaxpeftError, match="bad.jsonl.gz: not a readable study file"):
        write_report(str(bad))


def test_glue_scores_compare_only_over_the_tasks_every_method_ran(tmp_path, monkeypatch):
    """A method with CoLA and MRPC and one with MRPC alone: the table keeps each one's own
    GLUE score and adds their scores on MRPC, the only set on which they compare; the bar
    chart plots that one. With more rows, the set is what most of them ran."""
    def row(method, task, scores):
        return {"chosen": True, "task_scores": scores, "method": method, "rank": None,
                "setting": "", "task": task, "learning_rate": 1e-3, "trivial": False,
                "baseline_score": 0.0, "wall_s": 10.0, "trainable": 100, "percent": 1.0}

    table = [row("full", "cola", [0.30, 0.32, 0.28]), row("full", "mrpc", [0.84]),
             row("lora", "mrpc", [0.80, 0.82])]
    rows = glue_table(table)
    assert shared_tasks(rows) == ["mrpc"]
    lines = glue_markdown(rows).splitlines()
    assert lines[0].endswith("| GLUE score (tasks) | score on mrpc | train s |")
    assert lines[2].startswith("| full | 100 | 0.3000 [0.280, 0.320]")
    assert lines[2].endswith(f"| {np.mean([0.30, 0.84]):.4f} (2) | 0.8400 | 40 |")
    assert lines[3].endswith("| 0.8100 (1) | 0.8100 | 20 |")
    # One task set for all: no extra column.
    same = glue_markdown(glue_table(table[1:])).splitlines()[0]
    assert "score on" not in same
    # No task in common: no bar chart rather than bars over different tasks.
    import matplotlib
    matplotlib.use("Agg")
    assert _glue_plot(glue_table([table[0], table[2]]), tmp_path) is None
    assert _glue_plot(rows, tmp_path).name == "glue_scores.png"
    # Two methods with CoLA and MRPC, a third with MRPC alone: the first two compare on both
    # tasks (run by more than half of the rows); the third has no score there, and no bar.
    three = glue_table(table + [row("lora", "cola", [0.20]), row("adalora", "mrpc", [0.83])])
    assert shared_tasks(three) == ["cola", "mrpc"]
    lines = glue_markdown(three).splitlines()
    assert lines[0].endswith("| score on cola, mrpc | train s |")
    adalora, full = lines[2], lines[3]
    assert adalora.startswith("| adalora |") and adalora.endswith("| 0.8300 (1) | — | 10 |")
    assert full.endswith(f"| {np.mean([0.30, 0.84]):.4f} (2) | {np.mean([0.30, 0.84]):.4f} | 40 |")
    import matplotlib.axes
    bars, real_bar = [], matplotlib.axes.Axes.bar

    def bar(self, x, heights, *args, **kwargs):
        bars.append(list(heights))
        return real_bar(self, x, heights, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    _glue_plot(three, tmp_path)
    assert np.allclose(bars[0], [np.mean([0.30, 0.84]), np.mean([0.20, 0.81])])


def test_many_methods_get_one_curves_panel_each_on_shared_scales(tmp_path, monkeypatch):
    """Past `_OVERLAY_MAX` methods the curves plot draws a panel per method: its chosen run's
    training and validation loss, the constant prediction's loss, and the metric on a right
    axis whose limits are the same in every panel; a longer run keeps its own steps."""
    import matplotlib
    matplotlib.use("Agg")
    n = plots._OVERLAY_MAX + 1
    runs, rows = [], []
    for i in range(n):
        steps = 100 * (3 if i == 0 else 1)
        runs.append({"dir": tmp_path / f"m{i}", "results": {"baseline": {"train_loss": 0.6}},
                     "train_rows": [{"step": s, "train_loss": 0.6 - 0.01 * i * s / 100}
                                    for s in range(10, steps + 1, 10)],
                     "eval_rows": [{"step": s, "eval_loss": 0.62, "eval_matthews": 0.05 * i * s
                                    / steps} for s in (steps // 2, steps)]})
        rows.append({"chosen": True, "method": f"m{i}", "rank": None, "setting": "",
                     "learning_rate": 1e-3, "dirs": [tmp_path / f"m{i}"]})
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots._curves_plot("cola", runs, rows, "eval_matthews", tmp_path)
    [fig] = figures
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [f"m{i} lr 0.001" for i in range(n)]
    metric_axes = [ax for ax in fig.axes if ax.get_visible() and not ax.get_title()
                   and ax.lines]
    assert len(metric_axes) == n
    assert len({ax.get_ylim() for ax in metric_axes}) == 1
    low, high = metric_axes[0].get_ylim()
    assert low < 0.0 and high > 0.05 * (n - 1)
    for i, (panel, metric) in enumerate(zip(panels, metric_axes)):
        train, evals, prior = panel.lines
        assert list(train.get_xdata())[-1] == (300 if i == 0 else 100)
        assert list(prior.get_ydata()) == [0.6, 0.6]
        assert list(metric.lines[0].get_ydata()) == [x["eval_matthews"]
                                                     for x in runs[i]["eval_rows"]]
    assert len(fig.legends[0].get_texts()) == 4
    matplotlib.pyplot.close(fig)
    # Up to `_OVERLAY_MAX` methods share one pair of axes, one line per method.
    figures.clear()
    plots._curves_plot("cola", runs[:-1], rows[:-1], "eval_matthews", tmp_path)
    assert len(figures[0].axes) == 2 and len(figures[0].axes[1].lines) == n - 1
    matplotlib.pyplot.close(figures[0])


def test_a_row_is_labelled_by_its_own_methods_settings_only():
    """AdaLoRA's schedule differs from every other method's (unset there) but labels no
    other method's row; LoRA's rows differ in train_pooler, so both name it; a schedule set
    per task (AdaLoRA's tinit on MRPC and STS-B) labels nothing, while two schedules on one
    task do."""
    def key(method, task="sst2", **options):
        return {"task": task, "method": method, "learning_rate": 1e-3, "lora_rank": 8,
                "adalora_tinit": 0, "train_pooler": False, **options}

    varying = _varying([key("lora"), key("lora", train_pooler=True),
                        key("adalora", "mrpc", adalora_tinit=35),
                        key("adalora", "stsb", adalora_tinit=54), key("oft")])
    assert varying["lora"] == ["train_pooler"]
    assert varying["adalora"] == [] and varying["oft"] == []
    varying = _varying([key("adalora", "mrpc", adalora_tinit=35),
                        key("adalora", "mrpc", adalora_tinit=20),
                        key("adalora", "stsb", adalora_tinit=54)])
    assert varying["adalora"] == ["adalora_tinit"]


def test_the_rate_is_chosen_on_the_seeds_every_rate_ran():
    """Seeds 1 and 2 added at the rate seed 0 chose do not move the choice, even when their
    mean on the selection half falls below another rate's seed 0."""
    def row(lr, by_seed, loss=0.5):
        return {"task": "mrpc", "method": "oft", "rank": None, "setting": "",
                "learning_rate": lr, "selection": float(np.mean(list(by_seed.values()))),
                "selection_by_seed": by_seed, "chosen": False,
                "selection_loss_by_seed": {k: loss for k in by_seed}}

    table = [row(1e-3, {0: 0.816}), row(3e-3, {0: 0.818, 1: 0.806, 2: 0.800}),
             row(1e-2, {0: 0.781})]
    _mark_chosen(table)
    assert [t["learning_rate"] for t in table if t["chosen"]] == [3e-3]
    # No seed in common: the means over all seeds decide.
    table = [row(1e-3, {1: 0.816}), row(3e-3, {0: 0.818, 2: 0.800})]
    _mark_chosen(table)
    assert [t["learning_rate"] for t in table if t["chosen"]] == [1e-3]
    # A tie (RTE's 138-example half ties often) goes to the lower selection loss, whichever
    # row comes first.
    for order in (1, -1):
        table = [row(3e-4, {0: 0.5435}, 0.69), row(1e-3, {0: 0.5435}, 0.68)][::order]
        _mark_chosen(table)
        assert [t["learning_rate"] for t in table if t["chosen"]] == [1e-3]
    # The learning-rate plot draws what the rate was chosen by: the selection half's mean
    # over the seeds every rate ran (0.818 at 3e-3, not 0.808 over its three), chosen ringed.
    import matplotlib
    matplotlib.use("Agg")
    table = [row(1e-3, {0: 0.816}), row(3e-3, {0: 0.818, 1: 0.806, 2: 0.800}),
             row(1e-2, {0: 0.781})]
    for t in table:
        t |= {"mean": 0.9, "std": 0.0, "update_ratio": None, "loss_decrease": None}
    _mark_chosen(table)
    figures = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
        plots._lr_plot("mrpc", table, "eval_f1", Path("."))
    [ax] = figures[0].axes
    curve, ring = ax.lines
    assert list(curve.get_xdata()) == [1e-3, 3e-3, 1e-2]
    assert np.allclose(curve.get_ydata(), [0.816, 0.818, 0.781])
    assert list(ring.get_xdata()) == [3e-3] and np.allclose(ring.get_ydata(), [0.818])
    assert ax.get_ylabel() == "selection half's f1"
    matplotlib.pyplot.close(figures[0])


def test_the_glue_table_marks_a_rate_chosen_at_the_grid_edge():
    """A chosen rate at either end of its grid (or alone) is marked, so that a reader sees
    which cells are not yet interior peaks; an interior choice carries no mark."""
    def row(task, lr, sel):
        return {"task": task, "method": "prompt", "rank": None, "setting": "",
                "learning_rate": lr, "selection": sel, "selection_by_seed": {0: sel},
                "selection_loss_by_seed": {0: 0.5}, "chosen": False, "task_scores": [sel],
                "trivial": False, "baseline_score": 0.0, "wall_s": 1.0, "trainable": 10,
                "percent": 0.1}

    table = [row("cola", 1e-2, 0.20), row("cola", 3e-2, 0.25), row("cola", 1e-1, 0.10),
             row("rte", 1e-2, 0.55), row("rte", 3e-2, 0.52),
             row("stsb", 1e-2, 0.19), row("stsb", 3e-2, 0.32), row("stsb", 1e-1, 0.34),
             row("wnli", 3e-2, 0.50)]
    _mark_chosen(table)
    assert {t["task"]: t["grid_edge"] for t in table if t["chosen"]} == {
        "cola": None, "rte": "low", "stsb": "high", "wnli": "single"}
    assert all(t["grid_edge"] is None for t in table if not t["chosen"])
    cells = glue_markdown(glue_table(table)).splitlines()[2].split(" | ")[2:6]
    assert cells == ["0.2500<br>lr 0.03, 1 seed", "0.5500 ↓<br>lr 0.01, 1 seed",
                     "0.3400 ↑<br>lr 0.1, 1 seed", "0.5000<br>lr 0.03 (one rate), 1 seed"]
