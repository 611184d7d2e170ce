"""Trainable masks from path predicates, parameter counts, and trainable/frozen splitting.

A mask is a tree of Python bools with the params' structure, built from `(regex, bool)`
rules matched against `"a/b/kernel"`-style paths: the first rule that matches a leaf decides,
and a leaf no rule matches is an error, so every parameter is accounted for. `partition` is
the one place the mask splits a tree: the train step differentiates the trainable half only.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

Rules = Sequence[tuple[str, bool]]


def path_str(path: tuple) -> str:
    """`("bert", "encoder", "layer_0", ...)` -> `"bert/encoder/layer_0/..."`."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def mask_from_rules(params: Any, rules: Rules) -> Any:
    """A tree of rule values (bools for masks): for each leaf, the value of the first rule
    whose regex fully matches."""
    compiled = [(re.compile(pattern), value) for pattern, value in rules]
    flat = traverse_util.flatten_dict(params)
    mask, uncovered = {}, []
    for path in flat:
        name = path_str(path)
        value = next((v for rx, v in compiled if rx.fullmatch(name)), None)
        if value is None:
            uncovered.append(name)
        mask[path] = value
    if uncovered:
        raise ValueError(f"no rule covers these parameters: {', '.join(uncovered)}")
    return traverse_util.unflatten_dict(mask)


def head_rules(family, train_pooler: bool = False) -> list[tuple[str, bool]]:
    """Rules making the family's classification head (and optionally its pretrained pooler)
    trainable: the head trains in every method, as peft's `modules_to_save`."""
    pooler = family.pooler_regex()
    return [(family.head_regex(), True)] + ([(pooler, True)] if train_pooler and pooler else [])


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Total and trainable parameter counts, and the trainable share in percent."""

    total: int
    trainable: int

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        """`{"total", "trainable", "percent"}` for JSON files."""
        return {"total": self.total, "trainable": self.trainable, "percent": self.percent}

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}")


def count_params(params: Any, mask: Any = None) -> ParamCounts:
    """Counts all parameters and those marked trainable in `mask` (all, if no mask)."""
    sizes = jax.tree.map(lambda p: int(np.prod(p.shape)), params)
    total = sum(jax.tree.leaves(sizes))
    if mask is None:
        return ParamCounts(total, total)
    trainable = sum(s for s, m in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask)) if m)
    return ParamCounts(total, trainable)


def partition(params: Any, mask: Any) -> tuple[Any, Any]:
    """Splits params into `(trainable, frozen)` trees with `None` in the other's places.

    `None` is an empty pytree node, so gradients, optimizer state and updates over the
    trainable tree simply have nothing for frozen leaves.
    """
    trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of `partition`: one full params tree."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                        is_leaf=lambda x: x is None)
