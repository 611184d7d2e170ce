"""DistilBERT for sequence classification (`DistilBertForSequenceClassification`).

The computation is BERT's with another layout: no token types, no pooler, each layer
`attention/{q_lin,k_lin,v_lin,out_lin}` -> `sa_layer_norm(x + attention)` ->
`ffn/{lin1,lin2}` -> `output_layer_norm(x + ffn)`, with dropout only after `lin2` and on the
attention probabilities; the head is `pre_classifier` -> ReLU -> dropout -> `classifier` on
the first token. Embeddings, attention, packing and the PEFT hooks are the shared ones.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from jaxpeft.models.bert import finish_logits
from jaxpeft.models.config import EncoderConfig
from jaxpeft.models.encoder import (ACTIVATIONS, Backbone, Dense, Dropout, EncoderLayers,
                                    Runtime, attend, hooked_keys, layer_norm, project_qkv)
from jaxpeft.models.family import Family


class MultiHeadSelfAttention(nn.Module):
    """`q_lin`, `k_lin`, `v_lin`, attention, then `out_lin` (no dropout after it)."""

    config: EncoderConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        cfg = self.config
        q, k, v = project_qkv(self, x, ("q_lin", "k_lin", "v_lin"), deterministic)
        k, v, mask = hooked_keys(self, self.runtime, k, v, mask)
        out = attend(q, k, v, mask, cfg, deterministic, self.runtime)
        return Dense(cfg.hidden_size, cfg, self.runtime, name="out_lin")(out, deterministic)


class FFN(nn.Module):
    """`lin1 -> activation -> lin2 -> dropout`."""

    config: EncoderConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        x = Dense(cfg.intermediate_size, cfg, self.runtime, name="lin1")(x, deterministic)
        x = Dense(cfg.hidden_size, cfg, self.runtime, name="lin2")(
            ACTIVATIONS[cfg.hidden_act](x), deterministic)
        return Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class TransformerBlock(nn.Module):
    """One DistilBERT layer (post-LayerNorm, as BERT)."""

    config: EncoderConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        cfg, rt = self.config, self.runtime
        h = MultiHeadSelfAttention(cfg, rt, name="attention")(x, mask, deterministic)
        x = layer_norm(cfg, rt, "sa_layer_norm")(h + x)
        h = FFN(cfg, rt, name="ffn")(x, deterministic)
        return layer_norm(cfg, rt, "output_layer_norm")(h + x)


class Transformer(EncoderLayers):
    """The stack `layer_0 ... layer_{n-1}` (transformers' `distilbert.transformer`)."""

    block: ClassVar[type] = TransformerBlock


class DistilBertClassifier(nn.Module):
    """DistilBERT for sequence classification / regression; called as `SequenceClassifier`."""

    config: EncoderConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True, output_hidden_states: bool = False,
                 segment_ids=None, example_row=None, example_pos=None):
        cfg, rt = self.config, self.runtime
        hidden, first, _ = Backbone(cfg, rt, add_pooling_layer=False, layers=Transformer,
                                    layers_name="transformer", name="distilbert")(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic,
            segment_ids, example_row, example_pos)
        x = jax.nn.relu(Dense(cfg.hidden_size, cfg, rt, name="pre_classifier")(
            first, deterministic))
        x = Dropout(cfg.head_dropout)(x, deterministic=deterministic)
        logits = Dense(cfg.num_labels, cfg, rt, name="classifier")(x, deterministic)
        return finish_logits(self, logits, hidden, output_hidden_states,
                             {"distilbert", "pre_classifier", "classifier"})


DISTILBERT = Family(
    "distilbert", "distilbert", "DistilBertForSequenceClassification", DistilBertClassifier,
    {"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
     "attention_output": "attention.out_lin", "intermediate": "ffn.lin1",
     "output": "ffn.lin2"},
    layers="transformer.layer", head=("pre_classifier", "classifier"),
    norms=("LayerNorm", "sa_layer_norm", "output_layer_norm"),
    config_names={"dim": "hidden_size", "n_layers": "num_hidden_layers",
                  "n_heads": "num_attention_heads", "hidden_dim": "intermediate_size",
                  "activation": "hidden_act", "dropout": "hidden_dropout_prob",
                  "attention_dropout": "attention_probs_dropout_prob",
                  "seq_classif_dropout": "classifier_dropout"},
    # DistilBERT's LayerNorms are built with eps 1e-12 whatever the config; no token types.
    config_fixed={"layer_norm_eps": 1e-12, "type_vocab_size": 0})
