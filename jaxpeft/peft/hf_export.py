"""Export to Hugging Face peft's format, for methods peft implements, and of merged weights
as a plain transformers model folder (`export_merged`), for any method that merges.

The folder `PeftModel.from_pretrained(base_model, folder)` loads:
  adapter_config.json        the method's peft config (task SEQ_CLS, head in `modules_to_save`)
  adapter_model.safetensors  `base_model.model.<transformers key>` (prompt learning:
                             `base_model.<key>`); the method names its own leaves
                             (`PeftCodec.leaf`), every other trainable leaf is a plain
                             transformers tensor (the head, BERT's pooler if trained)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.fileio import atomic_write_bytes, atomic_write_json
from jaxpeft.models.checkpoint import hf_key, hf_module_key
from jaxpeft.models.family import Family
from jaxpeft.models.registry import family_of_params, get_family
from jaxpeft.peft.adapters import serialize
from jaxpeft.peft.method import Peft


def _output_layer(flat: dict) -> tuple:
    """The head's last layer: RoBERTa's `classifier/out_proj`, BERT's `classifier`."""
    return ("classifier", "out_proj") if ("classifier", "out_proj", "kernel") in flat \
        else ("classifier",)


def fold_target(params: Any, mean: float, std: float) -> Any:
    """Folds a regression output map `std * y + mean` into the head's last layer (BERT
    `classifier`, RoBERTa `classifier/out_proj`), for models that do not apply it."""
    flat = dict(traverse_util.flatten_dict(params))
    last = _output_layer(flat)
    flat[last + ("kernel",)] = flat[last + ("kernel",)] * std
    flat[last + ("bias",)] = flat[last + ("bias",)] * std + mean
    return traverse_util.unflatten_dict(flat)


def peft_items(peft: Peft, leaves: dict) -> dict[str, tuple]:
    """`{peft key: (our path, value in peft's layout)}` for `{path: value}` leaves.

    A trained bias of an adapted layer (LoRA's `bias` option) is `<module>.base_layer.bias`:
    peft wraps the layer, and the base layer holds its bias."""
    codec = peft.method.codec
    items, prefix = {}, codec.prefix
    own = {path: codec.leaf(path, value) for path, value in leaves.items()}
    adapted = {path[:-1] for path, o in own.items() if o is not None and len(path) > 1}
    for path, value in leaves.items():
        if own[path] is not None and len(path) == 1:
            key, value = own[path]  # one of peft's own top-level tensors
        elif own[path] is not None:
            key, value = prefix + hf_module_key(path[:-1]) + "." + own[path][0], own[path][1]
        elif path[-1] == "bias" and path[:-1] in adapted:
            key = prefix + hf_module_key(path[:-1]) + ".base_layer.bias"
        else:
            key, value = prefix + hf_key(path), value.T if path[-1] == "kernel" else value
        items[key] = (path, value)
    return items


def peft_tensors(peft: Peft, params: Any) -> dict[str, np.ndarray]:
    """The trainable leaves under peft's state-dict keys, in PyTorch layout."""
    leaves = {p: v.astype(np.float32) for p, v in peft.trainable_leaves(params).items()}
    tensors = {key: value for key, (_, value) in peft_items(peft, leaves).items()}
    extra = peft.method.codec.extra(params, peft.options)
    tensors.update({k: np.asarray(jax.device_get(v), np.float32) for k, v in extra.items()})
    return tensors


def peft_config_dict(peft: Peft, base_model: str, family: Family,
                     inference_mode: bool = True, config: Any = None) -> dict:
    """peft's `adapter_config.json` for this method, options and head (task SEQ_CLS) on a
    model of `family` (`config`: the base's `EncoderConfig`, for what peft cannot read from
    every family's config)."""
    peft.require_peft_export()
    codec = peft.method.codec
    pooler = [family.pooler.rsplit(".", 1)[-1]] if peft.train_pooler and family.pooler else []
    from_model = codec.model_fields(config) if config is not None else {}
    return {"peft_type": codec.peft_type, "task_type": "SEQ_CLS",
            "base_model_name_or_path": base_model, **codec.config(peft.options, family),
            **from_model,
            "modules_to_save": list(family.head) + pooler, "inference_mode": inference_mode}


def export_peft(directory: os.PathLike, peft: Peft, params: Any, *, base_model: str,
                target: Optional[tuple] = None, config: Any = None) -> Path:
    """Writes `params` (trained with `peft`) in Hugging Face peft's format (task SEQ_CLS).

    The classification head (and BERT's pooler, if trained) go to `modules_to_save`, so the
    PyTorch `PeftModel` reproduces our logits; a regression `target` map `(mean, std)` is
    folded into the head first. `config`, the base model's `EncoderConfig`, supplies what
    peft cannot read from every family's transformers config (a soft prompt's width and
    depth on DistilBERT and ELECTRA).
    """
    peft, params = peft.method.codec.portable(peft, params) if peft.method.codec else (
        peft, params)
    adapter_config = peft_config_dict(peft, base_model, family_of_params(params), config=config)
    directory = Path(directory)
    if target is not None:
        params = fold_target(params, *target)
    tensors, adapter_config = peft.method.codec.as_saved(peft_tensors(peft, params),
                                                         adapter_config)
    atomic_write_bytes(directory / "adapter_model.safetensors", serialize(tensors))
    atomic_write_json(directory / "adapter_config.json", adapter_config)
    return directory


def export_merged(directory: os.PathLike, peft: Peft, params: Any, *, base_dir: os.PathLike,
                  tokenizer, label_names: Optional[tuple] = None,
                  target: Optional[tuple] = None) -> Path:
    """Writes `params` with the method merged into the weights as a plain Hugging Face
    `*ForSequenceClassification` folder (config.json, model.safetensors, tokenizer files),
    which `AutoModelForSequenceClassification.from_pretrained` loads without peft.

    The base folder's config.json is kept, with the classification architecture, the label
    names (`id2label`) and, for regression, `problem_type`; a regression `target` map is
    folded into the head.
    """
    if not peft.method.mergeable:
        raise JaxpeftError(f"--export_merged: {peft.name} cannot be merged into the weights")
    directory = Path(directory)
    merged = peft.method.merge(params, peft.options)
    if target is not None:
        merged = fold_target(merged, *target)
    flat = traverse_util.flatten_dict(jax.device_get(merged))
    state = {hf_key(p): np.asarray(v.T if p[-1] == "kernel" else v, np.float32)
             for p, v in flat.items()}
    config = json.loads((Path(base_dir) / "config.json").read_text())
    config["architectures"] = [get_family(config["model_type"]).hf_class]
    num_labels = flat[_output_layer(flat) + ("bias",)].shape[0]
    names = label_names or [f"LABEL_{i}" for i in range(num_labels)]
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    config["problem_type"] = ("regression" if num_labels == 1
                              else "single_label_classification")
    atomic_write_bytes(directory / "model.safetensors", serialize(state))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    atomic_write_json(directory / "config.json", config)  # last: the folder is complete
    return directory
