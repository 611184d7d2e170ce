"""DeBERTa-v2 and DeBERTa-v3 (`model_type` deberta-v2) for sequence classification.

What differs from BERT is attention: besides content-to-content scores, each layer adds
content-to-position (c2p) and position-to-content (p2c) scores between a token's content and
the embedding of its *relative* distance to the other token (He et al., 2021). Distances are
bucketed logarithmically beyond `position_buckets / 2` (`relative_buckets`), the shared table
`encoder/rel_embeddings` (LayerNorm'd when `norm_rel_ebd` says so) is projected by each
layer's own `query_proj`/`key_proj` (`share_att_key`, v3) or by `pos_query_proj`/
`pos_key_proj`, and the scores are scaled by `sqrt(head_dim * (1 + number of position
terms))`. v3 has no absolute position embeddings and no token types; narrow embeddings are
widened by `embed_proj` before their LayerNorm. The head is `ContextPooler` (`pooler/dense`
and an activation on the first token, fresh in the v3 checkpoints) and `classifier`.

Relative positions are differences of slot indices within a row. In packed rows tokens
attend only within their own example, whose slots are consecutive, so every attended pair
has the distance it has unpacked: packing stays exact. The convolution layer of the v2
xlarge/xxlarge checkpoints (`conv_kernel_size`) is not implemented; those are refused.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.bert import finish_logits
from jaxpeft.models.config import EncoderConfig
from jaxpeft.models.encoder import (ACTIVATIONS, Backbone, Dense, Dropout, Intermediate,
                                    Residual, Runtime, layer_norm, weigh_values)
from jaxpeft.models.family import Family


@dataclasses.dataclass(frozen=True)
class DebertaConfig(EncoderConfig):
    """`EncoderConfig` plus DeBERTa's relative-attention and pooler fields (transformers'
    names and defaults)."""

    relative_attention: bool = False
    max_relative_positions: int = -1
    position_buckets: int = -1
    pos_att_type: tuple = ()
    share_att_key: bool = False
    norm_rel_ebd: str = "none"
    position_biased_input: bool = True
    pooler_hidden_act: str = "gelu"
    pooler_dropout: float = 0.0

    @classmethod
    def family_fields(cls, d: dict, source: str) -> dict:
        if (d.get("conv_kernel_size") or 0) > 0:
            raise JaxpeftError(f"{source}: DeBERTa with a convolution layer (conv_kernel_size, "
                               "the v2 xlarge/xxlarge checkpoints) is not supported; "
                               "DeBERTa-v3 and v2 without it are")
        if d.get("pooler_hidden_size", d.get("hidden_size")) != d.get("hidden_size"):
            raise JaxpeftError(f"{source}: pooler_hidden_size differs from hidden_size")
        heads = d.get("num_attention_heads") or 1
        if d.get("attention_head_size", d.get("hidden_size", 0) // heads) != \
                d.get("hidden_size", 0) // heads:
            raise JaxpeftError(f"{source}: attention_head_size other than hidden_size / heads "
                               "is not supported")
        kinds = d.get("pos_att_type") or ()
        if isinstance(kinds, str):  # older configs: "p2c|c2p"
            kinds = kinds.lower().split("|")
        kinds = tuple(k.strip() for k in kinds if k.strip())
        unknown = [k for k in kinds if k not in ("c2p", "p2c")]
        if unknown:
            raise JaxpeftError(f"{source}: pos_att_type {unknown} is not supported (c2p, p2c)")
        act = d.get("pooler_hidden_act", "gelu")
        if act not in ACTIVATIONS and act != "tanh":
            raise JaxpeftError(f"{source}: pooler_hidden_act {act!r} is not supported")
        return {**d, "pos_att_type": kinds, "norm_rel_ebd": str(d.get("norm_rel_ebd") or "none")}

    @property
    def absolute_positions(self) -> bool:
        return self.position_biased_input

    @property
    def project_in_embeddings(self) -> bool:
        return True

    @property
    def span(self) -> int:
        """Relative distances each side: the bucket count, or the position limit."""
        if self.position_buckets > 0:
            return self.position_buckets
        return self.max_relative_positions if self.max_relative_positions > 0 \
            else self.max_position_embeddings

    @property
    def max_distance(self) -> int:
        """The distance the logarithmic buckets reach (transformers' max_relative_positions)."""
        return self.max_relative_positions if self.max_relative_positions > 0 \
            else self.max_position_embeddings


def relative_buckets(length: int, buckets: int, max_position: int) -> np.ndarray:
    """`[length, length]` bucketed distances `i - j` (transformers' `build_relative_position`
    with `make_log_bucket_position`): exact within `buckets / 2`, logarithmic beyond, in
    float32 as transformers computes them. Host-side: it depends on the length only."""
    rel = np.arange(length)[:, None] - np.arange(length)[None, :]
    if buckets <= 0 or max_position <= 0:
        return rel
    mid = buckets // 2
    sign = np.sign(rel)
    inside = (rel < mid) & (rel > -mid)
    abs_pos = np.where(inside, mid - 1, np.abs(rel)).astype(np.float32)
    scale = np.log(np.float32((max_position - 1) / mid), dtype=np.float32)
    log_pos = np.ceil(np.log(abs_pos / np.float32(mid), dtype=np.float32) / scale
                      * np.float32(mid - 1)) + mid
    return np.where(abs_pos <= mid, rel, log_pos * sign).astype(np.int64)


class DisentangledSelfAttention(nn.Module):
    """Content and relative-position attention of one layer (module `attention/self`)."""

    config: DebertaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, mask, rel_embeddings, deterministic: bool = True):
        cfg, rt = self.config, self.runtime
        length = x.shape[1]
        heads, d = cfg.num_attention_heads, cfg.head_dim

        kinds = cfg.pos_att_type if cfg.relative_attention else ()
        names = ["query_proj", "key_proj", "value_proj"]
        if not cfg.share_att_key:
            names += [n for kind, n in (("c2p", "pos_key_proj"), ("p2c", "pos_query_proj"))
                      if kind in kinds]
        # One module per projection, applied to the tokens and (shared keys) to the
        # relative embeddings: the same weights and the same PEFT hooks on both.
        dense = {n: Dense(cfg.hidden_size, cfg, rt, name=n) for n in names}

        def project(name, h):
            out = dense[name](h, deterministic)
            return out.reshape(*out.shape[:-1], heads, d)

        q, k, v = (project(n, x) for n in ("query_proj", "key_proj", "value_proj"))
        scale = jnp.sqrt(jnp.asarray(d * (1 + len(kinds)), jnp.float32))
        scores = jnp.einsum("bihd,bjhd->bhij", q, k).astype(jnp.float32)
        if kinds:
            rel = Dropout(cfg.hidden_dropout_prob)(rel_embeddings, deterministic=deterministic)
            span = cfg.span
            index = np.clip(relative_buckets(length, span, cfg.max_distance) + span, 0,
                            2 * span - 1)[None, None]
            if "c2p" in kinds:
                pos_k = project("key_proj" if cfg.share_att_key else "pos_key_proj", rel)
                c2p = jnp.einsum("bihd,rhd->bhir", q, pos_k).astype(jnp.float32)
                scores = scores + jnp.take_along_axis(c2p, jnp.asarray(index), axis=-1)
            if "p2c" in kinds:
                pos_q = project("query_proj" if cfg.share_att_key else "pos_query_proj", rel)
                p2c = jnp.einsum("bjhd,rhd->bhjr", k, pos_q).astype(jnp.float32)
                # score[i, j] reads key j's row at the bucket of i - j
                scores = scores + jnp.swapaxes(jnp.take_along_axis(
                    p2c, jnp.asarray(np.swapaxes(index, -1, -2)), axis=-1), -1, -2)
        return weigh_values(scores / scale, mask, v, Dropout(cfg.attention_probs_dropout_prob),
                            deterministic)


