"""The PEFT method registry: one trainable-mask function per method."""

from __future__ import annotations

from typing import Any

from jaxpeft.errors import JaxpeftError
from jaxpeft.peft.bitfit import bitfit_mask
from jaxpeft.peft.lora import lora_mask
from jaxpeft.peft.masks import full_mask

METHODS = ("full", "lora", "bitfit")


def trainable_mask(params: Any, method: str, train_pooler: bool = False) -> Any:
    """Bool tree of trainable leaves for `method` ("full", "lora" or "bitfit").

    The head is always trainable; `train_pooler` also trains BERT's pooler (a choice that
    departs from peft's default counts). For "lora", call `add_lora` first.
    """
    if method == "full":
        return full_mask(params)
    if method == "lora":
        return lora_mask(params, train_pooler)
    if method == "bitfit":
        return bitfit_mask(params, train_pooler)
    raise JaxpeftError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
