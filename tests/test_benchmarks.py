"""The step benchmark's per-op split (`benchmarks/split_step.py --ops`): overlapping thunks
share wall time, XLA ops are placed by their source names, and both sides' splits come out
of a real run."""

import json
import subprocess
import sys

import pytest

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
