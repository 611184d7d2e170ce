"""The `fsdp` mesh axis: which leaves shard where, and the same numbers on every mesh.

The mesh runs use 8 host devices in a child process (`tests/sharded_runs.py`): JAX fixes
the device count when it starts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpeft.distributed import leaf_spec, mesh_shape, parse_mesh
from jaxpeft.errors import JaxpeftError
from tests.helpers import REPO, metric_rows, save_tiny_bert
from tests.sharded_runs import STEPS

MESHES = ("data:8", "fsdp:8", "data:2,fsdp:4")


@pytest.mark.parametrize("text,devices,shape", [
    ("", 8, (8, 1)), ("fsdp:8", 8, (1, 8)), ("data:2,fsdp:4", 8, (2, 4)), ("fsdp:4", 8, (2, 4)),
    ("data:2", 8, (2, 4)), (" data:8 ", 8, (8, 1)), ("", 1, (1, 1))])
def test_mesh_shapes(text, devices, shape):
    assert mesh_shape(text, devices) == shape


@pytest.mark.parametrize("text,message", [
    ("fsdp=8", "not axis:size"), ("model:2", "not axis:size"), ("fsdp:0", "not axis:size"),
    ("fsdp:2,fsdp:4", "given twice"), ("data:2,fsdp:2", "needs 4 devices; this run has 8"),
    ("fsdp:3", r"needs 3 devices \(or a multiple\); this run has 8")])
def test_bad_meshes_are_one_message(text, message):
    with pytest.raises(JaxpeftError, match=message):
        mesh_shape(text, 8)


def test_parse_mesh():
    assert parse_mesh("data:2,fsdp:4") == {"data": 2, "fsdp": 4}
    assert parse_mesh("") == {}


def test_leaf_specs_split_the_largest_divisible_dimension():
    assert leaf_spec((384, 1536), 4) == P(None, "fsdp")
    assert leaf_spec((1536, 384), 4) == P("fsdp", None)
    assert leaf_spec((30522, 384), 8) == P(None, "fsdp")  # 30522 is not a multiple of 8
    assert leaf_spec((768, 768), 8) == P("fsdp", None)  # the first of equals
    assert leaf_spec((384,), 4) == P()  # small: replicated
    assert leaf_spec((384, 8), 4) == P()  # a LoRA factor: replicated
    assert leaf_spec((385, 387), 4) == P()  # nothing divides
    assert leaf_spec((1536, 384), 1) == P()
    assert leaf_spec((64,), 8, min_elements=1) == P("fsdp",)


@pytest.fixture(scope="module")
def wide_tiny_model(tmp_path_factory, minilm_dir):
    """A 2-layer hidden-128 BERT: its dense kernels (128x128, 128x512) are big enough to
    shard, so the fsdp meshes split every layer, not only the embeddings."""
    return save_tiny_bert(tmp_path_factory.mktemp("wide_tiny_bert"), minilm_dir,
                          hidden_size=128, intermediate_size=512)


def _launch(devices, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    done = subprocess.run([sys.executable, "-m", "tests.sharded_runs", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _run_dir(out, method, mesh):
    return out / f"{method}-{mesh.replace(':', '').replace(',', '_') or 'default'}" / "run"


def _compare(a, b):
    rows_a, rows_b = metric_rows(a), metric_rows(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("train_loss", "train_grad_norm", "eval_loss", "eval_accuracy"):
            if key in ra:
                np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-5,
                                           err_msg=f"{b} {key} step {ra['step']}")


@pytest.mark.slow
def test_every_mesh_gives_one_devices_numbers(wide_tiny_model, glue_dir, tmp_path):
    """Full fine-tuning and LoRA, 10 steps with dropout: one device against data:8, fsdp:8
    and data:2,fsdp:4 on 8 devices; per-device parameter and optimizer bytes fall as 1/fsdp
    for full fine-tuning. A fsdp:8 run killed at step 7 and resumed on data:2,fsdp:4
    continues as the uninterrupted runs do."""
    _launch(1, "steps", wide_tiny_model, glue_dir, tmp_path, "")
    _launch(8, "steps", wide_tiny_model, glue_dir, tmp_path, *MESHES)
    for method in ("full", "lora"):
        one = _run_dir(tmp_path, method, "")
        assert len(metric_rows(one)) == STEPS + 1  # the training rows and the evaluation
        for mesh in MESHES:
            _compare(one, _run_dir(tmp_path, method, mesh))
    held = {}
    for mesh in MESHES:
        config = json.loads((_run_dir(tmp_path, "full", mesh) / "config.json").read_text())
        assert config["devices"]["mesh"] == ",".join(f"{k}:{v}" for k, v in zip(
            ("data", "fsdp"), mesh_shape(mesh, 8)))
        mem = config["devices"]["bytes_per_device"]
        held[mesh] = mem["params"] + mem["optimizer_state"]
    # Only the small leaves (biases, LayerNorm: 0.3 % here) stay whole on every device.
    assert held["fsdp:8"] < held["data:8"] / 8 * 1.05
    assert held["data:2,fsdp:4"] < held["data:8"] / 4 * 1.05

    resumed = tmp_path / "resumed"
    done = _launch(8, "resume", wide_tiny_model, glue_dir, resumed, "fsdp:8", "data:2,fsdp:4")
    assert "Resuming" in done.stdout
    _compare(_run_dir(tmp_path, "full", ""), _run_dir(resumed, "full", "fsdp:8"))
    config = json.loads((_run_dir(resumed, "full", "fsdp:8") / "config.json").read_text())
    assert config["devices"]["mesh"] == "data:2,fsdp:4"
    assert config["history"][0]["changed"]["mesh"] == ["fsdp:8", "data:2,fsdp:4"]
