"""LN-tuning (Qi et al., 2022): only the LayerNorm scales and biases (and the head) train.

Nothing is added to the tree and there is nothing to merge. peft's LN_TUNING trains a copy of
each `LayerNorm` (`<module>.ln_tuning_layers.weight/bias`), which the export writes.
"""

from __future__ import annotations

import re

from jaxpeft.models.registry import backbone_prefixes, norm_regex
from jaxpeft.peft.codec import PeftCodec
from jaxpeft.peft.method import NoOptions, PeftMethod


class LnTuningCodec(PeftCodec):
    """peft's LN_TUNING: a trained copy of each LayerNorm (`ln_tuning_layers`)."""

    peft_type = "LN_TUNING"
    markers = ("ln_tuning_layers",)

    def options_from(self, config, modules):
        return NoOptions()

    def config(self, options, family):
        return {"target_modules": family.peft_norms or list(family.norms)}

    def leaf(self, path, value):
        # Norms of the backbone only: one in the head (ModernBERT's head/norm) is saved with
        # the head (`modules_to_save`) under its plain name.
        if len(path) > 1 and path[0] in backbone_prefixes() and re.fullmatch(norm_regex(),
                                                                             path[-2]):
            return f"ln_tuning_layers.{'weight' if path[-1] == 'scale' else 'bias'}", value
        return None


class LnTuning(PeftMethod):
    """Every LayerNorm's scale and bias (embeddings and each layer's two) train."""

    name = "ln_tuning"
    summary = "train the LayerNorm scales and biases (Qi et al., 2022)"
    default_learning_rate = 1e-3
    codec = LnTuningCodec()

    def rules(self, options):
        return [(rf".*/{norm_regex()}/(scale|bias)", True), (".*", False)]
