"""Import of adapters saved by Hugging Face peft (PyTorch) for encoder sequence
classification: `adapter_config.json` + `adapter_model.safetensors`, head in
`modules_to_save`.

The method comes from the config (`PeftCodec.matches`; LoRA, DoRA, IA3, LN-tuning and
prompt tuning import), its options from the config and from the modules the tensors sit in
(`PeftCodec.options_from`). The tensors are placed by running the export's own naming
(`hf_export.peft_items`) on index arrays: each element of each of our trainable leaves learns
its peft key and position, so import is the exact inverse of export, with no second naming
rule to keep in step. Every key peft saved must be used and every trainable leaf filled.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.fileio import read_json_object, read_safetensors_file
from jaxpeft.models import Pretrained, SequenceClassifier
from jaxpeft.models.registry import get_family
from jaxpeft.peft.hf_export import peft_items
from jaxpeft.peft.method import Peft
from jaxpeft.peft.registry import METHODS

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _markers() -> str:
    """Regex of the names the registered codecs give their own tensors
    (`PeftCodec.markers`)."""
    return "|".join(sorted({re.escape(m) for method in METHODS.values() if method.codec
                            for m in method.codec.markers}))


def _module_paths(keys, family) -> set:
    """Our module paths of the peft keys that sit in encoder layers or in the family's
    pretrained pooler (found by the method tensors' names, `_markers`)."""
    prefix = family.prefix
    pooler = rf"|{re.escape(family.module_name('pooler'))}" if family.pooler else ""
    module_key = re.compile(r"base_model\.model\.(.*\.layers?\.\d+\.[^.]+(?:\.[^.]+)*?"
                            rf"{pooler})\.({_markers()})")
    modules = set()
    for key in keys:
        m = module_key.match(key)
        if m:
            parts = re.sub(r"(layers?)\.(\d+)", r"\1_\2", m.group(1)).split(".")
            if parts[0] != prefix:
                raise JaxpeftError(f"adapter tensor {key} is for a {parts[0]} model, the base "
                                   f"is {prefix}")
            modules.add(tuple(parts))
    return modules


def import_peft(directory: os.PathLike, pre: Pretrained) -> tuple[SequenceClassifier, Any, Peft]:
    """`(model, params, peft)` of a peft adapter folder on the loaded base `pre` (loaded with
    the adapter's number of labels), as `load_adapter` returns for jaxpeft's own files."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise JaxpeftError(f"{directory}: not a peft adapter folder ({CONFIG} and {WEIGHTS})")
    config = read_json_object(directory / CONFIG, "peft adapter config")
    if config.get("task_type") != "SEQ_CLS":
        raise JaxpeftError(f"{directory / CONFIG}: task_type {config.get('task_type')!r}; "
                           "jaxpeft imports sequence-classification adapters (SEQ_CLS)")
    method = next((m for m in METHODS.values() if m.codec and m.codec.matches(config)), None)
    if method is None:
        supported = sorted({m.codec.peft_type for m in METHODS.values() if m.codec})
        raise JaxpeftError(f"{directory / CONFIG}: peft_type {config.get('peft_type')!r} has no "
                           f"jaxpeft method (peft types here: {', '.join(supported)})")
    saved = method.codec.saved_tensors(config, read_safetensors_file(directory / WEIGHTS))
    family = get_family(pre.config.model_type)
    options = method.codec.options_from(config, _module_paths(saved, family))
    # A trained pooler saves its weight; LoRA's bias="all" saves the pooler's bias alone, and
    # a pooler target its method tensors.
    method_tensor = re.compile(rf"\.(?:{_markers()})")
    train_pooler = any(".pooler." in k and k.endswith(".weight")
                       and not method_tensor.search(k) for k in saved)
    peft = Peft(method, options, train_pooler)
    model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    flat = dict(traverse_util.flatten_dict(params))
    mask = traverse_util.flatten_dict(peft.mask(params))
    trainable = {p: np.arange(flat[p].size).reshape(flat[p].shape) for p, m in mask.items() if m}
    placed = peft_items(peft, trainable)
    missing, unexpected = sorted(set(placed) - set(saved)), sorted(set(saved) - set(placed))
    if missing or unexpected:
        raise JaxpeftError(f"{directory}: the {method.name} adapter's tensors do not fit this "
                           f"base; was it made for another base model? (missing: {missing[:3]}, "
                           f"unexpected: {unexpected[:3]})")
    for key, (path, where) in placed.items():
        value = saved[key]
        if value.shape != where.shape:
            raise JaxpeftError(f"{directory}: {key} has shape {tuple(value.shape)}, this base "
                               f"needs {tuple(where.shape)}; the adapter was made for another "
                               "base model")
        leaf = np.empty(flat[path].size, np.float32)
        leaf[where.reshape(-1)] = value.reshape(-1)
        flat[path] = jax.numpy.asarray(leaf.reshape(flat[path].shape))
    return model, traverse_util.unflatten_dict(flat), peft


def convert_peft_adapter(peft_dir: os.PathLike, model: str, task: str, output: os.PathLike,
                         max_seq_length: int = 128) -> Path:
    """Imports a peft adapter for `task` on base `model` and writes it as a jaxpeft adapter
    folder (`adapter.json` + `adapter.safetensors`), usable by `load_adapter` and
    `experiments/predict.py`."""
    from jaxpeft.data import get_task
    from jaxpeft.models import load_pretrained
    from jaxpeft.peft.adapters import save_adapter

    spec = get_task(task)
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        # An adapter folder of a run (its best/) or anything else: never written over.
        raise JaxpeftError(f"{output}: --output exists and is not an empty folder; choose a "
                           "new folder (nothing there is replaced)")
    pre = load_pretrained(model, num_labels=spec.num_labels, tokenizer=False)
    _, params, peft = import_peft(peft_dir, pre)
    return save_adapter(output, peft, params, base_model=model, config=pre.config,
                        run={"task": spec.name, "max_seq_length": max_seq_length})


def convert_cli(peft_dir: str, model: str, task: str, output: str, max_seq_length: int) -> int:
    """`convert_peft_adapter` for the command line: user errors are one `error:` line."""
    from jaxpeft.cli import run_command

    def work() -> None:
        out = convert_peft_adapter(peft_dir, model, task, output, max_seq_length)
        print(f"wrote the jaxpeft adapter {out} (predict with: python -m experiments.predict "
              f"--run={out} --input=...)")

    return run_command(work)
