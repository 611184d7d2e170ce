"""Prefix tuning against peft's PREFIX_TUNING: counts, the export peft loads with exactly its
own keys, logits and gradients equal to transformers' attention over peft's key-value cache
(peft's own sequence-classification forward refuses these models under transformers 5),
the import back, packed rows, and what the method refuses."""

import jax
import numpy as np
import pytest

import jaxpeft
from jaxpeft.errors import JaxpeftError
from jaxpeft.peft import export_peft, make_peft
from jaxpeft.peft.hf_export import peft_tensors
from jaxpeft.peft.hf_import import import_peft
from jaxpeft.peft.prefix import PrefixConfig
from tests.helpers import (loss_and_grads, moved_off_start, random_batch, random_encoded, save_torch_model,
                           stsb_batch, tiny_hf_config)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")


def _trained(pre, options, scale=0.05):
    return moved_off_start(pre, make_peft("prefix", options), scale)


def _reference(peft_model, args, n, pad=None):
    """Logits of a loaded peft PREFIX_TUNING model computed as its forward intends: the
    backbone with peft's cache (`get_prompt`) and the mask opened for it, positions those of
    the input, then the head."""
    base = peft_model.base_model
    ids, mask, types = (torch.tensor(np.asarray(a)) for a in args)
    full = torch.cat([torch.ones(ids.shape[0], n, dtype=mask.dtype), mask], dim=1)
    if pad is None:
        pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    else:  # RoBERTa counts non-pad tokens from pad + 1
        real = (ids != pad).long()
        pos = torch.cumsum(real, dim=1) * real + pad
    kind = base.config.model_type
    out = getattr(base, kind)(input_ids=ids, attention_mask=full, token_type_ids=types,
                              position_ids=pos, cache=peft_model.get_prompt(ids.shape[0]))
    if kind == "bert":
        return base.classifier(base.dropout(out.pooler_output))
    return base.classifier(out.last_hidden_state)


def test_counts_equal_peft(minilm, minilm_dir):
    """20 virtual tokens × 6 layers × (key + value) × 384, and the head."""
    peft, _, params = _trained(minilm, PrefixConfig(num_virtual_tokens=20))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir,
                                                                            num_labels=2)
    theirs = hf_peft.get_peft_model(model, hf_peft.PrefixTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=20)).get_nb_trainable_parameters()[0]
    assert peft.count(params).trainable == theirs == 20 * 6 * 2 * 384 + 770


def _check_export(pre, base_dir, options, args, tmp_path, pad=None):
    peft, model, params = _trained(pre, options)
    export_peft(tmp_path, peft, params, base_model=str(base_dir), config=pre.config)
    from safetensors.numpy import load_file
    config = hf_peft.PeftConfig.from_pretrained(tmp_path)
    fresh = hf_peft.get_peft_model(
        transformers.AutoModelForSequenceClassification.from_pretrained(base_dir), config)
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == set(
        hf_peft.get_peft_model_state_dict(fresh))
    tm = hf_peft.PeftModel.from_pretrained(
        transformers.AutoModelForSequenceClassification.from_pretrained(base_dir),
        tmp_path).eval()
    with torch.no_grad():
        theirs = _reference(tm, args, options.num_virtual_tokens, pad).numpy()
    ours = np.asarray(model.apply({"params": params}, *args, deterministic=True))
    base = np.asarray(pre.model.apply({"params": pre.params}, *args, deterministic=True))
    assert np.abs(ours - base).max() > 1e-3  # the prefix really changes the output
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    # And back: the import reproduces the same logits.
    model2, params2, peft2 = import_peft(tmp_path, pre)
    assert peft2.name == "prefix" and peft2.options.projection == 0
    np.testing.assert_allclose(np.asarray(model2.apply({"params": params2}, *args,
                                                       deterministic=True)), ours, atol=1e-5)


@pytest.mark.parametrize("projection", [0, 64])
def test_export_loads_in_peft_with_same_logits_minilm(minilm, minilm_dir, sst2_batch,
                                                      projection, tmp_path):
    """The reparameterised prefix exports the table it computes, as peft saves one."""
    _check_export(minilm, minilm_dir, PrefixConfig(num_virtual_tokens=10,
                                                   projection=projection),
                  sst2_batch, tmp_path)


@pytest.mark.slow
def test_export_loads_in_peft_with_same_logits_roberta(tiny_roberta, tmp_path):
    pre = jaxpeft.load_pretrained(tiny_roberta, tokenizer=False)
    _check_export(pre, tiny_roberta, PrefixConfig(num_virtual_tokens=6),
                  random_batch("roberta"), tmp_path, pad=pre.config.pad_token_id)


