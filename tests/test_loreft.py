"""LoReFT against a PyTorch reference written from the paper's equations (transformers'
model with forward hooks on its layers, `h + Rᵀ(W h + b − R h)` at the chosen positions):
logits and every gradient; packed rows; options and refusals."""

import jax
import numpy as np
import pytest
from flax import traverse_util

import jaxpeft
from jaxpeft.errors import JaxpeftError
from jaxpeft.peft import make_peft
from jaxpeft.peft.loreft import LoreftConfig
from tests.helpers import loss_and_grads, random_encoded, save_torch_model, stsb_batch, tiny_hf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _torch_orthonormal(rotation):
    q, r = torch.linalg.qr(rotation)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def _reference(model, table, options, ids, mask, types, labels=None):
    """The PyTorch model with LoReFT written from the equations as forward hooks."""
    kind = model.config.model_type
    layers = getattr(model, kind).encoder.layer
    real = torch.tensor(mask).bool()
    length = real.shape[1]
    here = torch.arange(length)[None, :]
    last = real.long().sum(dim=1, keepdim=True) - 1  # right padding: the last real token
    chosen = ((here < options.first) | ((last - here) < options.last)) & real

    def hook(params):
        def edit(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            r = _torch_orthonormal(params["rotation"])
            new = h + (h @ params["weight"] + params["bias"] - h @ r) @ r.T
            h = torch.where(chosen[..., None], new, h)
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        return edit

    handles = [layers[int(name.split("_")[1])].register_forward_hook(hook(p))
               for name, p in table.items()]
    try:
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types),
                    labels=None if labels is None else torch.tensor(labels))
    finally:
        for h in handles:
            h.remove()
    return out


def _trained(pre, options, scale=0.05):
    peft = make_peft("loreft", options)
    model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    flat, mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(peft.mask(params))
    for i, path in enumerate(sorted(flat)):
        if mask[path] and path[0] == "classifier":
            flat[path] = flat[path] + scale * jax.random.normal(jax.random.key(i),
                                                                flat[path].shape)
    return peft, model, traverse_util.unflatten_dict(flat)


def _torch_table(params, requires_grad=False):
    return {name: {k: torch.tensor(np.asarray(v), requires_grad=requires_grad)
                   for k, v in leaves.items()} for name, leaves in params["loreft"].items()}


def _load_head(model, params):
    """Our head's values into the PyTorch model (BERT: classifier; RoBERTa: dense, out_proj)."""
    c = params["classifier"]
    with torch.no_grad():
        if "kernel" in c:
            model.classifier.weight.copy_(torch.tensor(np.asarray(c["kernel"]).T))
            model.classifier.bias.copy_(torch.tensor(np.asarray(c["bias"])))
        else:
            for name in ("dense", "out_proj"):
                getattr(model.classifier, name).weight.copy_(
                    torch.tensor(np.asarray(c[name]["kernel"]).T))
                getattr(model.classifier, name).bias.copy_(torch.tensor(np.asarray(c[name]["bias"])))


@pytest.mark.parametrize("options", [LoreftConfig(rank=4, first=1, last=0),
                                     LoreftConfig(rank=2, first=2, last=1, layers=("1", "4"))])
def test_logits_equal_the_reference_minilm(minilm, minilm_dir, sst2_batch, options):
    peft, model, params = _trained(minilm, options)
    tm = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir,
                                                                         num_labels=2).eval()
    _load_head(tm, params)
    with torch.no_grad():
        theirs = _reference(tm, _torch_table(params), options, *sst2_batch).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, *sst2_batch, deterministic=True))
    base = np.asarray(minilm.model.apply({"params": {**minilm.params, "classifier":
                                                     params["classifier"]}},
                                         *sst2_batch, deterministic=True))
    assert np.abs(ours - base).max() > 1e-3  # the interventions change the output
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    r = np.asarray(jax.numpy.linalg.qr(params["loreft"]["layer_1"]["rotation"])[0])
    assert np.allclose(r.T @ r, np.eye(r.shape[1]), atol=1e-5)


