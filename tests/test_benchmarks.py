"""The step benchmark's per-op split (`benchmarks/split_step.py --ops`): overlapping thunks
share wall time, XLA ops are placed by their source names, and both sides' splits come out
of a real run; the step benchmark's variants (`bench_train`: runtime settings and config
values in a --methods entry, timed in turn with --interleave beside one peer run each); the
LayerNorm benchmark times its four cases on both sides."""

import json
import subprocess
import sys

import pytest

from benchmarks.bench_train import peer_spec, spec_xla_options, split_spec
from benchmarks.split_step import CATEGORIES, jax_category, split_overlaps
from tests.helpers import REPO

LAYER = "jit(train_step)/jvp(SequenceClassifier)/bert/encoder/layer_0"
BACK = "jit(train_step)/transpose(jvp(SequenceClassifier))/bert/encoder/layer_0"


def test_overlapping_intervals_share_their_wall_time():
    intervals = [(0, 10, "a"), (5, 15, "b"), (20, 30, "c"), (22, 24, "d")]
    shares = split_overlaps(intervals)
    assert shares == [7.5, 7.5, 9.0, 1.0]
    assert sum(shares) == 15 + 10  # the busy time: [0, 15] and [20, 30]


@pytest.mark.parametrize("ops, expected", [
    ([("fusion", f"{LAYER}/intermediate/dense/add"),
      ("dot", f"{LAYER}/intermediate/dense/dot_general")], ("FFN matmuls", "forward")),
    ([("fusion", f"{LAYER}/intermediate/erf")], ("GELU (and the FFN's bias)", "forward")),
    ([("dot", f"{BACK}/attention/self/key/dot_general")],
     ("attention projections", "backward")),
    ([("dot", f"{BACK}/attention/self/bnth,bnsh->bnts/dot_general")],
     ("attention core", "backward")),
    # dropout bits inlined into the residual add: threefry's xor and shifts
    ([("add", f"{LAYER}/output/add"), ("xor", f"{LAYER}/output/xor"),
      ("shift-right-logical", f"{LAYER}/output/shift_right_logical")],
     ("dropout (masks, masking)", "forward")),
    ([("reduce", f"{LAYER}/output/LayerNorm/reduce_sum")],
     ("LayerNorm (and residual adds)", "forward")),
    ([("multiply", "jit(train_step)/mul")], ("optimizer (clip, AdamW)", "optimizer")),
])
def test_xla_ops_are_placed_by_their_source(ops, expected):
    assert jax_category(ops) == expected


@pytest.mark.slow
def test_both_sides_split_a_real_step(tiny_model, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "split.json"  # 48 tokens: not the hidden (32) nor FFN (64) width
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.split_step", "--random_weights",
         f"--config_json={tiny_model / 'config.json'}", "--shapes=3x16", "--steps=1",
         "--ops", f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "per op" in proc.stdout
    stages = json.loads(out.read_text())["stages_s"]
    for side in ("jax:3x16", "torch:3x16"):
        ops = stages[side]["ops"]
        for direction, category in (("forward", "FFN matmuls"),
                                    ("forward", "attention projections"),
                                    ("forward", "LayerNorm (and residual adds)"),
                                    ("backward", "FFN matmuls"),
                                    ("backward", "attention core"),
                                    ("optimizer", "optimizer (clip, AdamW)")):
            assert ops[direction][category] > 0, (side, direction, category)
        assert set(ops["forward"]) == set(CATEGORIES)


def test_a_methods_entry_splits_into_method_runtime_and_config():
    assert split_spec("lora:lora_rank=4:fused_qkv=true:attention_probs_dropout_prob=0"
                      ":attention_implementation=cudnn") == (
        "lora:lora_rank=4", {"fused_qkv": True, "attention_implementation": "cudnn"},
        {"attention_probs_dropout_prob": 0.0})
    assert peer_spec("full:sorted_word_grads=true:attention_probs_dropout_prob=0") == \
        "full:attention_probs_dropout_prob=0"
    spec = "full:xla_cpu_experimental_ynn_fusion_type=A+B:xla_cpu_use_onednn=true:fused_qkv=true"
    assert split_spec(spec) == ("full", {"fused_qkv": True}, {})
    assert peer_spec(spec) == "full"
    assert spec_xla_options(spec) == {"xla_cpu_experimental_ynn_fusion_type": "A,B",
                                      "xla_cpu_use_onednn": True}


@pytest.mark.slow
def test_step_variants_timed_in_turn_beside_one_peer_each(tiny_model, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    methods = ["full", "full:fused_qkv=true:onehot_small_tables=true:sorted_word_grads=true",
               "full:attention_probs_dropout_prob=0"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_train", "--random_weights",
         f"--config_json={tiny_model / 'config.json'}", "--shapes=3x16", "--steps=2",
         "--interleave", f"--methods={','.join(methods)}", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    mine = {r["method"]: r for r in rows if r["impl"] == "jaxpeft"}
    peers = {r["method"]: r for r in rows if r["impl"] == "torch+peft"}
    assert set(mine) == set(peers) == set(methods)
    # Two peer runs (full, and full without attention dropout), not three.
    assert len({r["step_s"] for r in peers.values()}) == 2
    assert peers[methods[0]]["step_s"] == peers[methods[1]]["step_s"]
    assert all(r["step_s"] > 0 and r["trainable"] > 0 for r in rows)
    assert mine[methods[0]]["trainable"] == mine[methods[1]]["trainable"]


@pytest.mark.slow
def test_the_layernorm_benchmark_times_every_case_on_both_sides():
    pytest.importorskip("torch")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_layernorm", "--shape=2x8x16", "--runs=2"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("forward")]
    assert len(rows) == 4
    for row in rows:  # the case's name, then jaxpeft's and the peer's ms
        assert float(row[-2]) > 0 and float(row[-1]) > 0, row
    bad = subprocess.run([sys.executable, "-m", "benchmarks.bench_layernorm", "--shape=2x8"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "expected BxSxH" in bad.stderr