@pytest.mark.slow
def test_gradients_match_peft_s_prefix_encoder(minilm_dir, glue_dir, tmp_path):
    """Loss and gradients (the table, the head) on a real STS-B batch equal those of peft's
    trainable prefix encoder through transformers' attention."""
    pre = jaxpeft.load_pretrained(minilm_dir, num_labels=1)
    options = PrefixConfig(num_virtual_tokens=8)
    peft, model, params = _trained(pre, options, scale=0.01)
    export_peft(tmp_path, peft, params, base_model=str(minilm_dir), config=pre.config)
    args, y = stsb_batch(pre, glue_dir)
    loss, grads = loss_and_grads(model, params, peft, args, y)
    tm = hf_peft.PeftModel.from_pretrained(
        transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir,
                                                                        num_labels=1),
        tmp_path).eval()
    # Loaded for inference, peft reads the table itself: make it and the head trainable.
    tm.peft_config["default"].inference_mode = False
    for n, p in tm.named_parameters():
        p.requires_grad_("prompt_encoder" in n or "modules_to_save" in n)
    theirs = _reference(tm, args, options.num_virtual_tokens)
    ref_loss = torch.nn.functional.mse_loss(theirs.squeeze(-1), torch.tensor(y))
    ref_loss.backward()
    ref = {n.replace(".modules_to_save.default", "").replace(".default", "")
           .replace("prompt_encoder.embedding.weight", "prompt_embeddings"): p.grad.numpy()
           for n, p in tm.named_parameters() if p.requires_grad}
    np.testing.assert_allclose(float(loss), float(ref_loss.detach()), rtol=1e-6)
    ours = peft_tensors(peft, grads)
    assert set(ref) == set(ours)
    for name, r in ref.items():
        np.testing.assert_allclose(ours[name], r, atol=1e-5 * np.abs(r).max(), rtol=0,
                                   err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_packed_prefix_logits_equal_unpacked(tmp_path, model_type):
    """Every packed example attends to the prefix and its own tokens: the same logits as one
    example per row."""
    from jaxpeft.data.batching import bucket_lengths, make_batch, make_packed_batch
    from jaxpeft.train import forward

    cls = {"bert": transformers.BertForSequenceClassification,
           "roberta": transformers.RobertaForSequenceClassification}[model_type]
    save_torch_model(cls, tiny_hf_config(model_type, num_labels=3), tmp_path)
    pre = jaxpeft.load_pretrained(tmp_path, tokenizer=False)
    peft, model, params = _trained(pre, PrefixConfig(num_virtual_tokens=5), scale=0.5)
    pad = pre.config.pad_token_id
    enc = random_encoded(model_type, n=11, pairs=True, max_len=30)
    rows = np.arange(len(enc))
    plain = make_batch(enc, rows, 16, bucket_lengths(32), pad)
    packed = make_packed_batch(enc, rows, 16, 32, pad,
                               position_offset=pre.config.position_offset)
    assert packed["segment_ids"].max() > 1
    real = plain["weights"] > 0
    out_plain = np.asarray(forward(model, params, plain, deterministic=True))[real]
    out_packed = np.asarray(forward(model, params, packed, deterministic=True))[real]
    np.testing.assert_allclose(out_packed, out_plain, atol=1e-5, rtol=0)
    base = np.asarray(forward(pre.model, pre.params, plain, deterministic=True))[real]
    assert np.abs(out_plain - base).max() > 1e-3


def test_prefix_refuses_position_aware_attention_merge_and_bad_options(tmp_path, minilm):
    save_torch_model(transformers.DebertaV2ForSequenceClassification,
                     tiny_hf_config("deberta-v2"), tmp_path)
    deberta = jaxpeft.load_pretrained(tmp_path, tokenizer=False)
    with pytest.raises(JaxpeftError, match="prefix needs attention that takes extra keys"):
        make_peft("prefix").init(deberta.model, deberta.params, jax.random.key(0))
    peft = make_peft("prefix")
    model, params = peft.init(minilm.model, minilm.params, jax.random.key(0))
    with pytest.raises(JaxpeftError, match="no weights to merge"):
        peft.merge(model, params)
    with pytest.raises(JaxpeftError, match="--prefix_projection"):
        PrefixConfig(projection=-1)
    # A tree with a prefix is an error on a model without the method's hook.
    with pytest.raises(JaxpeftError, match="prefix_embeddings"):
        minilm.model.apply({"params": params}, *random_batch("bert"))
