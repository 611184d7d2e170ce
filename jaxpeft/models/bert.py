"""BERT, RoBERTa, XLM-RoBERTa and ELECTRA for sequence classification: one backbone
(`jaxpeft.models.encoder`), the head each family's transformers class puts on it.

BERT (`BertForSequenceClassification`): pooler (tanh dense on `[CLS]`) -> dropout ->
`classifier`. RoBERTa and XLM-R (`RobertaClassificationHead`): no pooler; `classifier/dense`
-> tanh -> `classifier/out_proj` on `<s>`, with dropout before each. ELECTRA
(`ElectraClassificationHead`): the same with exact GELU in place of tanh; its embeddings may
be narrower than the hidden size (`embeddings_project` widens them). `num_labels == 1` is
regression: the same head with one output, followed by a fixed affine map to the label scale
(`Runtime.target_mean`/`target_std`; the identity unless set).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxpeft.models.config import EncoderConfig
from jaxpeft.models.encoder import (ACTIVATIONS, Backbone, Dense, Dropout, Runtime,
                                    refuse_foreign_leaves)
from jaxpeft.models.family import Family


class ClassificationHead(nn.Module):
    """`dropout -> dense -> activation -> dropout -> out_proj` on the first token (RoBERTa:
    tanh; ELECTRA: GELU)."""

    config: EncoderConfig
    runtime: Runtime
    activation: str = "tanh"

    @nn.compact
    def __call__(self, first_token, deterministic: bool = True):
        cfg = self.config
        act = jnp.tanh if self.activation == "tanh" else ACTIVATIONS[self.activation]
        x = Dropout(cfg.head_dropout)(first_token, deterministic=deterministic)
        x = act(Dense(cfg.hidden_size, cfg, self.runtime, name="dense")(x, deterministic))
        x = Dropout(cfg.head_dropout)(x, deterministic=deterministic)
        return Dense(cfg.num_labels, cfg, self.runtime, name="out_proj")(x, deterministic)


def finish_logits(module: nn.Module, logits, hidden, output_hidden_states: bool,
                  known_roots: set):
    """The common end of every family's classifier: float32 logits, the regression map,
    the optional hidden states, and the refusal of root leaves no hook claims."""
    # As `Dense` does for its own leaves: a method's root leaves (a soft prompt, VeRA's
    # projections) applied without its hooks is an error, not a base-model forward pass.
    refuse_foreign_leaves(module, known_roots | module.runtime.root_leaves,
                          "the root of the tree")
    logits = logits.astype(jnp.float32)
    if module.config.is_regression:
        logits = logits * module.runtime.target_std + module.runtime.target_mean
    if output_hidden_states:
        return logits, hidden.astype(jnp.float32)
    return logits


class SequenceClassifier(nn.Module):
    """BERT, RoBERTa, XLM-R or ELECTRA for sequence classification / regression.

    `__call__(input_ids, attention_mask, token_type_ids, position_ids=None,
    deterministic=True)` returns float32 logits `[batch, num_labels]`; with
    `output_hidden_states=True` it returns `(logits, last_hidden_state)`. For packed rows,
    pass `segment_ids`, `example_row` and `example_pos` (see `Backbone`): the logits are then
    per example, `[examples, num_labels]`. The backbone's parameters live under the family's
    prefix (`bert/`, `roberta/`, `electra/`) and the head under `classifier/`, as in the
    transformers checkpoints.
    """

    config: EncoderConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True, output_hidden_states: bool = False,
                 segment_ids=None, example_row=None, example_pos=None):
        cfg = self.config
        family = _FAMILIES[cfg.model_type]
        head = _HEAD_ACTIVATION[cfg.model_type]
        hidden, first, pooled = Backbone(cfg, self.runtime, add_pooling_layer=head is None,
                                         name=family.prefix)(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic,
            segment_ids, example_row, example_pos)
        if head is None:
            x = Dropout(cfg.head_dropout)(pooled, deterministic=deterministic)
            logits = Dense(cfg.num_labels, cfg, self.runtime, name="classifier")(
                x, deterministic)
        else:
            logits = ClassificationHead(cfg, self.runtime, head, name="classifier")(
                first, deterministic)
        return finish_logits(self, logits, hidden, output_hidden_states,
                             {family.prefix, "classifier"})


_TARGETS = {"query": "attention.self.query", "key": "attention.self.key",
            "value": "attention.self.value", "attention_output": "attention.output.dense",
            "intermediate": "intermediate.dense", "output": "output.dense"}

BERT = Family("bert", "bert", "BertForSequenceClassification", SequenceClassifier, _TARGETS,
              pooler="bert.pooler")
ROBERTA = Family("roberta", "roberta", "RobertaForSequenceClassification", SequenceClassifier,
                 _TARGETS)
# XLM-R is RoBERTa with a multilingual vocabulary; its checkpoints keep the `roberta.` prefix.
XLM_ROBERTA = Family("xlm-roberta", "roberta", "XLMRobertaForSequenceClassification",
                     SequenceClassifier, _TARGETS)
ELECTRA = Family("electra", "electra", "ElectraForSequenceClassification", SequenceClassifier,
                 _TARGETS)

_FAMILIES = {f.name: f for f in (BERT, ROBERTA, XLM_ROBERTA, ELECTRA)}
# The head's activation (None: BERT's pooler and linear classifier).
_HEAD_ACTIVATION = {"bert": None, "roberta": "tanh", "xlm-roberta": "tanh", "electra": "gelu"}
