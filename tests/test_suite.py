"""The GLUE suite (`experiments/run_glue_suite.py`): recipes and explicit flags, every task on
a generated GLUE folder with the submission zip, restart skipping, failed tasks reported, the
trivial baseline of every run."""

import json
import math
import zipfile

import numpy as np
import pytest

from jaxpeft.config import RunConfig
from jaxpeft.data import get_task, load_split
from jaxpeft.evaluation import constant_train_loss, trivial_baseline
from jaxpeft.run import baseline_warning
from jaxpeft.suite import GLUE_TASKS, glue_metric_keys, run_suite, task_config, task_score

# End-to-end runs of several seconds each: left out of the fast core (pytest -m "not slow").
pytestmark = pytest.mark.slow

MNLI = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
        "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")
WORDS = "the film was good bad long short fine dull bright dark cold warm".split()


def _text(i, n=5):
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + " ."


def _pair_rows(n, label):
    return [f"{i}\t{_text(i)}\t{_text(i + 1, 4)}" + (f"\t{label(i)}" if label else "")
            for i in range(n)]


def make_glue_folder(root, n_train=12, n_dev=6, test_rows=None):
    """Every GLUE task (and the diagnostic set) in its original TSV layout, generated."""
    test_rows = test_rows or {}
    files = {}
    nli2 = lambda i: ("entailment", "not_entailment")[i % 2]  # noqa: E731
    for split, n in (("train", n_train), ("dev", n_dev)):
        files[f"CoLA/{split}.tsv"] = [f"src\t{i % 2}\t\t{_text(i)}" for i in range(n)]
        files[f"SST-2/{split}.tsv"] = ["sentence\tlabel"] + [f"{_text(i)}\t{i % 2}" for i in range(n)]
        files[f"MRPC/{split}.tsv"] = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
            f"{i % 2}\t{i}\t{i + 1}\t{_text(i)}\t{_text(i + 2)}" for i in range(n)]
        files[f"STS-B/{split}.tsv"] = [
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
        ] + [f"{i}\tg\tf\t2012\t{i:04d}\tnone\tnone\t{_text(i)}\t{_text(i + 1)}\t{i % 6:.3f}"
             for i in range(n)]
        files[f"QQP/{split}.tsv"] = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"] + [
            f"{i}\t{2 * i}\t{2 * i + 1}\t{_text(i)}?\t{_text(i + 3)}?\t{i % 2}" for i in range(n)]
        files[f"QNLI/{split}.tsv"] = ["index\tquestion\tsentence\tlabel"] + _pair_rows(n, nli2)
        files[f"RTE/{split}.tsv"] = ["index\tsentence1\tsentence2\tlabel"] + _pair_rows(n, nli2)
        files[f"WNLI/{split}.tsv"] = ["index\tsentence1\tsentence2\tlabel"] + _pair_rows(
            n, lambda i: i % 2)
    three = ("entailment", "neutral", "contradiction")
    files["MNLI/train.tsv"] = [MNLI + "\tlabel1\tgold_label"] + [
        f"{i}\t{i}\t{i}e\tfiction\t( a )\t( b )\t(ROOT a)\t(ROOT b)\t{_text(i)}\t{_text(i + 1)}"
        f"\t{three[i % 3]}\t{three[i % 3]}" for i in range(n_train)]
    for name in ("dev_matched", "dev_mismatched"):
        files[f"MNLI/{name}.tsv"] = [MNLI + "\tlabel1\tgold_label"] + [
            f"{i}\t{i}\t{i}e\tfiction\t( a )\t( b )\t(ROOT a)\t(ROOT b)\t{_text(i)}\t{_text(i + 2)}"
            f"\t{three[i % 3]}\t{three[i % 3]}" for i in range(n_dev)]
    # Test files: unlabeled, their own row counts.
    count = lambda key, default: test_rows.get(key, default)  # noqa: E731
    files["CoLA/test.tsv"] = ["index\tsentence"] + [f"{i}\t{_text(i)}" for i in range(count("cola", 5))]
    files["SST-2/test.tsv"] = ["index\tsentence"] + [f"{i}\t{_text(i)}" for i in range(count("sst2", 4))]
    files["MRPC/test.tsv"] = ["index\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
        f"{i}\t{i}\t{i + 1}\t{_text(i)}\t{_text(i + 2)}" for i in range(count("mrpc", 3))]
    files["STS-B/test.tsv"] = [
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"] + [
        f"{i}\tg\tf\t2012\t{i:04d}\tnone\tnone\t{_text(i)}\t{_text(i + 1)}"
        for i in range(count("stsb", 6))]
    files["QQP/test.tsv"] = ["id\tquestion1\tquestion2"] + [
        f"{i}\t{_text(i)}?\t{_text(i + 1)}?" for i in range(count("qqp", 7))]
    for name, n in (("test_matched", 5), ("test_mismatched", 4)):
        files[f"MNLI/{name}.tsv"] = [MNLI] + [
            f"{i}\t{i}\t{i}e\tfiction\t( a )\t( b )\t(ROOT a)\t(ROOT b)\t{_text(i)}\t{_text(i + 1)}"
            for i in range(n)]
    files["QNLI/test.tsv"] = ["index\tquestion\tsentence"] + _pair_rows(count("qnli", 3), None)
    files["RTE/test.tsv"] = ["index\tsentence1\tsentence2"] + _pair_rows(count("rte", 4), None)
    files["WNLI/test.tsv"] = ["index\tsentence1\tsentence2"] + _pair_rows(count("wnli", 2), None)
    files["diagnostic/diagnostic.tsv"] = ["index\tsentence1\tsentence2"] + _pair_rows(5, None)
    for name, lines in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# What the GLUE server accepts in each file's prediction column.
