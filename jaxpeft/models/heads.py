"""Sequence-classification models: the backbone plus transformers' classification heads.

BERT (`BertForSequenceClassification`): pooler (tanh dense on `[CLS]`) -> dropout ->
`classifier`. RoBERTa (`RobertaForSequenceClassification`): no pooler; `classifier/dense`
-> tanh -> `classifier/out_proj` on `<s>`, with dropout before each. `num_labels == 1` is
regression: the same head with one output, followed by a fixed affine map to the label
scale (`Runtime.target_mean`/`target_std`; the identity unless set).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxpeft.models.config import EncoderConfig
from jaxpeft.models.encoder import Backbone, Dense, Dropout, Runtime, refuse_foreign_leaves


class RobertaClassificationHead(nn.Module):
    """`dropout -> dense -> tanh -> dropout -> out_proj` on the first token."""

    config: EncoderConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, first_token, deterministic: bool = True):
        cfg = self.config
        x = Dropout(cfg.head_dropout)(first_token, deterministic=deterministic)
        x = jnp.tanh(Dense(cfg.hidden_size, cfg, self.runtime, name="dense")(x, deterministic))
        x = Dropout(cfg.head_dropout)(x, deterministic=deterministic)
        return Dense(cfg.num_labels, cfg, self.runtime, name="out_proj")(x, deterministic)


class SequenceClassifier(nn.Module):
    """BERT or RoBERTa for sequence classification / regression.

    `__call__(input_ids, attention_mask, token_type_ids, position_ids=None,
    deterministic=True)` returns float32 logits `[batch, num_labels]`; with
    `output_hidden_states=True` it returns `(logits, last_hidden_state)`. For packed rows,
    pass `segment_ids`, `example_row` and `example_pos` (see `Backbone`): the logits are then
    per example, `[examples, num_labels]`. The backbone's
    parameters live under `bert/` or `roberta/` and the head under `classifier/`, as in the
    transformers checkpoints.
    """

    config: EncoderConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True, output_hidden_states: bool = False,
                 segment_ids=None, example_row=None, example_pos=None):
        cfg = self.config
        is_bert = cfg.model_type == "bert"
        hidden, first, pooled = Backbone(cfg, self.runtime, add_pooling_layer=is_bert,
                                         name=cfg.model_type)(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic,
            segment_ids, example_row, example_pos)
        if is_bert:
            x = Dropout(cfg.head_dropout)(pooled, deterministic=deterministic)
            logits = Dense(cfg.num_labels, cfg, self.runtime, name="classifier")(
                x, deterministic)
        else:
            logits = RobertaClassificationHead(cfg, self.runtime, name="classifier")(
                first, deterministic)
        self._check_root_leaves()
        logits = logits.astype(jnp.float32)
        if cfg.is_regression:
            logits = logits * self.runtime.target_std + self.runtime.target_mean
        if output_hidden_states:
            return logits, hidden.astype(jnp.float32)
        return logits

    def _check_root_leaves(self):
        # As `Dense` does for its own leaves: a method's root leaves (a soft prompt, VeRA's
        # projections) applied without its hooks is an error, not a base-model forward pass.
        refuse_foreign_leaves(self, {self.config.model_type, "classifier"}
                              | self.runtime.root_leaves, "the root of the tree")
