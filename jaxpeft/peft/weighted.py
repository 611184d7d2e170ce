"""Weighted combinations of LoRA adapters: peft's `add_weighted_adapter` (`cat`, `linear`).

`combine_lora([(peft, params), ...], weights, combination)` returns one LoRA adapter over the
same base, with peft's arithmetic (scale 1: alpha = the new rank), per target module:
- `cat`: `a = [w1 s1 a1, w2 s2 a2, ...]`, `b = [b1; b2; ...]`, rank r1 + r2 + ...; the update
  is exactly `Σ wi · si · ai bi`, the weighted sum of the adapters' updates.
- `linear` (equal ranks): `a = Σ sign(wi si) sqrt|wi si| · ai`, `b = Σ sqrt|wi si| · bi`, rank r;
  the cross terms `ai bj` stay, so it is not the weighted sum of the updates (peft's
  definition, kept for parity: logits equal peft's, tested).
`si` is each adapter's own scale (alpha / r, or alpha / sqrt r with rsLoRA). PiSSA and OLoRA
adapters enter as peft shares them, plain LoRAs of rank 2r on the unchanged base.

peft refuses adapters that each carry a classification head (`modules_to_save`), which is
every sequence-classification adapter. Here the head comes from the first adapter
(`head="first"`) or is the weighted mean of the heads (`"weighted"`: `Σ wi hi / Σ wi`, a
"soup" of models trained for the same task); BERT's pooler, where trained, goes with it.
The adapters must share the base, task width, targets and regression output map.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.peft.method import Peft

COMBINATIONS = ("cat", "linear")
HEADS = ("first", "weighted")


def combine_lora(adapters: Sequence[tuple[Peft, Any]], weights: Sequence[float],
                 combination: str = "cat", head: str = "first") -> tuple[Peft, Any]:
    """`(peft, params)` of the combination (see the module docstring)."""
    if combination not in COMBINATIONS:
        raise JaxpeftError(f"combination {combination!r} is not one of: "
                           f"{', '.join(COMBINATIONS)}")
    if head not in HEADS:
        raise JaxpeftError(f"head {head!r} is not one of: {', '.join(HEADS)}")
    if len(adapters) < 1 or len(weights) != len(adapters):
        raise JaxpeftError(f"{len(adapters)} adapters and {len(weights)} weights: give one "
                           "weight per adapter")
    if any(p.name != "lora" for p, _ in adapters):
        raise JaxpeftError("only LoRA adapters combine (got "
                           f"{', '.join(sorted({p.name for p, _ in adapters}))})")
    if any(p.options.rank_pattern or p.options.alpha_pattern for p, _ in adapters):
        raise JaxpeftError("adapters with per-layer rank or alpha patterns do not combine "
                           "(jaxpeft combines LoRA adapters of one rank and alpha per layer "
                           "set)")
    if any(p.options.bias != "none" for p, _ in adapters):
        # peft's combination has no rule for trained base biases: they belong to no adapter.
        raise JaxpeftError("adapters that train base biases (--lora_bias) do not combine: "
                           "a combination of LoRA updates has no rule for them")
    plain = [p.method.codec.portable(p, params) for p, params in adapters]
    first = plain[0][0]
    for p, _ in plain[1:]:
        if p.options.targets != first.options.targets or p.train_pooler != first.train_pooler:
            raise JaxpeftError("the adapters differ in --lora_targets or --train_pooler; "
                               "combine adapters of the same layers")
    ranks = [p.options.rank for p, _ in plain]
    if combination == "linear" and len(set(ranks)) > 1:
        raise JaxpeftError(f"linear combination needs equal ranks, got {ranks} (use cat)")
    rank = sum(ranks) if combination == "cat" else ranks[0]
    flats = [dict(traverse_util.flatten_dict(params)) for _, params in plain]
    trainable = [traverse_util.flatten_dict(p.mask(params)) for p, params in plain]
    out = dict(flats[0])
    for path in [p for p in out if p[-1] == "lora_a"]:
        mod = path[:-1]
        parts = [(f[mod + ("lora_a",)], f[mod + ("lora_b",)], w * p.options.scale)
                 for f, w, (p, _) in zip(flats, weights, plain)]
        if combination == "cat":
            out[mod + ("lora_a",)] = jnp.concatenate([a * c for a, _, c in parts], axis=1)
            out[mod + ("lora_b",)] = jnp.concatenate([b for _, b, _ in parts], axis=0)
        else:
            out[mod + ("lora_a",)] = sum(a * (math.copysign(math.sqrt(abs(c)), c))
                                         for a, _, c in parts)
            out[mod + ("lora_b",)] = sum(b * math.sqrt(abs(c)) for _, b, c in parts)
    heads = [p for p, m in trainable[0].items() if m and p[-1] not in ("lora_a", "lora_b")]
    for path in heads:
        shapes = {f[path].shape for f in flats}
        if len(shapes) > 1:
            raise JaxpeftError(f"{'/'.join(path)}: the adapters' heads differ in shape "
                               f"{sorted(shapes)}; combine adapters of one task")
        if head == "weighted":
            total = sum(weights)
            if total == 0:
                raise JaxpeftError("--head=weighted needs weights that do not sum to 0")
            out[path] = sum(f[path] * w for f, w in zip(flats, weights)) / total
    options = dataclasses.replace(first.options, rank=rank, alpha=float(rank),
                                  use_rslora=False, init="default")
    return dataclasses.replace(first, options=options), traverse_util.unflatten_dict(out)


def combine_adapter_folders(folders: Sequence[Any], weights: Sequence[float], output: Any, *,
                            combination: str = "cat", head: str = "first",
                            model: Any = None) -> Any:
    """Loads adapter (or run) folders over their base, combines them and writes the result
    as a jaxpeft adapter folder (usable by `predict` and `load_adapter`)."""
    from pathlib import Path

    from jaxpeft.data import get_task
    from jaxpeft.models import load_pretrained
    from jaxpeft.peft.adapters import (find_adapter, load_adapter, read_adapter_config,
                                       save_adapter)

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise JaxpeftError(f"{output}: --output exists and is not an empty folder; choose a "
                           "new folder (nothing there is replaced)")
    found = [find_adapter(f) for f in folders]
    tasks = {s["task"] for _, s in found}
    bases = {s["model"] for _, s in found}
    if len(tasks) > 1 or (model is None and len(bases) > 1):
        raise JaxpeftError(f"the adapters are for different tasks ({', '.join(sorted(tasks))}) "
                           f"or bases ({', '.join(sorted(bases))}); combine adapters of one "
                           "task on one base")
    targets = {json_target(read_adapter_config(folder)) for folder, _ in found}
    if len(targets) > 1:
        raise JaxpeftError("the adapters have different regression output maps "
                           "(--standardize_targets); they cannot share one head")
    task = get_task(tasks.pop())
    pre = load_pretrained(model or bases.pop(), num_labels=task.num_labels, warn_fresh=False)
    loaded = [load_adapter(folder, pre, check_base_name=model is None) for folder, _ in found]
    peft, params = combine_lora([(p, params) for _, params, p in loaded], weights,
                                combination, head)
    target = targets.pop()
    return save_adapter(output, peft, params, base_model=model or found[0][1]["model"],
                        config=pre.config, target=target, run=found[0][1])


def json_target(meta: dict):
    """The `(mean, std)` regression map of an adapter.json, or None."""
    t = meta.get("target")
    return None if not t else (float(t["mean"]), float(t["std"]))


def combine_cli(folders: list, weights: list, output: str, combination: str, head: str,
                model: Any) -> int:
    """`combine_adapter_folders` for the command line: user errors are one `error:` line."""
    from jaxpeft.cli import run_command

    def work() -> None:
        try:
            values = [float(w) for w in weights]
        except ValueError:
            raise JaxpeftError(f"--weights: {','.join(weights)} are not numbers") from None
        out = combine_adapter_folders(folders, values, output, combination=combination,
                                      head=head, model=model)
        print(f"wrote the combined LoRA adapter {out} (predict with: python -m "
              f"experiments.predict --run={out} --input=...)")

    return run_command(work)