VOCAB = {"CoLA.tsv": {"0", "1"}, "SST-2.tsv": {"0", "1"}, "MRPC.tsv": {"0", "1"},
         "QQP.tsv": {"0", "1"}, "WNLI.tsv": {"0", "1"},
         "MNLI-m.tsv": {"entailment", "neutral", "contradiction"},
         "MNLI-mm.tsv": {"entailment", "neutral", "contradiction"},
         "AX.tsv": {"entailment", "neutral", "contradiction"},
         "QNLI.tsv": {"entailment", "not_entailment"}, "RTE.tsv": {"entailment", "not_entailment"}}


def test_suite_runs_every_task_writes_tables_and_submission(tiny_model, tmp_path):
    data = make_glue_folder(tmp_path / "glue")
    base = RunConfig(model=str(tiny_model), method="lora", data_dir=str(data), max_steps=2,
                     batch_size=4, eval_batch_size=8, log_every=1, max_seq_length=32,
                     cache_dir="", do_predict=True, output_dir=str(tmp_path / "suite"),
                     progress=False)
    explicit = frozenset({"max_steps", "batch_size", "max_seq_length"})
    summary = run_suite(base, GLUE_TASKS, "standard", explicit)
    root = tmp_path / "suite"
    assert [t for t, row in summary["tasks"].items() if row["status"] == "done"] == list(GLUE_TASKS)
    assert summary["scored_tasks"] == 9
    assert summary["score"] == pytest.approx(np.mean([r["score"] for r in summary["tasks"].values()]))
    assert json.loads((root / "glue.json").read_text())["score"] == pytest.approx(summary["score"])
    md = (root / "glue.md").read_text()
    assert all(f"| {t} |" in md for t in GLUE_TASKS) and "another model" in md
    for t in GLUE_TASKS:  # each task is a normal run folder
        assert (root / t / "results.json").is_file() and (root / t / "best" / "adapter.json").is_file()
    with zipfile.ZipFile(root / "glue_submission.zip") as z:
        assert sorted(z.namelist()) == sorted(["CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv",
                                               "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv",
                                               "QNLI.tsv", "RTE.tsv", "WNLI.tsv", "AX.tsv"])
        sources = {name: (task, split) for t in GLUE_TASKS
                   for task, split, name in get_task(t).prediction_files()}
        assert sources["AX.tsv"][0].name == "ax"  # predicted by the MNLI run
        for name in z.namelist():
            rows = z.read(name).decode().splitlines()
            assert rows[0] == "index\tprediction", name
            test = load_split(*sources[name], data)
            assert [int(r.split("\t")[0]) for r in rows[1:]] == test.idx.tolist(), name
            values = [r.split("\t")[1] for r in rows[1:]]
            if name == "STS-B.tsv":
                assert all(0.0 <= float(v) <= 5.0 for v in values)
            else:
                assert set(values) <= VOCAB[name], name
    # A restart skips every finished task and rewrites the same table.
    before = (root / "rte" / "results.json").stat().st_mtime_ns
    again = run_suite(base, GLUE_TASKS, "standard", explicit)
    assert (root / "rte" / "results.json").stat().st_mtime_ns == before
    assert again["score"] == pytest.approx(summary["score"])


