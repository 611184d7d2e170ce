"""BitFit (Ben Zaken et al., 2021): train only the biases, plus the classification head.

Every `.../bias` leaf of the encoder (attention, feed-forward, LayerNorm, embeddings
LayerNorm, pooler) is trainable; the classifier is trainable as in every method. Nothing is
added to the tree, so there is nothing to merge; peft has no BitFit, so no peft export.
"""

from __future__ import annotations

from jaxpeft.peft.method import PeftMethod


class BitFit(PeftMethod):
    """Biases (and the head) train; everything else is frozen."""

    name = "bitfit"
    summary = "train the biases (Ben Zaken et al., 2021)"
    default_learning_rate = 1e-3

    def requires(self, options):
        return ("biases",)

    def rules(self, options):
        return [(r".*/bias", True), (".*", False)]
