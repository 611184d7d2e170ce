"""BitFit (Ben Zaken et al., 2021): train only the biases, plus the classification head.

Every `.../bias` leaf of the encoder (attention, feed-forward, LayerNorm, embeddings
LayerNorm, pooler) is trainable; the classifier is trainable as in every method.
"""

from __future__ import annotations

from typing import Any

from jaxpeft.peft.masks import head_rules, mask_from_rules


def bitfit_mask(params: Any, train_pooler: bool = False) -> Any:
    """Trainable mask for BitFit: biases and the head."""
    return mask_from_rules(params, head_rules(train_pooler) + [(r".*/bias", True), (".*", False)])
