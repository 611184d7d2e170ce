"""Soft prompt tuning beyond the peft comparisons (tests/test_peft_family.py): the virtual
slots in the data, where the head reads, packed rows, and what the method refuses."""

import jax
import numpy as np
import pytest

import jaxpeft
from jaxpeft.data.batching import add_virtual_slots, bucket_lengths, make_batch, make_packed_batch
from jaxpeft.errors import JaxpeftError
from jaxpeft.peft import make_peft
from jaxpeft.peft.prompt import PromptConfig
from jaxpeft.train import forward
from tests.helpers import random_batch, random_encoded, save_torch_model, tiny_hf_config

transformers = pytest.importorskip("transformers")


def test_add_virtual_slots_puts_slots_before_every_example():
    enc = random_encoded("bert", n=3, max_len=6)
    out = add_virtual_slots(enc, 2)
    np.testing.assert_array_equal(out.lengths, enc.lengths + 2)
    for i in range(3):
        seq = out.ids[out.offsets[i]:out.offsets[i + 1]]
        np.testing.assert_array_equal(seq[:2], [-1, -2])
        np.testing.assert_array_equal(seq[2:], enc.ids[enc.offsets[i]:enc.offsets[i + 1]])
        types = out.type_ids[out.offsets[i]:out.offsets[i + 1]]
        np.testing.assert_array_equal(types[2:], enc.type_ids[enc.offsets[i]:enc.offsets[i + 1]])
        assert not types[:2].any()
    assert add_virtual_slots(enc, 0) is enc


@pytest.fixture(scope="module", params=["bert", "roberta"])
def tiny(request, tmp_path_factory):
    cls = {"bert": transformers.BertForSequenceClassification,
           "roberta": transformers.RobertaForSequenceClassification}[request.param]
    d = tmp_path_factory.mktemp(request.param)
    save_torch_model(cls, tiny_hf_config(request.param, num_labels=3), d)
    return jaxpeft.load_pretrained(d, tokenizer=False)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["real", "virtual"])
def test_packed_prompt_logits_equal_unpacked(tiny, head):
    """Unpacked rows get the prompt from the model; packed rows reserve its slots per
    example: the per-example logits agree for both head positions."""
    n = 5
    peft = make_peft("prompt", PromptConfig(num_virtual_tokens=n, head=head))
    model, params = peft.init(tiny.model, tiny.params, jax.random.key(0))
    pad = tiny.config.pad_token_id
    offset = pad + 1 if tiny.config.model_type == "roberta" else 0
    enc = random_encoded(tiny.config.model_type, n=11, pairs=True, max_len=30)
    rows = np.arange(len(enc))
    plain = make_batch(enc, rows, 16, bucket_lengths(32), pad)
    packed = make_packed_batch(add_virtual_slots(enc, n), rows, 16, 32 + n, pad,
                               position_offset=offset)
    assert packed["segment_ids"].max() > 1
    real = plain["weights"] > 0
    out_plain = np.asarray(forward(model, params, plain, deterministic=True))[real]
    out_packed = np.asarray(forward(model, params, packed, deterministic=True))[real]
    np.testing.assert_allclose(out_packed, out_plain, atol=1e-5, rtol=0)
    base = np.asarray(forward(tiny.model, tiny.params, plain, deterministic=True))[real]
    assert np.abs(out_plain - base).max() > 1e-3  # the prompt really is in the input


def test_real_head_reads_the_examples_own_first_token(tiny):
    """--prompt_head=real: the head sees the hidden state of [CLS]/<s>, after the prompt."""
    n = 4
    peft = make_peft("prompt", PromptConfig(num_virtual_tokens=n, head="real"))
    model, params = peft.init(tiny.model, tiny.params, jax.random.key(0))
    ids, mask, types = random_batch(tiny.config.model_type)
    logits, hidden = model.apply({"params": params}, ids, mask, types, deterministic=True,
                                 output_hidden_states=True)
    assert hidden.shape[1] == ids.shape[1] + n  # the prompt's slots are in the sequence
    virtual = make_peft("prompt", PromptConfig(num_virtual_tokens=n, head="virtual"))
    logits_v = virtual.attach(tiny.model).apply({"params": params}, ids, mask, types,
                                                deterministic=True)
    # Same sequence, another read position: the heads see hidden[:, n] and hidden[:, 0].
    first = {"real": hidden[:, n], "virtual": hidden[:, 0]}
    for name, out in (("real", logits), ("virtual", logits_v)):
        np.testing.assert_allclose(np.asarray(out), _head(tiny, params, first[name]),
                                   atol=1e-5, rtol=0, err_msg=name)


def _head(pre, params, first):
    """The classification head of BERT or RoBERTa applied by hand to first tokens."""
    first = np.asarray(first, np.float64)
    c = params["classifier"]
    if pre.config.model_type == "bert":
        p = params["bert"]["pooler"]["dense"]
        pooled = np.tanh(first @ np.asarray(p["kernel"]) + np.asarray(p["bias"]))
        return pooled @ np.asarray(c["kernel"]) + np.asarray(c["bias"])
    h = np.tanh(first @ np.asarray(c["dense"]["kernel"]) + np.asarray(c["dense"]["bias"]))
    return h @ np.asarray(c["out_proj"]["kernel"]) + np.asarray(c["out_proj"]["bias"])


def test_prompt_starts_from_vocabulary_rows_and_refuses_merge(tiny):
    peft = make_peft("prompt", PromptConfig(num_virtual_tokens=6))
    model, params = peft.init(tiny.model, tiny.params, jax.random.key(0))
    words = np.asarray(params[tiny.config.model_type]["embeddings"]["word_embeddings"]
                       ["embedding"])
    prompt = np.asarray(params["prompt_embeddings"])
    assert prompt.shape == (6, tiny.config.hidden_size)
    assert all((words == row).all(axis=1).any() for row in prompt)
    assert peft.count(params).trainable == 6 * tiny.config.hidden_size + sum(
        x.size for x in jax.tree.leaves(params["classifier"]))
    with pytest.raises(JaxpeftError, match="no weights to merge"):
        peft.merge(model, params)


def test_prompt_tree_without_the_method_is_an_error(tiny):
    """A tree with a soft prompt applied to a model without its hook must not silently run
    the base model."""
    _, params = make_peft("prompt").init(tiny.model, tiny.params, jax.random.key(0))
    with pytest.raises(JaxpeftError,
                       match=r"the root of the tree: parameters \[.prompt_embeddings.\]"):
        tiny.model.apply({"params": params}, *random_batch(tiny.config.model_type))