class Attention(nn.Module):
    """`self` (disentangled attention) and `output` (dense, dropout, residual LayerNorm)."""

    config: DebertaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, mask, rel_embeddings, deterministic: bool = True):
        h = DisentangledSelfAttention(self.config, self.runtime, name="self")(
            x, mask, rel_embeddings, deterministic)
        return Residual(self.config, self.runtime, name="output")(h, x, deterministic)


class Layer(nn.Module):
    """One DeBERTa layer: attention, then BERT's feed-forward block."""

    config: DebertaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, mask, rel_embeddings, deterministic: bool = True):
        cfg, rt = self.config, self.runtime
        x = Attention(cfg, rt, name="attention")(x, mask, rel_embeddings, deterministic)
        h = Intermediate(cfg, rt, name="intermediate")(x, deterministic)
        return Residual(cfg, rt, name="output")(h, x, deterministic)


class Encoder(nn.Module):
    """`rel_embeddings` (and its LayerNorm), then `layer_0 ... layer_{n-1}`."""

    config: DebertaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        cfg, rt = self.config, self.runtime
        rel = None
        if cfg.relative_attention:
            rel = nn.Embed(2 * cfg.span, cfg.hidden_size, dtype=jnp.float32,
                           param_dtype=jnp.float32,
                           embedding_init=nn.initializers.normal(cfg.initializer_range),
                           name="rel_embeddings").embedding
            if "layer_norm" in [s.strip() for s in cfg.norm_rel_ebd.lower().split("|")]:
                rel = layer_norm(cfg, rt)(rel)
        for i in range(cfg.num_hidden_layers):
            x = Layer(cfg, rt, name=f"layer_{i}")(x, mask, rel, deterministic)
        return x


