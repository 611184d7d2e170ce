"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from jaxpeft.peft.method import PeftMethod


class Full(PeftMethod):
    """Every leaf is trainable; nothing is added to the tree."""

    name = "full"
    summary = "train every parameter"
    default_learning_rate = 2e-5

    def rules(self, options):
        return [(".*", True)]
