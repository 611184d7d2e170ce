"""End to end: `train_and_evaluate` / `experiments.run_glue` on a tiny BERT and real GLUE."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxpeft import hostmem
from jaxpeft.config import RunConfig
from jaxpeft.errors import JaxpeftError
from jaxpeft.run import train_and_evaluate, train_cli
from jaxpeft.writer import read_metrics
from tests.helpers import REPO, comparable_rows, metric_rows, run_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _train_rows(out):
    return read_metrics(out)[0]


def test_sst2_lora_run_writes_every_file(tiny_model, glue_dir, tmp_path):
    cfg = run_config(tiny_model, glue_dir, tmp_path)
    results = train_and_evaluate(cfg)
    out = tmp_path / "run"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["task"] == "sst2" and on_disk["method"] == "lora"
    assert on_disk["params"]["trainable"] == 2 * 2 * (32 * 8 + 8 * 32) + 32 * 2 + 2
    assert on_disk["train"]["steps"] == 12 and on_disk["train"]["examples"] == 192
    assert on_disk["train"]["wall_s"] > 0 and on_disk["train"]["compilations"] >= 1
    assert on_disk["final"]["step"] == 12 and 0 <= on_disk["final"]["eval_accuracy"] <= 1
    assert on_disk["best"]["eval_accuracy"] >= on_disk["final"]["eval_accuracy"]
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["learning_rate"] == 1e-3 and config["resolved"]["total_steps"] == 12
    assert config["devices"]["count"] >= 1 and "jax" in config["versions"]
    # The library leaves malloc alone (the commands apply --host_malloc); config.json says so.
    assert config["devices"]["malloc"] == hostmem.describe() != ""
    train_rows, eval_rows = read_metrics(out)
    assert [r["step"] for r in train_rows] == [4, 8, 12]
    assert [r["step"] for r in eval_rows] == [5, 6, 10, 12]  # every 5 steps, each epoch end
    # One schema: a row's keys besides step/epoch all carry its kind's prefix.
    assert len(metric_rows(out)) == len(train_rows) + len(eval_rows)
    for rows, prefix in ((train_rows, "train_"), (eval_rows, "eval_")):
        assert all(k.startswith(prefix) for r in rows for k in r if k not in ("step", "epoch"))
    assert all(r["eval_examples"] == 872 for r in eval_rows)  # whole dev split, each once
    assert all(r["train_grad_norm"] > 0 and r["train_update_norm"] > 0
               and 0 < r["train_update_ratio"] < 1 and np.isfinite(r["train_loss_decrease"])
               and r["train_examples_per_s"] > 0 and r["train_learning_rate"] > 0
               for r in train_rows)
    assert (out / "best" / "adapter.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["12", "8"]
    assert not (out / ".lock").exists()  # the lock goes with the run


@pytest.mark.slow
def test_dev_half_selects_on_one_half_and_scores_on_the_other(tiny_model, glue_dir, tmp_path):
    from jaxpeft.evaluation import dev_halves

    selection, held_out = dev_halves(101)
    assert len(selection) == 50 and len(held_out) == 51
    assert not set(selection) & set(held_out) and len({*selection, *held_out}) == 101
    assert np.array_equal(dev_halves(101)[0], selection)  # fixed: every run the same halves
    assert 15 < np.sum(selection < 50) < 35  # spread over the split, not its first half
    common = dict(max_eval_samples=101, eval_every=3)
    whole = train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "a", **common))
    halves = train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "b",
                                           select_on="dev_half", **common))
    assert halves["main_metric"] == "eval_accuracy"
    assert halves["selected_by"] == "select_accuracy" and whole["selected_by"] == "eval_accuracy"
    whole_rows, half_rows = read_metrics(tmp_path / "a" / "run")[1], read_metrics(
        tmp_path / "b" / "run")[1]
    assert len(whole_rows) == len(half_rows) >= 4
    for w, h in zip(whole_rows, half_rows):  # same training: the halves split the same scores
        assert h["eval_examples"] == 51 and h["select_examples"] == 50
        np.testing.assert_allclose(
            (50 * h["select_accuracy"] + 51 * h["eval_accuracy"]) / 101, w["eval_accuracy"],
            rtol=0, atol=1e-9)
        np.testing.assert_allclose((50 * h["select_loss"] + 51 * h["eval_loss"]) / 101,
                                   w["eval_loss"], rtol=1e-6)
    best = max(half_rows, key=lambda r: (r["select_accuracy"], -r["step"]))
    assert halves["best"]["step"] == best["step"]
    assert halves["best"]["eval_accuracy"] == best["eval_accuracy"]
    from jaxpeft.data import get_task, load_split

    labels = np.array(load_split(get_task("sst2"), "validation", str(glue_dir)).labels[:101])
    majority = np.bincount(labels[held_out]).max() / len(held_out)
    assert halves["baseline"]["eval_accuracy"] == pytest.approx(majority)


@pytest.mark.slow
def test_stsb_bitfit_regression_run(tiny_model, glue_dir, tmp_path):
    results = train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path, task="stsb",
                                      method="bitfit", num_epochs=1, max_eval_samples=200))
    final = results["final"]
    assert set(final) >= {"eval_loss", "eval_pearson", "eval_spearman", "eval_combined_score"}
    assert final["eval_examples"] == 200 and np.isfinite(final["eval_loss"])
    assert results["main_metric"] == "eval_pearson"


class _Kill(Exception):
    pass


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tiny_model, glue_dir, tmp_path):
    """A killed run resumed from its checkpoint ends exactly as an uninterrupted one (packed
    training batches, dropout on)."""
    full = train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "a", lora_dropout=0.1,
                                   packing=True))

    def kill_at_7(step):
        if step == 7:
            raise _Kill()

    cfg = run_config(tiny_model, glue_dir, tmp_path / "b", lora_dropout=0.1, packing=True)
    with pytest.raises(_Kill):
        train_and_evaluate(cfg, on_step=kill_at_7)
    assert not (tmp_path / "b" / "run" / "results.json").exists()
    with pytest.raises(JaxpeftError, match="unfinished"):  # no silent reuse
        train_and_evaluate(cfg)
    resumed = train_and_evaluate(RunConfig(**{**cfg.__dict__, "resume": True}))
    assert resumed["final"] == full["final"]
    assert resumed["best"] == full["best"]
    assert resumed["train"]["steps"] == 12
    assert comparable_rows(tmp_path / "b" / "run") == comparable_rows(tmp_path / "a" / "run")


@pytest.mark.slow
def test_finished_run_is_never_clobbered(tiny_model, glue_dir, tmp_path):
    cfg = run_config(tiny_model, glue_dir, tmp_path, max_steps=2, eval_every=0, max_eval_samples=50)
    train_and_evaluate(cfg)
    before = (tmp_path / "run" / "results.json").read_bytes()
    with pytest.raises(JaxpeftError, match="holds a finished run.*--overwrite"):
        train_and_evaluate(cfg)
    with pytest.raises(JaxpeftError, match=r"different settings.*learning_rate: 0.001 -> 0.01"):
        train_and_evaluate(RunConfig(**{**cfg.__dict__, "resume": True, "learning_rate": 1e-2}))
    assert (tmp_path / "run" / "results.json").read_bytes() == before
    train_and_evaluate(RunConfig(**{**cfg.__dict__, "overwrite": True, "seed": 3}))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["seed"] == 3


@pytest.mark.slow
def test_resume_extends_a_finished_run(tiny_model, glue_dir, tmp_path, monkeypatch, capsys):
    """`--resume` with more steps continues from the last checkpoint with the schedule
    recomputed for the new total (the warmup kept), and settings that do not change training
    may differ; config.json keeps the saved settings under `history`. A shorter run or a
    changed setting is refused before the model loads."""
    import jaxpeft.setup

    short = run_config(tiny_model, glue_dir, tmp_path, max_steps=6, warmup_ratio=0.2,
                       eval_every=3, max_eval_samples=64)
    train_and_evaluate(short)
    out = tmp_path / "run"
    saved_lrs = {r["step"]: r["train_learning_rate"] for r in _train_rows(out)}
    # Refusals come from the folder's files alone: the model is never loaded.
    monkeypatch.setattr(jaxpeft.setup, "load_pretrained", lambda *a, **k: pytest.fail("loaded"))
    resume = {**short.__dict__, "resume": True}
    with pytest.raises(JaxpeftError, match=r"cannot shorten a run \(6 steps saved, 4 asked\)"):
        train_and_evaluate(RunConfig(**{**resume, "max_steps": 4}))
    with pytest.raises(JaxpeftError, match=r"different settings.*seed: 0 -> 1"):
        train_and_evaluate(RunConfig(**{**resume, "max_steps": 12, "seed": 1}))
    monkeypatch.undo()
    # The same data folder written another way, more steps, other evaluation and logging.
    relative = os.path.relpath(glue_dir)
    extended = train_and_evaluate(RunConfig(**{**resume, "max_steps": 12, "eval_every": 4,
                                               "log_every": 2, "data_dir": relative}))
    said = capsys.readouterr().out
    assert "extending" in said and "from 6 to 12 steps at step 6" in said
    assert "warmup stays 1 steps" in said and "eval_every 3 -> 4" in said
    assert extended["train"]["steps"] == 12
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["max_steps"] == 12 and config["resolved"]["total_steps"] == 12
    assert config["resolved"]["warmup_steps"] == 1
    [entry] = config["history"]
    assert entry["until_step"] == 6 and entry["run"]["max_steps"] == 6
    assert entry["changed"]["max_steps"] == [6, 12] and entry["changed"]["eval_every"] == [3, 4]
    rows = _train_rows(out)
    assert {r["step"]: r["train_learning_rate"] for r in rows if r["step"] <= 6} == saved_lrs
    assert [r["step"] for r in rows] == [4, 6, 8, 10, 12]  # every 4, then every 2
    # After step 6 the rates are those of a 12-step run with the saved warmup.
    reference = train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "ref",
                                              max_steps=12, warmup_steps=1, log_every=2,
                                              eval_every=0, max_eval_samples=64))
    assert reference["train"]["steps"] == 12
    expected = {r["step"]: r["train_learning_rate"] for r in _train_rows(tmp_path / "ref" / "run")}
    assert all(r["train_learning_rate"] == pytest.approx(expected[r["step"]], rel=1e-6)
               for r in rows if r["step"] > 6)
    # Resuming again with the same settings: finished, nothing to do, history unchanged.
    train_and_evaluate(RunConfig(**{**resume, "max_steps": 12, "eval_every": 4,
                                    "log_every": 2}))
    assert json.loads((out / "config.json").read_text())["history"] == config["history"]


@pytest.mark.slow
def test_predict_and_peft_export(tiny_model, glue_dir, tmp_path):
    data = tmp_path / "glue"
    (data / "SST-2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        os.symlink(glue_dir / "SST-2" / name, data / "SST-2" / name)
    (data / "SST-2" / "test.tsv").write_text(
        "index\tsentence\n0\ta moving , funny film\n1\tdull and lifeless\n2\tok\n")
    results = train_and_evaluate(run_config(tiny_model, data, tmp_path, max_steps=3, eval_every=0,
                                      max_eval_samples=64, do_predict=True, export_peft=True))
    lines = (tmp_path / "run" / "predict" / "SST-2.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 4
    assert [l.split("\t")[0] for l in lines[1:]] == ["0", "1", "2"]
    assert all(l.split("\t")[1] in ("0", "1") for l in lines[1:])
    assert (tmp_path / "run" / "peft" / "adapter_config.json").is_file()
    assert results["predictions"] == [str(tmp_path / "run" / "predict" / "SST-2.tsv")]


@pytest.mark.slow
def test_peft_export_names_a_base_that_resolves_elsewhere(tiny_model, glue_dir, tmp_path):
    """adapter_config.json names the base by a name that works on another machine (the
    alias's hub id, a hub-cache folder's id, a folder as given): a copy of the export moved
    elsewhere loads with `AutoPeftModelForSequenceClassification` alone and gives jaxpeft's
    logits."""
    import shutil

    import peft as hf_peft

    import jaxpeft
    from jaxpeft.models.checkpoint import MINILM_HUB_ID, portable_name
    from jaxpeft.peft import load_adapter

    assert portable_name("minilm") == MINILM_HUB_ID == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_name("roberta-base") == "roberta-base"
    snapshot = tmp_path / "hub" / "models--org--tiny-bert" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert portable_name(str(snapshot)) == "org/tiny-bert"
    train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path, max_steps=3, eval_every=0,
                                  max_eval_samples=32, export_peft=True))
    moved = tmp_path / "elsewhere" / "sst2-adapter"
    shutil.copytree(tmp_path / "run" / "peft", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)
    pre = jaxpeft.load_pretrained(tiny_model, num_labels=2)
    model, params, _ = load_adapter(tmp_path / "run" / "best", pre)
    shutil.rmtree(tmp_path / "run")
    enc = pre.tokenizer(["a gripping film", "dull and lifeless"], padding=True,
                        return_tensors="np")
    ours = np.asarray(model.apply({"params": params}, enc["input_ids"], enc["attention_mask"],
                                  enc["token_type_ids"]))
    loaded = hf_peft.AutoPeftModelForSequenceClassification.from_pretrained(moved).eval()
    with torch.no_grad():
        theirs = loaded(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_best(tiny_model, glue_dir, tmp_path):
    cfg = run_config(tiny_model, glue_dir, tmp_path, method="full", learning_rate=1e30,
               max_grad_norm=0.0, eval_every=1, log_every=1, max_eval_samples=32, num_epochs=1)
    with pytest.raises(JaxpeftError, match="non-finite training loss at step"):
        train_and_evaluate(cfg)
    assert (tmp_path / "run" / "best" / "adapter.json").is_file()
    assert any("eval_accuracy" in r for r in metric_rows(tmp_path / "run"))


@pytest.mark.parametrize("overrides,message", [
    ({"task": "sts"}, "unknown task 'sts'"),
    ({"learning_rate": -1.0}, "--learning_rate must be > 0"),
    ({"lora_rank": 0}, "LoRA rank must be a positive integer"),
    ({"lora_targets": ("query", "attn")}, "unknown LoRA target"),
    ({"data_dir": "/nonexistent/glue"}, "GLUE data folder not found"),
    ({"model": "/nonexistent/model"}, "no such model folder"),
    ({"batch_size": 0}, "--batch_size must be > 0"),
    ({"method": "bitfit", "export_peft": True}, "peft has no 'bitfit' method"),
    ({"method": "qlora"}, "--method='qlora' is not one of: full, lora, bitfit"),
    ({"num_epochs": float("inf")}, "--num_epochs must be >= 0 and finite"),
    ({"method": "prompt", "export_peft": True}, "train with --prompt_head=virtual to export"),
    ({"method": "prompt", "prompt_head": "cls"}, "--prompt_head='cls' is not one of"),
    ({"method": "prompt", "num_virtual_tokens": 0}, "--num_virtual_tokens must be a positive"),
    ({"method": "prompt", "max_seq_length": 120}, "--max_seq_length=120 + 20 virtual tokens "
                                                  "exceeds"),
    ({"mesh": "fsdp:2"}, "--mesh=fsdp:2 needs 2 devices (or a multiple); this run has 1"),
    ({"mesh": "model:2"}, "'model:2' is not axis:size with an axis of data, fsdp"),
])
def test_user_errors_one_line(tiny_model, glue_dir, tmp_path, capsys, overrides, message):
    code = train_cli(run_config(tiny_model, glue_dir, tmp_path, **overrides))
    err = capsys.readouterr().err.strip()
    assert code == 1 and message in err and "Traceback" not in err
    assert err.count("\n") == 0
    assert not (tmp_path / "run").exists()  # nothing written for a bad command


def _cli(args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "experiments.run_glue", *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_error_has_no_traceback(glue_dir, tmp_path):
    proc = _cli(["--task=sst2", "--model=/nonexistent", f"--data_dir={glue_dir}",
                 f"--output_dir={tmp_path}/x"])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: /nonexistent: no such")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_terminal_shows_jaxpeft_lines_only(tiny_model, glue_dir, tmp_path):
    """A command-line run prints its own lines: the new head once (not on --resume), warnings
    as `warning:` lines without absl's glog prefix, and a last line naming every file."""
    import re

    out = tmp_path / "run"
    args = ["--task=sst2", f"--model={tiny_model}", f"--data_dir={glue_dir}", "--max_steps=2",
            "--max_train_samples=32", "--max_eval_samples=32", "--cache_dir=",
            f"--output_dir={out}"]
    first = _cli(args)
    assert first.returncode == 0, first.stderr
    malloc = json.loads((out / "config.json").read_text())["devices"]["malloc"]
    assert malloc.startswith("keep (mallopt") or "GLIBC_TUNABLES" in os.environ, malloc
    text = first.stdout + first.stderr
    assert not re.search(r"^[IWEF]\d{4} ", text, re.M)  # no glog-style prefix anywhere
    assert "new: classifier/bias, classifier/kernel (not in the checkpoint of" in text
    assert f"wrote {out}: results.json, config.json, metrics.jsonl, best/ (adapter), " \
           "checkpoints/" in first.stdout.strip().splitlines()[-1]
    again = _cli(args + ["--resume", "--export_peft"])
    assert again.returncode == 0, again.stderr
    text = again.stdout + again.stderr
    assert "new:" not in text and not re.search(r"^[IWEF]\d{4} ", text, re.M)
    assert again.stdout.strip().splitlines()[-1] == (
        f"{out}: finished earlier; wrote peft/ (peft export)")


