"""Export to Hugging Face peft's format, for methods peft implements.

The folder `PeftModel.from_pretrained(base_model, folder)` loads:
  adapter_config.json        the method's peft config (task SEQ_CLS, head in `modules_to_save`)
  adapter_model.safetensors  `base_model.model.<transformers key>` (prompt learning:
                             `base_model.<key>`); the method names its own leaves
                             (`PeftMethod.peft_leaf`), every other trainable leaf is a plain
                             transformers tensor (the head, BERT's pooler if trained)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from flax import traverse_util

from jaxpeft.fileio import atomic_write_bytes, atomic_write_json
from jaxpeft.models.checkpoint import hf_key, hf_module_key
from jaxpeft.peft.adapters import serialize
from jaxpeft.peft.method import Peft


def fold_target(params: Any, mean: float, std: float) -> Any:
    """Folds a regression output map `std * y + mean` into the head's last layer (BERT
    `classifier`, RoBERTa `classifier/out_proj`), for models that do not apply it."""
    flat = dict(traverse_util.flatten_dict(params))
    last = ("classifier", "out_proj") if ("classifier", "out_proj", "kernel") in flat \
        else ("classifier",)
    flat[last + ("kernel",)] = flat[last + ("kernel",)] * std
    flat[last + ("bias",)] = flat[last + ("bias",)] * std + mean
    return traverse_util.unflatten_dict(flat)


def peft_tensors(peft: Peft, params: Any) -> dict[str, np.ndarray]:
    """The trainable leaves under peft's state-dict keys, in PyTorch layout."""
    tensors, prefix = {}, peft.method.peft_prefix
    for path, value in peft.trainable_leaves(params).items():
        value = value.astype(np.float32)
        own = peft.method.peft_leaf(path, value)
        if own is not None and len(path) == 1:
            key, value = own  # one of peft's own top-level tensors
        elif own is not None:
            key, value = prefix + hf_module_key(path[:-1]) + "." + own[0], own[1]
        else:
            key, value = prefix + hf_key(path), value.T if path[-1] == "kernel" else value
        tensors[key] = value
    extra = peft.method.peft_extra(params, peft.options)
    tensors.update({k: np.asarray(jax.device_get(v), np.float32) for k, v in extra.items()})
    return tensors


def peft_config_dict(peft: Peft, base_model: str, inference_mode: bool = True) -> dict:
    """peft's `adapter_config.json` for this method, options and head (task SEQ_CLS)."""
    peft.require_peft_export()
    return {"peft_type": peft.method.peft_type, "task_type": "SEQ_CLS",
            "base_model_name_or_path": base_model, **peft.method.peft_config(peft.options),
            "modules_to_save": ["classifier"] + (["pooler"] if peft.train_pooler else []),
            "inference_mode": inference_mode}


def export_peft(directory: os.PathLike, peft: Peft, params: Any, *, base_model: str,
                target: Optional[tuple] = None) -> Path:
    """Writes `params` (trained with `peft`) in Hugging Face peft's format (task SEQ_CLS).

    The classification head (and BERT's pooler, if trained) go to `modules_to_save`, so the
    PyTorch `PeftModel` reproduces our logits; a regression `target` map `(mean, std)` is
    folded into the head first.
    """
    config = peft_config_dict(peft, base_model)
    directory = Path(directory)
    if target is not None:
        params = fold_target(params, *target)
    atomic_write_bytes(directory / "adapter_model.safetensors",
                       serialize(peft_tensors(peft, params)))
    atomic_write_json(directory / "adapter_config.json", config)
    return directory
