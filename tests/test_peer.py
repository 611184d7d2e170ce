"""benchmarks/torch_run_glue.py, the PyTorch peer, at the standard recipe: its run folder
reads in jaxpeft's report beside jaxpeft's own runs, with the same trainable count, the same
dev halves and the same trivial baseline."""

import json
import subprocess
import sys

import pytest

from jaxpeft.plots import load_runs, summarize
from jaxpeft.run import train_and_evaluate
from tests.helpers import REPO, run_config

pytest.importorskip("torch")
pytest.importorskip("peft")

pytestmark = pytest.mark.slow


def test_peer_run_folder_sits_beside_jaxpeft_runs(tiny_model, glue_dir, tmp_path):
    root = tmp_path / "runs"
    peer = subprocess.run(
        [sys.executable, "-m", "benchmarks.torch_run_glue", "--task=rte", "--method=lora",
         f"--model={tiny_model}", f"--data_dir={glue_dir}", "--max_steps=0",
         "--num_epochs=1", "--select_on=dev_half", "--max_seq_length=64",
         "--learning_rate=1e-3", f"--output_dir={root / 'peer'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert peer.returncode == 0, peer.stderr[-2000:]
    ours = train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path, task="rte",
                                         max_train_samples=0, num_epochs=1, eval_every=0,
                                         batch_size=32,
                                         max_seq_length=64, select_on="dev_half",
                                         output_dir=str(root / "ours")))
    theirs = json.loads((root / "peer" / "results.json").read_text())
    assert theirs["params"]["trainable"] == ours["params"]["trainable"]
    assert theirs["baseline"] == ours["baseline"]  # same held-out half, same constant
    assert theirs["selected_by"] == ours["selected_by"] == "select_accuracy"
    assert theirs["train"]["steps"] == ours["train"]["steps"] == 78  # 2,490 / 32, one epoch
    rows = {r["method"]: r for r in summarize(load_runs(root))}
    assert set(rows) == {"lora", "lora-torch"} and rows["lora-torch"]["chosen"]
    assert rows["lora-torch"]["trainable"] == rows["lora"]["trainable"]