def test_cli_help_documents_every_flag():
    """Every RunConfig field is a flag with its help text and its default in --help."""
    from jaxpeft import config

    text = (lambda p: p.stdout + p.stderr)(_cli(["--help"]))
    blocks = {}
    for block in text.split("\n  --")[1:]:
        name = block.split(":", 1)[0].removeprefix("[no]")
        blocks[name] = " ".join(block.split())
    for name, option in config.options().items():
        assert name in blocks, name
        assert " ".join(option.help.split())[:40] in blocks[name], name
        if option.default is None:  # the help says what None means
            assert "Default per method: full 2e-05, lora 0.0005, bitfit 0.001" in blocks[name]
        else:
            assert "(default: " in blocks[name], name


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_four_devices_match_one_device(tiny_model, glue_dir, tmp_path, packing):
    """Data parallel over 4 (forced host) devices: same loss trajectory as 1 device."""
    losses = {}
    for n in (1, 4):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
               "JAX_PLATFORMS": "cpu"}
        out = tmp_path / f"d{n}"
        proc = _cli([f"--model={tiny_model}", f"--data_dir={glue_dir}", "--task=sst2",
                     "--method=lora", "--max_train_samples=64", "--batch_size=16",
                     "--max_steps=6", "--log_every=1", "--max_eval_samples=64",
                     "--eval_batch_size=32", "--max_seq_length=64", "--learning_rate=1e-3",
                     "--cache_dir=", "--progress=false", f"--packing={packing}",
                     f"--output_dir={out}"], env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        config = json.loads((out / "config.json").read_text())
        assert config["devices"]["count"] == n
        losses[n] = [r["train_loss"] for r in _train_rows(out)]
    assert len(losses[1]) == 6
    np.testing.assert_allclose(losses[4], losses[1], atol=1e-5, rtol=0)
