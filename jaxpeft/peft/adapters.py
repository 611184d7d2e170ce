"""Adapter files (the trainable leaves only) and export of LoRA to Hugging Face peft.

jaxpeft format, a folder with:
  adapter.safetensors   every trainable leaf (head included), keyed by Flax path `a/b/c`
  adapter.json          method, its options, base model name and architecture, num_labels

peft format (LoRA only), loadable with `PeftModel.from_pretrained(base_model, folder)`:
  adapter_config.json        peft's LoraConfig (task SEQ_CLS, head in `modules_to_save`)
  adapter_model.safetensors  `base_model.model.<transformers key>`, LoRA as lora_A/lora_B
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.fileio import atomic_write_bytes, atomic_write_json
from jaxpeft.models.checkpoint import Pretrained, hf_key, hf_module_key
from jaxpeft.peft.lora import LoraConfig, add_lora, lora_model, peft_target_modules
from jaxpeft.peft.masks import path_str
from jaxpeft.peft.methods import METHODS, trainable_mask

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
FORMAT = "jaxpeft-adapter/1"
# The config fields that fix the parameter shapes: an adapter only fits a base that agrees.
_ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "intermediate_size", "max_position_embeddings",
                "type_vocab_size")


def _serialize(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def save_adapter(directory: os.PathLike, params: Any, mask: Any, *, method: str,
                 base_model: str, config, lora: Optional[LoraConfig] = None,
                 train_pooler: bool = False, target: Optional[tuple] = None) -> Path:
    """Writes the trainable leaves of `params` (per `mask`) and their description.

    `target` is `(mean, std)` of a regression head's output map (`Runtime.target_mean`,
    `target_std`), stored so the adapter predicts the same values when loaded.
    """
    directory = Path(directory)
    flat = traverse_util.flatten_dict(jax.device_get(params))
    flat_mask = traverse_util.flatten_dict(mask)
    tensors = {path_str(p): np.asarray(v) for p, v in flat.items() if flat_mask[p]}
    meta = {
        "format": FORMAT, "method": method,
        "lora": lora.to_dict() if lora is not None else None,
        "train_pooler": train_pooler, "base_model": base_model,
        "target": None if target is None else {"mean": float(target[0]), "std": float(target[1])},
        "num_labels": config.num_labels,
        "architecture": {k: getattr(config, k) for k in _ARCH_FIELDS},
        "num_parameters": int(sum(v.size for v in tensors.values())),
    }
    # Weights first, description last: a folder with adapter.json is always complete.
    atomic_write_bytes(directory / ADAPTER_WEIGHTS, _serialize(tensors))
    atomic_write_json(directory / ADAPTER_CONFIG, meta)
    return directory


def read_adapter_config(directory: os.PathLike) -> dict:
    """The parsed `adapter.json` of an adapter folder."""
    cfg_file = Path(directory) / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise JaxpeftError(f"{directory}: no {ADAPTER_CONFIG}; not a jaxpeft adapter folder")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT or meta.get("method") not in METHODS:
        raise JaxpeftError(f"{cfg_file}: not a {FORMAT} adapter description")
    return meta


def load_adapter(directory: os.PathLike, pre: Pretrained, check_base_name: bool = True):
    """Puts a saved adapter onto a freshly loaded base model.

    Returns `(model, params)`: for LoRA the model carries the saved scale and dropout.
    Refuses an adapter made for another architecture, `num_labels` or (unless
    `check_base_name=False`) another base model name.
    """
    from safetensors.numpy import load_file

    meta = read_adapter_config(directory)
    arch = {k: getattr(pre.config, k) for k in _ARCH_FIELDS}
    if meta["architecture"] != arch:
        diff = {k: (meta["architecture"].get(k), v) for k, v in arch.items()
                if meta["architecture"].get(k) != v}
        raise JaxpeftError(f"{directory}: adapter was made for another architecture "
                           f"(adapter vs base: {diff})")
    if meta["num_labels"] != pre.config.num_labels:
        raise JaxpeftError(f"{directory}: adapter has num_labels={meta['num_labels']}, the "
                           f"base model was loaded with num_labels={pre.config.num_labels}")
    if check_base_name and meta["base_model"] not in (pre.name_or_path, str(pre.path)):
        raise JaxpeftError(f"{directory}: adapter was trained on base model "
                           f"{meta['base_model']!r}, not {pre.name_or_path!r} (pass "
                           "check_base_name=False if they are the same weights)")
    model, params = pre.model, pre.params
    if meta.get("target"):
        model = model.clone(runtime=dataclasses.replace(
            model.runtime, target_mean=meta["target"]["mean"], target_std=meta["target"]["std"]))
    lora = LoraConfig.from_dict(meta["lora"]) if meta["lora"] else None
    if lora is not None:
        params = add_lora(params, lora, jax.random.key(0))  # values are overwritten below
        model = lora_model(model, lora)
    mask = traverse_util.flatten_dict(trainable_mask(params, meta["method"], meta["train_pooler"]))
    saved = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    flat = dict(traverse_util.flatten_dict(params))
    expected = {path_str(p) for p, m in mask.items() if m}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise JaxpeftError(f"{directory}: adapter leaves do not fit this base model "
                           f"(missing: {missing[:5]}, unexpected: {extra[:5]})")
    for path in flat:
        name = path_str(path)
        if name in saved:
            if saved[name].shape != flat[path].shape:
                raise JaxpeftError(f"{directory}: {name} has shape {saved[name].shape}, the "
                                   f"base model expects {flat[path].shape}")
            flat[path] = jnp.asarray(saved[name])
    return model, traverse_util.unflatten_dict(flat)


def fold_target(params: Any, mean: float, std: float) -> Any:
    """Folds a regression output map `std * y + mean` into the head's last layer (BERT
    `classifier`, RoBERTa `classifier/out_proj`), for models that do not apply it."""
    flat = dict(traverse_util.flatten_dict(params))
    last = ("classifier", "out_proj") if ("classifier", "out_proj", "kernel") in flat \
        else ("classifier",)
    flat[last + ("kernel",)] = flat[last + ("kernel",)] * std
    flat[last + ("bias",)] = flat[last + ("bias",)] * std + mean
    return traverse_util.unflatten_dict(flat)


def export_peft(directory: os.PathLike, params: Any, mask: Any, lora: LoraConfig, *,
                base_model: str, train_pooler: bool = False,
                target: Optional[tuple] = None) -> Path:
    """Writes a LoRA adapter in Hugging Face peft's format (task SEQ_CLS).

    The classification head (and BERT's pooler, if trained) go to `modules_to_save`, so the
    PyTorch `PeftModel` reproduces our logits; a regression `target` map `(mean, std)` is
    folded into the head first.
    """
    directory = Path(directory)
    if target is not None:
        params = fold_target(params, *target)
    flat = traverse_util.flatten_dict(jax.device_get(params))
    flat_mask = traverse_util.flatten_dict(mask)
    tensors = {}
    for path, value in flat.items():
        if not flat_mask[path]:
            continue
        value = np.asarray(value, np.float32)
        if path[-1] in ("lora_a", "lora_b"):
            # ours: a (in, r), b (r, out); peft: lora_A.weight (r, in), lora_B.weight (out, r)
            key = hf_module_key(path[:-1]) + {"lora_a": ".lora_A.weight",
                                              "lora_b": ".lora_B.weight"}[path[-1]]
            value = value.T
        else:
            key = hf_key(path)
            value = value.T if path[-1] == "kernel" else value
        tensors["base_model.model." + key] = value
    peft_config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "use_rslora": lora.use_rslora, "target_modules": peft_target_modules(lora),
        "modules_to_save": ["classifier"] + (["pooler"] if train_pooler else []),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True,
    }
    atomic_write_bytes(directory / "adapter_model.safetensors", _serialize(tensors))
    atomic_write_json(directory / "adapter_config.json", peft_config)
    return directory