class ContextPooler(nn.Module):
    """`dropout -> dense -> activation` on the first token."""

    config: DebertaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, first, deterministic: bool = True):
        cfg = self.config
        x = Dropout(cfg.pooler_dropout)(first, deterministic=deterministic)
        x = Dense(cfg.hidden_size, cfg, self.runtime, name="dense")(x, deterministic)
        return jnp.tanh(x) if cfg.pooler_hidden_act == "tanh" \
            else ACTIVATIONS[cfg.pooler_hidden_act](x)


class DebertaClassifier(nn.Module):
    """DeBERTa-v2/v3 for sequence classification / regression: backbone under `deberta/`,
    `pooler/dense`, `classifier` (called as `SequenceClassifier`)."""

    config: DebertaConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True, output_hidden_states: bool = False,
                 segment_ids=None, example_row=None, example_pos=None):
        cfg, rt = self.config, self.runtime
        hidden, first, _ = Backbone(cfg, rt, add_pooling_layer=False, layers=Encoder,
                                    name="deberta")(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic,
            segment_ids, example_row, example_pos)
        x = ContextPooler(cfg, rt, name="pooler")(first, deterministic)
        x = Dropout(cfg.head_dropout)(x, deterministic=deterministic)
        logits = Dense(cfg.num_labels, cfg, rt, name="classifier")(x, deterministic)
        return finish_logits(self, logits, hidden, output_hidden_states,
                             {"deberta", "pooler", "classifier"})


DEBERTA_V2 = Family(
    "deberta-v2", "deberta", "DebertaV2ForSequenceClassification", DebertaClassifier,
    {"query": "attention.self.query_proj", "key": "attention.self.key_proj",
     "value": "attention.self.value_proj", "attention_output": "attention.output.dense",
     "intermediate": "intermediate.dense", "output": "output.dense"},
    # The v3 checkpoints hold no pooler weights: it is part of the task head, trained by
    # every method (and saved by the peft export), never a frozen random layer.
    head=("pooler", "classifier"),
    config_names={"cls_dropout": "classifier_dropout"}, config_class=DebertaConfig,
    attention_prefix=False, layer_hooks=False)