def test_failed_task_is_reported_and_the_suite_goes_on(tiny_model, tmp_path, capsys):
    data = make_glue_folder(tmp_path / "glue")
    for f in (data / "MNLI").iterdir():
        f.unlink()  # offline GLUE folders have no MNLI training file
    base = RunConfig(model=str(tiny_model), data_dir=str(data), max_steps=1, batch_size=4,
                     max_seq_length=32, cache_dir="", output_dir=str(tmp_path / "s"),
                     progress=False)
    summary = run_suite(base, ("mnli", "wnli"), "standard", frozenset({"max_steps"}))
    assert summary["tasks"]["mnli"]["status"] == "failed"
    assert "MNLI/train.tsv: file not found" in summary["tasks"]["mnli"]["reason"]
    assert summary["tasks"]["wnli"]["status"] == "done" and summary["scored_tasks"] == 1
    assert "[mnli] not run:" in capsys.readouterr().out
    assert not (tmp_path / "s" / "mnli").exists()  # checked before anything was written
    # A finished task whose results.json is damaged is skipped with a line, and the command
    # exits 1 when any task did not run.
    (tmp_path / "s" / "wnli" / "results.json").write_text('{"best": ')
    summary = run_suite(base, ("wnli",), "standard", frozenset({"max_steps"}))
    assert summary["tasks"]["wnli"]["status"] == "failed"
    assert "wnli/results.json: the run results file is not valid JSON" in \
        summary["tasks"]["wnli"]["reason"]
    assert "[wnli] skipped:" in capsys.readouterr().out
    from jaxpeft.suite import suite_cli
    assert suite_cli(base, ("wnli",), "standard", frozenset({"max_steps"})) == 1


def test_recipe_defaults_yield_to_explicit_flags(tmp_path):
    base = RunConfig(method="lora", learning_rate=1e-3, num_epochs=7)
    cfg = task_config(base, "rte", "lora-paper", {"learning_rate"}, tmp_path)
    # The LoRA paper's RTE recipe: 80 epochs, batch 32, length 512; the given lr wins.
    assert (cfg.num_epochs, cfg.batch_size, cfg.max_seq_length) == (80, 32, 512)
    assert cfg.learning_rate == 1e-3 and cfg.output_dir == str(tmp_path / "rte")
    cfg = task_config(RunConfig(method="lora"), "mrpc", "lora-paper", set(), tmp_path)
    assert cfg.learning_rate == 4e-4 and cfg.warmup_ratio == 0.06 and cfg.weight_decay == 0.1
    cfg = task_config(RunConfig(method="bitfit"), "mrpc", "standard", set(), tmp_path)
    assert cfg.learning_rate is None  # the method's own default
    assert (cfg.num_epochs, cfg.batch_size, cfg.max_seq_length) == (3, 32, 128)


