"""Sequence packing: packed per-example logits equal unpacked ones; evaluation stays exact."""

import numpy as np
import pytest

import jaxpeft
from jaxpeft.data.batching import bucket_lengths, make_batch, make_packed_batch, pack_rows
from jaxpeft.train import forward
from tests.helpers import random_encoded, save_torch_model, tiny_hf_config, tiny_torch_model

transformers = pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.parametrize("model_type,pairs", [
    ("bert", False), ("bert", True), ("roberta", False), ("roberta", True),
    ("xlm-roberta", True), ("electra", True), ("distilbert", True), ("deberta-v2", True),
    ("modernbert", True)])
def test_packed_logits_equal_unpacked(tmp_path, model_type, pairs):
    tiny_torch_model(model_type, tmp_path, num_labels=3)
    pre = jaxpeft.load_pretrained(tmp_path, tokenizer=False)
    pad = pre.config.pad_token_id
    offset = pad + 1 if model_type in ("roberta", "xlm-roberta") else 0
    assert pre.config.position_offset == offset
    enc = random_encoded(model_type, pairs=pairs)
    rows = np.arange(len(enc))
    batch_size = 16  # 13 real examples + 3 padding slots
    plain = make_batch(enc, rows, batch_size, bucket_lengths(64), pad)
    packed = make_packed_batch(enc, rows, batch_size, 64, pad, position_offset=offset)
    assert packed["input_ids"].shape[0] < batch_size  # several examples share a row
    assert packed["segment_ids"].max() > 1
    out_plain = forward(pre.model, pre.params, plain, deterministic=True)
    out_packed = forward(pre.model, pre.params, packed, deterministic=True)
    real = plain["weights"] > 0
    np.testing.assert_array_equal(packed["index"], plain["index"])
    np.testing.assert_allclose(np.asarray(out_packed)[real], np.asarray(out_plain)[real],
                               atol=1e-5, rtol=0)


def test_pack_rows_fits_and_keeps_everyone():
    lengths = np.array([60, 5, 5, 30, 64, 10, 33, 2])
    packing = pack_rows(lengths, 64)
    assert sorted(i for row in packing for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 64 for row in packing)
    assert len(packing) == 4  # 209 tokens need at least 4 rows of 64


def test_packed_batch_layout():
    enc = random_encoded("roberta", n=5, max_len=10)
    b = make_packed_batch(enc, np.arange(5), 8, 32, pad_id=1, position_offset=2, row_multiple=2)
    assert b["input_ids"].shape[0] % 2 == 0
    for e in range(5):
        r, p = b["example_row"][e], b["example_pos"][e]
        n = enc.lengths[e]
        np.testing.assert_array_equal(b["input_ids"][r, p:p + n],
                                      enc.ids[enc.offsets[e]:enc.offsets[e + 1]])
        np.testing.assert_array_equal(b["position_ids"][r, p:p + n], np.arange(n) + 2)
        assert len(set(b["segment_ids"][r, p:p + n])) == 1 and b["segment_ids"][r, p] > 0
    assert b["weights"].tolist() == [1] * 5 + [0] * 3
    assert (b["segment_ids"] == 0).sum() == b["input_ids"].size - enc.lengths.sum()


def test_packed_eval_batches_score_everyone_once_in_one_shape():
    from jaxpeft.data.batching import EvalPacking, Packing, packed_eval_batches

    enc = random_encoded("roberta", n=200, max_len=50, seed=3)
    shape = EvalPacking.for_split(enc, Packing(64, position_offset=2, row_multiple=2), 16)
    assert shape.rows % 2 == 0 and shape.max_examples == 64
    seen, shapes = [], set()
    for b in packed_eval_batches(enc, shape, pad_id=1):
        shapes.add((b["input_ids"].shape, b["index"].shape))
        real = b["index"] >= 0
        assert real.sum() <= shape.max_examples
        assert (b["weights"] > 0).tolist() == real.tolist()
        for e in np.flatnonzero(real):
            i, r, p = b["index"][e], b["example_row"][e], b["example_pos"][e]
            n = enc.lengths[i]
            np.testing.assert_array_equal(b["input_ids"][r, p:p + n],
                                          enc.ids[enc.offsets[i]:enc.offsets[i + 1]])
            np.testing.assert_array_equal(b["position_ids"][r, p:p + n], np.arange(n) + 2)
        seen.extend(b["index"][real].tolist())
    assert sorted(seen) == list(range(200))
    assert shapes == {((shape.rows, 64), (64,))}  # one compilation per split


def test_packed_eval_batches_close_at_max_examples():
    from jaxpeft.data.batching import EvalPacking, Packing, packed_eval_batches

    enc = random_encoded("bert", n=50, max_len=5, seed=1)  # short: many fit a row
    shape = EvalPacking(Packing(64), rows=4, max_examples=8)
    counts = [int((b["index"] >= 0).sum()) for b in packed_eval_batches(enc, shape, 0)]
    assert sum(counts) == 50 and max(counts) == 8
    with pytest.raises(ValueError, match="exceeds rows"):
        next(packed_eval_batches(random_encoded("bert", n=3, max_len=90, seed=0),
                                 EvalPacking(Packing(64), 2, 8), 0))


@pytest.mark.slow
@pytest.mark.parametrize("model_type,method", [("bert", "lora"), ("roberta", "lora"),
                                                ("bert", "prompt"), ("roberta", "prompt"),
                                                ("roberta", "prefix")])
def test_packed_evaluation_equals_bucketed(tmp_path, model_type, method):
    """The Evaluator's packed path gives the bucketed path's predictions and losses
    (regression and 3-class heads; with a soft prompt's slots reserved per example)."""
    import jax

    from jaxpeft.data.batching import Packing
    from jaxpeft.data.tasks import get_task
    from jaxpeft.distributed import Sharder
    from jaxpeft.evaluation import Evaluator
    from jaxpeft.peft import make_peft
    from jaxpeft.train import make_eval_step

    cls = {"bert": transformers.BertForSequenceClassification,
           "roberta": transformers.RobertaForSequenceClassification}[model_type]
    for task_name in ("stsb", "mnli"):
        task = get_task(task_name)
        save_torch_model(cls, tiny_hf_config(model_type, num_labels=task.num_labels),
                         tmp_path / task_name)
        pre = jaxpeft.load_pretrained(tmp_path / task_name, tokenizer=False)
        peft = make_peft(method)
        model, params = peft.init(pre.model, pre.params, jax.random.key(0))
        enc = random_encoded(model_type, n=90, pairs=True, max_len=40, seed=5)
        rs = np.random.default_rng(0)
        enc.labels = (rs.uniform(0, 5, 90).astype(np.float32) if task.is_regression
                      else rs.integers(0, 3, 90).astype(np.int32))
        pad, offset = pre.config.pad_token_id, pre.config.position_offset
        # Rows of 48 (+ the prompt's 20 slots) stay within the tiny model's 72 positions.
        common = (make_eval_step(model), task, 16, bucket_lengths(48), pad, Sharder())
        bucketed = Evaluator(*common)
        packed = Evaluator(*common, packing=Packing(48 + peft.virtual_tokens, offset),
                           virtual_tokens=peft.virtual_tokens)
        p1, l1 = bucketed.score(params, enc)
        p2, l2 = packed.score(params, enc)
        if task.is_regression:
            np.testing.assert_allclose(p2, p1, atol=1e-5, rtol=0)
        else:
            np.testing.assert_array_equal(p2, p1)
        np.testing.assert_allclose(l2, l1, atol=1e-5, rtol=0)
