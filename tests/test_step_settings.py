"""The runtime settings that change how a step is computed but not what it computes (the
step benchmark's candidates, `Runtime`): the fused query/key/value product, one-hot lookups
of the small embedding tables and the word table's gradient summed in sorted order, each
against the default on tiny random models: logits, loss and every gradient, in training
(dropout on) with full fine-tuning and with LoRA; and the fused attention's implementation,
refused where attention dropout needs the unfused path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models import EncoderConfig, Runtime
from jaxpeft.models.encoder import onehot_lookup, sorted_lookup
from jaxpeft.models.registry import build_model
from jaxpeft.peft import LoraConfig, combine, make_peft, partition
from tests.helpers import random_batch, tiny_hf_config

SETTINGS = {"fused_qkv": dict(fused_qkv=True),
            "onehot_small_tables": dict(onehot_small_tables=True),
            "sorted_word_grads": dict(sorted_word_grads=True),
            "all three": dict(fused_qkv=True, onehot_small_tables=True,
                              sorted_word_grads=True)}


def _model(model_type, **runtime):
    """The tiny random model of a family (tests.helpers' config), computing with `runtime`."""
    cfg = EncoderConfig.from_hf_dict(tiny_hf_config(model_type).to_dict(), num_labels=2)
    return build_model(cfg, Runtime(**runtime))


def _loss_and_grads(model, params, peft, batch):
    """Mean cross-entropy in training mode (dropout on, fixed key), its gradients w.r.t. the
    method's trainable leaves, and the logits."""
    trainable, frozen = partition(params, peft.mask(params))
    ids, mask, types = batch
    labels = jnp.arange(ids.shape[0]) % 2

    def loss_fn(t):
        logits = model.apply({"params": combine(t, frozen)}, ids, mask, types,
                             deterministic=False, rngs={"dropout": jax.random.key(3)})
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, labels[:, None], axis=1).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return loss, logits, grads


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_a_setting_changes_no_result(model_type, method, setting):
    """Logits, loss and every trainable gradient equal the default computation's to float
    rounding (each setting reorders sums only), with the same parameter tree."""
    base = _model(model_type)
    params = base.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    options = LoraConfig(rank=4, alpha=8, targets=("query", "key", "value")) \
        if method == "lora" else None
    peft = make_peft(method, options)
    model, params = peft.init(base, params, jax.random.key(1))
    # LoRA's B starts at zero: move it, so the test sees the adapter's own gradient path.
    flat = traverse_util.flatten_dict(params)
    flat = {p: v + 0.05 if p[-1] == "lora_b" else v for p, v in flat.items()}
    params = traverse_util.unflatten_dict(flat)
    varied = model.clone(runtime=dataclasses.replace(model.runtime, **SETTINGS[setting]))
    batch = tuple(jnp.asarray(a) for a in random_batch(model_type, batch=4, length=16,
                                                       pairs=model_type == "bert"))
    if model_type == "distilbert":
        batch = batch[:2] + (None,)
    if setting == "fused_qkv":  # really one product per layer, not three
        count = lambda m: str(jax.make_jaxpr(  # noqa: E731
            lambda p: m.apply({"params": p}, *batch))(params)).count("dot_general")
        assert count(model) - count(varied) == 2 * model.config.num_hidden_layers
    loss, logits, grads = _loss_and_grads(model, params, peft, batch)
    loss2, logits2, grads2 = _loss_and_grads(varied, params, peft, batch)
    assert jax.tree.structure(grads) == jax.tree.structure(grads2)
    np.testing.assert_allclose(logits2, logits, rtol=0, atol=2e-6)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6, atol=0)
    flat, flat2 = (dict(traverse_util.flatten_dict(g)) for g in (grads, grads2))
    flat = {p: g for p, g in flat.items() if g is not None}  # the frozen places hold None
    assert flat and all(np.abs(np.asarray(g)).max() > 0 for g in flat.values())
    for path, g in flat.items():
        # Within 1e-5 of each leaf's largest entry (1e-6 at least: the key biases' gradients
        # are zero up to rounding, softmax being blind to a shift of every score).
        atol = max(1e-5 * float(np.abs(np.asarray(g)).max()), 1e-6)
        np.testing.assert_allclose(flat2[path], g, rtol=0, atol=atol, err_msg="/".join(path))


def test_lookups_equal_the_gather_and_its_gradient():
    """Both lookups return the table's rows exactly; their gradients equal the scatter-add's
    (ids repeated, unsorted, some rows never hit)."""
    table = jax.random.normal(jax.random.key(0), (50, 8))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (6, 9)))
    dy = jax.random.normal(jax.random.key(1), (6, 9, 8))
    gather = lambda t: jnp.take(t, ids, axis=0)  # noqa: E731
    want, vjp = jax.vjp(gather, table)
    for lookup in (onehot_lookup, sorted_lookup):
        got, vjp2 = jax.vjp(lambda t, f=lookup: f(t, ids), table)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(vjp2(dy)[0], vjp(dy)[0], rtol=0, atol=1e-6)
        assert not np.asarray(vjp2(dy)[0])[40:].any()


def test_fused_attention_without_dropout_only():
    """A fused attention implementation with the probabilities' dropout on in training is
    one clear error; with that dropout at 0 the 'xla' implementation gives the default's
    logits."""
    model = _model("bert", attention_implementation="xla")
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    ids, mask, types = (jnp.asarray(a) for a in random_batch("bert", pairs=True))
    args = dict(deterministic=False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(  # "xla" with dropout: the ordinary dropout path
        model.apply({"params": params}, ids, mask, types, **args),
        _model("bert").apply({"params": params}, ids, mask, types, **args))
    cudnn = model.clone(runtime=Runtime(attention_implementation="cudnn"))
    with pytest.raises(JaxpeftError, match="attention_probs_dropout_prob to 0"):
        cudnn.apply({"params": params}, ids, mask, types, **args)
    quiet = dataclasses.replace(model.config, attention_probs_dropout_prob=0.0)
    np.testing.assert_allclose(
        model.clone(config=quiet).apply({"params": params}, ids, mask, types, **args),
        _model("bert").clone(config=quiet).apply({"params": params}, ids, mask, types,
                                                 **args), rtol=0, atol=1e-6)
