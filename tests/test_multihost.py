"""Two real processes on this machine (gloo over localhost), launched as on two hosts:
`--multihost` with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO

# End-to-end runs of several seconds each: left out of the fast core (pytest -m "not slow").
pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model, glue_dir, out):
    return ["-m", "experiments.run_glue", "--task=sst2", "--method=lora", f"--model={model}",
            f"--data_dir={glue_dir}", "--max_train_samples=64", "--batch_size=16",
            "--max_steps=4", "--log_every=2", "--eval_every=2", "--max_eval_samples=64",
            "--max_seq_length=64", "--learning_rate=1e-3", "--cache_dir=", "--progress=false",
            f"--output_dir={out}"]


def _launch(args_per_process, timeout=600):
    port = _free_port()
    procs = []
    for pid, args in enumerate(args_per_process):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": str(len(args_per_process)), "JAX_PROCESS_ID": str(pid),
               "JAX_PLATFORMS": "cpu"}
        procs.append(subprocess.Popen([sys.executable, *args, "--multihost"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=timeout), p.stdout.read(), p.stderr.read()) for p in procs]


def _rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tiny_model, glue_dir, tmp_path):
    one = subprocess.run([sys.executable, *_args(tiny_model, glue_dir, tmp_path / "one")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    runs = _launch([_args(tiny_model, glue_dir, tmp_path / "two")] * 2)
    for code, _, err in runs:
        assert code == 0, err[-2000:]
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "eval_loss", "eval_accuracy"):
            if key in ra:
                np.testing.assert_allclose(rb[key], ra[key], atol=1e-5, err_msg=key)
        if "eval_examples" in ra:
            assert rb["eval_examples"] == ra["eval_examples"] == 64  # each example once
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["best"]["eval_accuracy"] == pytest.approx(
        json.loads((tmp_path / "one" / "results.json").read_text())["best"]["eval_accuracy"])


def test_user_error_on_one_process_stops_both_with_its_message(tiny_model, glue_dir,
                                                               tmp_path):
    (tmp_path / "blocked").write_text("a file where process 1's folder should be")
    runs = _launch([_args(tiny_model, glue_dir, tmp_path / "ok"),
                    _args(tiny_model, glue_dir, tmp_path / "blocked")], timeout=300)
    for code, _, err in runs:
        assert code == 1
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: process 1: ") and "is a file, not a folder" in last
    assert not (tmp_path / "ok").exists()  # nothing written by process 0 either
