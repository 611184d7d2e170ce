"""ModernBERT (`model_type` modernbert) for sequence classification.

Pre-LayerNorm layers without biases (unless the config asks for them): `attn_norm` (none
in layer 0) -> `attn/Wqkv` (one fused projection) -> rotary position embeddings on queries
and keys -> attention -> `attn/Wo`, residual; `mlp_norm` -> `mlp/Wi` (twice the
intermediate width: input and gate) -> `act(input) * gate` (GeGLU) -> `mlp/Wo`, residual;
`final_norm` after the last layer. Layers alternate global attention with local attention
over a window of `local_attention / 2` tokens each side (every `global_attn_every_n_layers`-th
layer is global), each kind with its own rotary base (`rope_parameters`). No position or
token-type tables. The head pools the first token (`classifier_pooling` cls) or the mean of
the real tokens (mean), then `head/dense` -> activation -> `head/norm` -> dropout ->
`classifier`.

Packing stays exact: rotary positions restart per example (the packed position ids), the
local window is measured in slots of the row, which within one example are its positions,
attention never crosses examples, and mean pooling averages each example's own tokens.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.bert import finish_logits
from jaxpeft.models.config import EncoderConfig
from jaxpeft.models.encoder import (ACTIVATIONS, Dense, Dropout, EmbeddingHook, Runtime,
                                    expand_attention_mask, first_tokens, prepare_inputs,
                                    weigh_values)
from jaxpeft.models.family import Family

GLOBAL, LOCAL = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class ModernBertConfig(EncoderConfig):
    """`EncoderConfig` plus ModernBERT's own fields (transformers' names and defaults)."""

    layer_types: tuple = ()
    rope_theta_global: float = 160_000.0
    rope_theta_local: float = 10_000.0
    local_attention: int = 128
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    classifier_pooling: str = "cls"
    embedding_dropout: float = 0.0
    mlp_dropout: float = 0.0

    @classmethod
    def family_fields(cls, d: dict, source: str) -> dict:
        layers = d.get("num_hidden_layers") or 0
        types = d.get("layer_types")
        if types is None:  # hub configs: the pattern as a number
            every = int(d.get("global_attn_every_n_layers") or 3)
            types = [LOCAL if i % every else GLOBAL for i in range(layers)]
        if len(types) != layers or set(types) - {GLOBAL, LOCAL}:
            raise JaxpeftError(f"{source}: layer_types must name {layers} layers as "
                               f"{GLOBAL} or {LOCAL}")
        rope = d.get("rope_parameters") or {}
        for kind, params in rope.items():
            if (params or {}).get("rope_type", "default") != "default":
                raise JaxpeftError(f"{source}: rope_type {params['rope_type']!r} ({kind}) is not "
                                   "supported (default only)")
        if d.get("rope_scaling"):
            raise JaxpeftError(f"{source}: rope_scaling is not supported")
        theta = lambda kind, old, default: float(  # noqa: E731
            (rope.get(kind) or {}).get("rope_theta") or d.get(old) or default)
        if d.get("classifier_pooling", "cls") not in ("cls", "mean"):
            raise JaxpeftError(f"{source}: classifier_pooling {d['classifier_pooling']!r} is "
                               "not one of cls, mean")
        if d.get("classifier_activation", "gelu") not in ACTIVATIONS:
            raise JaxpeftError(f"{source}: classifier_activation "
                               f"{d['classifier_activation']!r} is not supported")
        return {**d, "layer_types": tuple(types),
                "rope_theta_global": theta(GLOBAL, "global_rope_theta", 160_000.0),
                "rope_theta_local": theta(LOCAL, "local_rope_theta", 10_000.0),
                "hidden_dropout_prob": 0.0, "type_vocab_size": 0}

    @property
    def absolute_positions(self) -> bool:
        return False


def _norm(config: ModernBertConfig, runtime: Runtime, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_bias=config.norm_bias,
                        dtype=runtime.jnp_dtype, param_dtype=jnp.float32, name=name)


def rotate(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of `x: [rows, length, heads, head_dim]` at `positions:
    [rows, length]` (transformers' `rotate_half` layout: the two halves of each head are the
    pair rotated together), computed in float32."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x.astype(jnp.float32)
    half = dim // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class Embeddings(nn.Module):
    """`tok_embeddings` (looked up in float32; a soft prompt's hooks fill its slots), `norm`,
    `drop`."""

    config: ModernBertConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, input_ids, deterministic: bool = True):
        cfg = self.config
        hooks = self.runtime.hooks_of(EmbeddingHook)
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.float32,
                     param_dtype=jnp.float32,
                     embedding_init=nn.initializers.normal(cfg.initializer_range),
                     name="tok_embeddings")(jnp.maximum(input_ids, 0) if hooks else input_ids)
        for hook in hooks:
            x = hook(self, input_ids, x)
        x = _norm(cfg, self.runtime, "norm")(x)
        return Dropout(cfg.embedding_dropout)(x, deterministic=deterministic)


class Attention(nn.Module):
    """`Wqkv`, rotary embeddings, (local or global) attention, `Wo`."""

    config: ModernBertConfig
    runtime: Runtime
    local: bool

    @nn.compact
    def __call__(self, x, mask, positions, deterministic: bool = True):
        cfg, rt = self.config, self.runtime
        rows, length, _ = x.shape
        heads, d = cfg.num_attention_heads, cfg.head_dim
        qkv = Dense(3 * cfg.hidden_size, cfg, rt, use_bias=cfg.attention_bias, name="Wqkv")(
            x, deterministic).reshape(rows, length, 3, heads, d)
        theta = cfg.rope_theta_local if self.local else cfg.rope_theta_global
        q, k = (rotate(qkv[:, :, i], positions, theta) for i in (0, 1))
        v = qkv[:, :, 2]
        if self.local:
            slots = np.arange(length)
            window = np.abs(slots[:, None] - slots[None, :]) <= cfg.local_attention // 2
            mask = mask & jnp.asarray(window)[None, None]
        scores = jnp.einsum("bihd,bjhd->bhij", q, k).astype(jnp.float32) / np.sqrt(d)
        out = weigh_values(scores, mask, v, Dropout(cfg.attention_probs_dropout_prob),
                           deterministic)
        out = Dense(cfg.hidden_size, cfg, rt, use_bias=cfg.attention_bias, name="Wo")(
            out, deterministic)
        return Dropout(cfg.attention_probs_dropout_prob)(out, deterministic=deterministic)


class MLP(nn.Module):
    """GeGLU: `Wi` -> `act(input) * gate` -> dropout -> `Wo`."""

    config: ModernBertConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg, rt = self.config, self.runtime
        h = Dense(2 * cfg.intermediate_size, cfg, rt, use_bias=cfg.mlp_bias, name="Wi")(
            x, deterministic)
        gated = ACTIVATIONS[cfg.hidden_act](h[..., :cfg.intermediate_size]) \
            * h[..., cfg.intermediate_size:]
        gated = Dropout(cfg.mlp_dropout)(gated, deterministic=deterministic)
        return Dense(cfg.hidden_size, cfg, rt, use_bias=cfg.mlp_bias, name="Wo")(
            gated, deterministic)


class Layer(nn.Module):
    """One pre-LayerNorm layer (`attn_norm` is the identity in layer 0)."""

    config: ModernBertConfig
    runtime: Runtime
    index: int

    @nn.compact
    def __call__(self, x, mask, positions, deterministic: bool = True):
        cfg, rt = self.config, self.runtime
        h = x if self.index == 0 else _norm(cfg, rt, "attn_norm")(x)
        x = x + Attention(cfg, rt, cfg.layer_types[self.index] == LOCAL, name="attn")(
            h, mask, positions, deterministic)
        return x + MLP(cfg, rt, name="mlp")(_norm(cfg, rt, "mlp_norm")(x), deterministic)


class Model(nn.Module):
    """`ModernBertModel`: embeddings, `layers_i`, `final_norm`. Returns the hidden states
    and the attention mask in force (`[rows, key]` or, packed, `[rows, query, key]`)."""

    config: ModernBertConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, segment_ids,
                 deterministic: bool = True):
        cfg, rt = self.config, self.runtime
        input_ids, attention_mask, _, position_ids = prepare_inputs(
            cfg, rt, input_ids, attention_mask, None, position_ids, segment_ids)
        x = Embeddings(cfg, rt, name="embeddings")(input_ids, deterministic)
        mask = expand_attention_mask(attention_mask)
        for i in range(cfg.num_hidden_layers):
            x = Layer(cfg, rt, i, name=f"layers_{i}")(x, mask, position_ids, deterministic)
        return _norm(cfg, rt, "final_norm")(x), attention_mask


def mean_tokens(x, attention_mask, segment_ids=None, example_row=None, example_pos=None):
    """Each example's mean hidden state over its real tokens (a soft prompt's slots
    included, as they are attended to): per row when unpacked, per segment when packed."""
    if example_row is None:
        weights = attention_mask.astype(jnp.float32)
        rows = x.astype(jnp.float32)
    else:
        own = segment_ids[example_row, example_pos]
        weights = (segment_ids[example_row] == own[:, None]).astype(jnp.float32)
        rows = x[example_row].astype(jnp.float32)
    total = jnp.einsum("el,elh->eh", weights, rows)
    return (total / weights.sum(axis=1, keepdims=True)).astype(x.dtype)


class ModernBertClassifier(nn.Module):
    """ModernBERT for sequence classification / regression: backbone under `model/`, the
    head under `head/` and `classifier` (called as `SequenceClassifier`)."""

    config: ModernBertConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True, output_hidden_states: bool = False,
                 segment_ids=None, example_row=None, example_pos=None):
        cfg, rt = self.config, self.runtime
        hidden, mask = Model(cfg, rt, name="model")(input_ids, attention_mask, position_ids,
                                                    segment_ids, deterministic)
        if cfg.classifier_pooling == "mean":
            pooled = mean_tokens(hidden, mask, segment_ids, example_row, example_pos)
        else:
            pooled = first_tokens(hidden, rt, example_row, example_pos)
        x = Head(cfg, rt, name="head")(pooled, deterministic)
        x = Dropout(cfg.head_dropout)(x, deterministic=deterministic)
        logits = Dense(cfg.num_labels, cfg, rt, name="classifier")(x, deterministic)
        return finish_logits(self, logits, hidden, output_hidden_states,
                             {"model", "head", "classifier"})


class Head(nn.Module):
    """`dense -> activation -> norm`."""

    config: ModernBertConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg, rt = self.config, self.runtime
        x = Dense(cfg.hidden_size, cfg, rt, use_bias=cfg.classifier_bias, name="dense")(
            x, deterministic)
        return _norm(cfg, rt, "norm")(ACTIVATIONS[cfg.classifier_activation](x))


MODERNBERT = Family(
    "modernbert", "model", "ModernBertForSequenceClassification", ModernBertClassifier,
    {"qkv": "attn.Wqkv", "attention_output": "attn.Wo", "intermediate": "mlp.Wi",
     "output": "mlp.Wo"},
    layers="layers", head=("head", "classifier"),
    norms=("norm", "attn_norm", "mlp_norm", "final_norm"),
    peft_norms=r"model\.(?:embeddings\.norm|final_norm|layers\.\d+\.mlp_norm"
               r"|layers\.[1-9]\d*\.attn_norm)",
    word_embeddings="embeddings.tok_embeddings", biases=False,
    config_names={"hidden_activation": "hidden_act", "norm_eps": "layer_norm_eps",
                  "attention_dropout": "attention_probs_dropout_prob"},
    config_class=ModernBertConfig, attention_prefix=False, layer_hooks=False)