def test_glue_scores_average_as_the_benchmark_does():
    assert glue_metric_keys("mnli") == ["eval_accuracy_matched", "eval_accuracy_mismatched"]
    assert task_score("mrpc", {"eval_f1": 0.9, "eval_accuracy": 0.8}) == pytest.approx(0.85)
    assert task_score("stsb", {"eval_pearson": 0.5, "eval_spearman": 0.7}) == pytest.approx(0.6)
    assert task_score("cola", {"eval_loss": 1.0}) is None


def test_trivial_baseline_on_real_dev_sets(glue_dir):
    """MRPC's all-'equivalent' F1 is 0.8122 (what a 50-step run printed, unflagged); CoLA's
    majority class has Matthews 0; a constant STS-B prediction has no correlation."""
    from jaxpeft.data.batching import Encoded

    def enc(task):
        split = load_split(task, "validation", glue_dir)
        n = len(split)
        return Encoded(task, "validation", np.zeros(n, np.int32), np.zeros(n, np.int8),
                       np.arange(n + 1), split.labels, split.idx)

    mrpc = trivial_baseline(get_task("mrpc"), {"validation": enc("mrpc")})
    assert mrpc["prediction"] == {"validation": "equivalent"}
    assert mrpc["eval_f1"] == pytest.approx(0.8122, abs=1e-4)
    assert mrpc["eval_accuracy"] == pytest.approx(279 / 408)
    assert trivial_baseline(get_task("cola"), {"validation": enc("cola")})["eval_matthews"] == 0.0
    stsb = trivial_baseline(get_task("stsb"), {"validation": enc("stsb")})
    assert stsb["eval_pearson"] == 0.0 and "prediction" not in stsb
    results = {"main_metric": "eval_f1", "best": {"eval_f1": mrpc["eval_f1"]}, "baseline": mrpc}
    assert "does not beat the trivial baseline 0.8122 (predicting 'equivalent'" in \
        baseline_warning(results)
    results["best"]["eval_f1"] = 0.85
    assert baseline_warning(results) is None
    assert not math.isnan(mrpc["eval_combined_score"])


def test_constant_train_loss_is_the_label_priors_entropy_or_variance(glue_dir):
    """The training loss a model that ignores its input reaches: CoLA's 2,528 unacceptable
    and 6,023 acceptable sentences give an entropy of 0.607 nats; STS-B's scores a variance."""
    cola, stsb = get_task("cola"), get_task("stsb")
    assert constant_train_loss(cola, np.array([0, 0, 1, 1])) == pytest.approx(math.log(2))
    assert constant_train_loss(cola, np.array([1, 1, 1])) == 0.0
    assert constant_train_loss(stsb, np.array([1.0, 3.0])) == pytest.approx(1.0)
    labels = load_split("cola", "train", glue_dir).labels
    assert np.bincount(labels).tolist() == [2528, 6023]
    p = 6023 / 8551
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert constant_train_loss(cola, labels) == pytest.approx(entropy, rel=1e-12)
    assert round(entropy, 3) == 0.607
    scores = load_split("stsb", "train", glue_dir).labels.astype(np.float64)
    assert constant_train_loss(stsb, scores) == pytest.approx(
        np.mean((scores - scores.mean()) ** 2), rel=1e-12)
    # Recorded with the dev baseline when the training labels are given, absent otherwise.
    dev = load_split("cola", "validation", glue_dir)
    from jaxpeft.data.batching import Encoded
    n = len(dev)
    enc = Encoded(cola, "validation", np.zeros(n, np.int32), np.zeros(n, np.int8),
                  np.arange(n + 1), dev.labels, dev.idx)
    assert trivial_baseline(cola, {"validation": enc}, train_labels=labels)["train_loss"] == \
        pytest.approx(entropy, rel=1e-12)
    assert "train_loss" not in trivial_baseline(cola, {"validation": enc})
