"""Adapter files: the trainable leaves of a run together with the method that made them.

A jaxpeft adapter is a folder with:
  adapter.safetensors   every trainable leaf (head included), keyed by Flax path `a/b/c`
  adapter.json          the method and all its options (`Peft.to_dict`), base model name and
                        architecture, num_labels, a regression head's output map

Weights and options are always written and read together: `load_adapter` rebuilds the method
from `adapter.json` and installs its forward-pass hooks, so an adapter never runs with a
default scale or without its method.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.fileio import (atomic_write_bytes, atomic_write_json, read_json_object,
                            read_safetensors_file)
from jaxpeft.models.checkpoint import Pretrained
from jaxpeft.models.bert import SequenceClassifier
from jaxpeft.peft.masks import path_str
from jaxpeft.peft.method import Peft
from jaxpeft.peft.registry import peft_from_dict

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
FORMAT = "jaxpeft-adapter/2"
# The config fields that fix the parameter shapes: an adapter only fits a base that agrees.
_ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "intermediate_size", "max_position_embeddings",
                "type_vocab_size")


def serialize(tensors: dict[str, np.ndarray]) -> bytes:
    """safetensors bytes of numpy tensors (contiguous copies where needed)."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def save_adapter(directory: os.PathLike, peft: Peft, params: Any, *, base_model: str,
                 config, target: Optional[tuple] = None, run: Optional[dict] = None) -> Path:
    """Writes the trainable leaves of `params` (per `peft.mask`) and their description.

    `target` is `(mean, std)` of a regression head's output map (`Runtime.target_mean`,
    `target_std`), stored so the adapter predicts the same values when loaded; `run` holds
    what using the adapter needs to know of its training run (task, sequence length).
    """
    directory = Path(directory)
    tensors = {path_str(p): v for p, v in peft.trainable_leaves(params).items()}
    meta = {
        "format": FORMAT, "peft": peft.to_dict(), "base_model": base_model,
        "target": None if target is None else {"mean": float(target[0]), "std": float(target[1])},
        "num_labels": config.num_labels,
        "architecture": {k: getattr(config, k) for k in _ARCH_FIELDS},
        "num_parameters": int(sum(v.size for v in tensors.values())),
        "run": run or {},
    }
    # Weights first, description last: a folder with adapter.json is always complete.
    atomic_write_bytes(directory / ADAPTER_WEIGHTS, serialize(tensors))
    atomic_write_json(directory / ADAPTER_CONFIG, meta)
    return directory


def read_adapter_config(directory: os.PathLike) -> dict:
    """The parsed `adapter.json` of an adapter folder."""
    cfg_file = Path(directory) / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise JaxpeftError(f"{directory}: no {ADAPTER_CONFIG}; not a jaxpeft adapter folder")
    meta = read_json_object(cfg_file, "adapter description")
    if meta.get("format") != FORMAT or not isinstance(meta.get("peft"), dict):
        raise JaxpeftError(f"{cfg_file}: not a {FORMAT} adapter description")
    missing = [k for k in ("base_model", "num_labels", "architecture") if k not in meta]
    if missing:
        raise JaxpeftError(f"{cfg_file}: missing {', '.join(missing)}; the file is incomplete")
    return meta


def _check_base(directory, meta: dict, pre: Pretrained, check_base_name: bool) -> None:
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


def read_adapter_weights(directory: os.PathLike) -> dict[str, np.ndarray]:
    """`{path "a/b/c": array}`: the trainable leaves an adapter folder holds."""
    return read_safetensors_file(Path(directory) / ADAPTER_WEIGHTS)


def load_adapter(directory: os.PathLike, pre: Pretrained, check_base_name: bool = True
                 ) -> tuple[SequenceClassifier, Any, Peft]:
    """Puts a saved adapter onto a loaded base model: `(model, params, peft)`.

    The method and its options come from `adapter.json`; its leaves are added to
    `pre.params` and overwritten with the saved values, and the model gets the method's
    hooks (LoRA's saved scale and dropout). Refuses an adapter made for another
    architecture, `num_labels` or (unless `check_base_name=False`) another base model name.
    """
    meta = read_adapter_config(directory)
    _check_base(directory, meta, pre, check_base_name)
    peft = peft_from_dict(meta["peft"])
    model = pre.model
    if meta.get("target"):
        model = model.clone(runtime=dataclasses.replace(
            model.runtime, target_mean=meta["target"]["mean"], target_std=meta["target"]["std"]))
    model, params = peft.init(model, pre.params, jax.random.key(0))  # values overwritten below
    mask = traverse_util.flatten_dict(peft.mask(params))
    saved = read_adapter_weights(directory)
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
    return model, traverse_util.unflatten_dict(flat), peft


def find_adapter(run: Union[str, os.PathLike]) -> tuple[Path, dict]:
    """`(adapter folder, run settings)` of a run folder (its best/) or an adapter folder;
    the settings (`task`, `max_seq_length`, `model`) come from the adapter or the run's
    config.json."""
    run = Path(run)
    folder = run / "best" if (run / "best" / ADAPTER_CONFIG).is_file() else run
    if not (folder / ADAPTER_CONFIG).is_file():
        raise JaxpeftError(f"{run}: neither a run folder with best/{ADAPTER_CONFIG} nor an "
                           "adapter folder")
    meta = read_adapter_config(folder)
    settings = dict(meta.get("run") or {})
    run_config = folder.parent / "config.json"
    if run_config.is_file():  # adapters written before they stored their task
        saved = json.loads(run_config.read_text())["run"]
        for key in ("task", "max_seq_length", "model"):
            settings.setdefault(key, saved[key])
    settings.setdefault("model", meta["base_model"])
    return folder, settings