@pytest.mark.slow
def test_gradients_equal_the_reference(minilm_dir, glue_dir):
    """Loss and gradients of every LoReFT leaf (through the QR parametrisation) and of the
    head on a real STS-B batch."""
    pre = jaxpeft.load_pretrained(minilm_dir, num_labels=1)
    options = LoreftConfig(rank=4, first=1, last=1)
    peft, model, params = _trained(pre, options)
    args, y = stsb_batch(pre, glue_dir)
    loss, grads = loss_and_grads(model, params, peft, args, y)
    tm = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir,
                                                                         num_labels=1).eval()
    _load_head(tm, params)
    table = _torch_table(params, requires_grad=True)
    out = _reference(tm, table, options, *args, labels=y)
    out.loss.backward()
    np.testing.assert_allclose(float(loss), float(out.loss.detach()), rtol=1e-6)
    for name, leaves in table.items():
        for k, t in leaves.items():
            r = t.grad.numpy()
            np.testing.assert_allclose(np.asarray(grads["loreft"][name][k]), r,
                                       atol=1e-5 * np.abs(r).max(), rtol=0,
                                       err_msg=f"{name}/{k}")
    r = tm.classifier.weight.grad.numpy().T
    np.testing.assert_allclose(np.asarray(grads["classifier"]["kernel"]), r,
                               atol=1e-5 * np.abs(r).max(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_packed_rows_equal_unpacked_and_roberta_equals_reference(tmp_path, model_type):
    from jaxpeft.data.batching import bucket_lengths, make_batch, make_packed_batch
    from jaxpeft.train import forward

    cls = {"bert": transformers.BertForSequenceClassification,
           "roberta": transformers.RobertaForSequenceClassification}[model_type]
    tm = save_torch_model(cls, tiny_hf_config(model_type, num_labels=3, hidden_dropout_prob=0.0,
                                              attention_probs_dropout_prob=0.0), tmp_path)
    pre = jaxpeft.load_pretrained(tmp_path, tokenizer=False)
    options = LoreftConfig(rank=2, first=2, last=1)
    peft, model, params = _trained(pre, options, scale=0.5)
    pad = pre.config.pad_token_id
    enc = random_encoded(model_type, n=11, pairs=True, max_len=30)
    rows = np.arange(len(enc))
    plain = make_batch(enc, rows, 16, bucket_lengths(32), pad)
    packed = make_packed_batch(enc, rows, 16, 32, pad, position_offset=pre.config.position_offset)
    assert packed["segment_ids"].max() > 1
    real = plain["weights"] > 0
    out_plain = np.asarray(forward(model, params, plain, deterministic=True))
    out_packed = np.asarray(forward(model, params, packed, deterministic=True))[real]
    np.testing.assert_allclose(out_packed, out_plain[real], atol=1e-5, rtol=0)
    _load_head(tm, params)
    with torch.no_grad():
        theirs = _reference(tm.eval(), _torch_table(params), options, plain["input_ids"],
                            plain["attention_mask"], plain["token_type_ids"]).logits.numpy()
    np.testing.assert_allclose(out_plain[real], theirs[real], atol=1e-5, rtol=0)


def test_options_and_refusals(tmp_path, minilm):
    with pytest.raises(JaxpeftError, match="intervenes on no token"):
        LoreftConfig(first=0, last=0)
    with pytest.raises(JaxpeftError, match="--reft_layers must be layer indices"):
        LoreftConfig(layers=("x",))
    with pytest.raises(JaxpeftError, match="the model has 6 layers"):
        make_peft("loreft", LoreftConfig(layers=("6",))).init(minilm.model, minilm.params,
                                                             jax.random.key(0))
    peft = make_peft("loreft")
    model, params = peft.init(minilm.model, minilm.params, jax.random.key(0))
    with pytest.raises(JaxpeftError, match="no weights to merge"):
        peft.merge(model, params)
    save_torch_model(transformers.DebertaV2ForSequenceClassification,
                     tiny_hf_config("deberta-v2"), tmp_path)
    deberta = jaxpeft.load_pretrained(tmp_path, tokenizer=False)
    with pytest.raises(JaxpeftError, match="loreft acts between the layers"):
        peft.init(deberta.model, deberta.params, jax.random.key(0))
