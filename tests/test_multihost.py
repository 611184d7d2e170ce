"""Two real processes on this machine (gloo over localhost), launched as on two hosts:
`--multihost` with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import REPO

# End-to-end runs of several seconds each: left out of the fast core (pytest -m "not slow").
pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model, glue_dir, out, method="lora"):
    return ["-m", "experiments.run_glue", "--task=sst2", f"--method={method}", f"--model={model}",
            f"--data_dir={glue_dir}", "--max_train_samples=64", "--batch_size=16",
            "--max_steps=4", "--log_every=2", "--eval_every=2", "--max_eval_samples=64",
            "--max_seq_length=64", "--learning_rate=1e-3", "--cache_dir=", "--progress=false",
            f"--output_dir={out}"]


def _start(args_per_process, ids=None):
    port = _free_port()
    procs = []
    for pid, args in zip(ids or range(len(args_per_process)), args_per_process):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": str(len(args_per_process)), "JAX_PROCESS_ID": str(pid),
               "JAX_PLATFORMS": "cpu"}
        procs.append(subprocess.Popen([sys.executable, *args, "--multihost"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _launch(args_per_process, timeout=600, ids=None):
    procs = _start(args_per_process, ids)
    return [(p.wait(timeout=timeout), p.stdout.read(), p.stderr.read()) for p in procs]


def _rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,mesh,extra", [
    ("lora", "", []),
    # Parameters sharded over the two processes: the best adapter (every leaf, for full
    # fine-tuning) and the merged export gather them.
    ("full", "fsdp:2", []),
    ("lora", "fsdp:2", ["--export_merged"])])
def test_two_processes_match_one(tiny_model, glue_dir, tmp_path, method, mesh, extra):
    args = _args(tiny_model, glue_dir, tmp_path / "one", method) + extra
    one = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    args = _args(tiny_model, glue_dir, tmp_path / "two", method) + extra + [f"--mesh={mesh}"]
    runs = _launch([args] * 2)
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
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["devices"]["mesh"] == ("data:1,fsdp:2" if mesh else "data:2,fsdp:1")
    for name in ("best/adapter.safetensors",) + (("merged/model.safetensors",) if extra else ()):
        one_w, two_w = (load_file(tmp_path / run / name) for run in ("one", "two"))
        assert one_w.keys() == two_w.keys()
        for k in one_w:
            np.testing.assert_allclose(two_w[k], one_w[k], atol=1e-5, err_msg=f"{name} {k}")


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


def test_same_process_id_twice_fails_fast_with_one_line(tiny_model, glue_dir, tmp_path):
    """Two processes both given JAX_PROCESS_ID=0: the second finds the coordinator's port
    taken, the first waits --multihost_timeout for the process that never comes; each ends
    with one jaxpeft line and no abort dump."""
    args = _args(tiny_model, glue_dir, tmp_path / "run") + ["--multihost_timeout=10"]
    start = time.monotonic()
    runs = _launch([args, args], ids=[0, 0], timeout=300)
    assert time.monotonic() - start < 90
    lasts = sorted(err.strip().splitlines()[-1] for _, _, err in runs)
    assert all(code == 1 for code, _, _ in runs), lasts
    # Started together, both may find the port free: then the service itself reports the
    # duplicate to one of them.
    assert any("another process 0 runs there (two processes with JAX_PROCESS_ID=0?)" in l
               or "another process joined with the same JAX_PROCESS_ID" in l
               for l in lasts), lasts
    assert any("not every one of the JAX_NUM_PROCESSES=2 processes joined within "
               "--multihost_timeout" in l for l in lasts), lasts
    for _, _, err in runs:
        assert "Check failure stack trace" not in err and not re.search(r"^F\d{4} ", err, re.M)


def test_a_peer_killed_mid_run_stops_the_other_with_one_line(tiny_model, glue_dir, tmp_path):
    """SIGKILL to one process mid-training: the other stops within --multihost_timeout and
    says so in one line naming the checkpoint to resume from."""
    out = tmp_path / "run"
    args = _args(tiny_model, glue_dir, out) + ["--multihost_timeout=10", "--max_steps=400",
                                               "--checkpoint_every=2", "--eval_every=0"]
    procs = _start([args, args])
    deadline = time.monotonic() + 300
    while not any(p.name.isdigit() for p in (out / "checkpoints").glob("*")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code = procs[0].wait(timeout=180)
    assert time.monotonic() - killed < 60
    err = procs[0].stderr.read()
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: process 0: a peer process died or stopped "
                                         "answering"), err[-3000:]
    assert re.search(r"continue all processes with --resume \(the last checkpoint is step "
                     r"\d+\)", last)
    assert "Check failure stack trace" not in err and not re.search(r"^F\d{4} ", err, re.M)
    procs[1].wait(timeout=60)


def test_a_process_id_out_of_range_is_refused_before_joining(monkeypatch):
    from jaxpeft import distributed
    from jaxpeft.errors import JaxpeftError

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", f"127.0.0.1:{_free_port()}")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(JaxpeftError, match=r"JAX_PROCESS_ID=2 is not one of 0..1 "
                                           r"\(JAX_NUM_PROCESSES=2\)"):
        distributed.initialize(True, timeout_s=5)
