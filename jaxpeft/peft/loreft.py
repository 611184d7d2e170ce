"""LoReFT (Wu et al., 2024, "ReFT: Representation Finetuning"): low-rank interventions on
the hidden states between layers, at a few token positions.

For every layer in `--reft_layers` the tree gets, under the root leaf `loreft/layer_<i>/`,
`rotation (hidden, r)`, `weight (hidden, r)` and `bias (r,)` with r = `--reft_rank`. After
that layer, the hidden state h of each intervened token becomes

    Φ(h) = h + (h W + b − h R) Rᵀ

(the paper's `h + Rᵀ(W h + b − R h)` with row vectors), where R (hidden × r) has orthonormal
columns: the Q factor of `rotation`'s QR decomposition with the signs of R's diagonal made
positive (the paper's orthogonality constraint as a parametrisation; pyreft uses torch's
`orthogonal` parametrisation of the same R). Only the edit `R Rᵀ`-projected onto an
r-dimensional subspace changes h. Intervened tokens: the first `--reft_first` and the last
`--reft_last` real tokens of every example (the paper's prefix and suffix positions; with
BERT-like heads reading the first token, `--reft_first=1` edits what the head sees); packed
rows find each example's ends from the block-diagonal mask, so packing stays exact.

Initialisation: `rotation` standard normal (so R is a random orthonormal basis), `weight`
and `bias` as torch's `nn.Linear(hidden, r)`, so, as in pyreft, the model does not start as
the base. No peft format exists (pyreft saves PyTorch modules): the adapter files hold the
leaves above, `rotation` as the unconstrained parameter. Nothing to merge: the edit depends
on the hidden state and on the position.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import LayerHook, token_offsets
from jaxpeft.models.registry import family_of_params
from jaxpeft.peft.method import MethodOptions, PeftMethod, flag

ROOT = "loreft"


@dataclasses.dataclass(frozen=True)
class LoreftConfig(MethodOptions):
    """LoReFT options: rank, intervened positions (first and last tokens of each example)
    and layers (empty: all)."""

    rank: int = flag("reft_rank", 4, "LoReFT: rank r of each intervention.")
    first: int = flag("reft_first", 1, "LoReFT: intervene on the first N tokens of every "
                      "example.")
    last: int = flag("reft_last", 0, "LoReFT: intervene on the last N tokens of every example.")
    layers: tuple = flag("reft_layers", (), "LoReFT: the layers intervened after (0-based "
                         "indices; empty: every layer).")
    label: ClassVar[str] = "LoReFT"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise JaxpeftError(f"--reft_rank must be a positive integer, got {self.rank!r}")
        for name in ("first", "last"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise JaxpeftError(f"--reft_{name} must be an integer >= 0, got {value!r}")
        if self.first + self.last == 0:
            raise JaxpeftError("LoReFT intervenes on no token: set --reft_first or --reft_last")
        try:
            layers = tuple(int(x) for x in self.layers)
        except (TypeError, ValueError):
            raise JaxpeftError(f"--reft_layers must be layer indices, got {self.layers!r}") \
                from None
        if any(i < 0 for i in layers):
            raise JaxpeftError(f"--reft_layers must be >= 0, got {list(layers)}")
        object.__setattr__(self, "layers", tuple(sorted(set(layers))))


def orthonormal(rotation: jax.Array) -> jax.Array:
    """R (hidden × r) with orthonormal columns from the unconstrained `rotation`: QR's Q with
    the signs that make R's diagonal positive (unique, so the map is smooth)."""
    q, r = jnp.linalg.qr(rotation)
    return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class LoreftHook(LayerHook):
    """Applies `Φ(h) = h + (h W + b − h R) Rᵀ` after each intervened layer, at the first
    `first` and last `last` tokens of every example."""

    first: int
    last: int
    root_leaves: tuple = (ROOT,)

    def __call__(self, layers, layer, x, mask):
        table = layers.scope.root.get_variable("params", ROOT)
        own = table.get(f"layer_{layer}") if table is not None else None
        if own is None:
            return x
        r = orthonormal(own["rotation"]).astype(x.dtype)
        w, b = own["weight"].astype(x.dtype), own["bias"].astype(x.dtype)
        edit = (x @ w + b - x @ r) @ r.T
        from_start, to_end = token_offsets(mask, x.shape[1])
        chosen = (from_start < self.first) | (to_end < self.last)
        return jnp.where(chosen[..., None], x + edit, x)


def _hidden_and_layers(params) -> tuple[int, int]:
    """`(hidden size, number of layers)` of a tree's encoder."""
    family = family_of_params(params)
    flat = traverse_util.flatten_dict(params, sep="/")
    layers = {m.group(0) for p in flat if (m := re.match(family.layer_regex, p))}
    hidden = next(v.shape[0] for p, v in flat.items()
                  if re.fullmatch(family.target_regex("query") + "/kernel", p))
    return hidden, len(layers)


class Loreft(PeftMethod):
    """LoReFT interventions between layers; their leaves (and the head) train."""

    name = "loreft"
    summary = ("low-rank interventions on the hidden states at a few positions (LoReFT, Wu "
               "et al., 2024)")
    Options = LoreftConfig
    default_learning_rate = 1e-3
    mergeable = False

    def requires(self, options):
        return ("layer_hooks",)

    def augment(self, params, options, rng):
        hidden, num_layers = _hidden_and_layers(params)
        layers = options.layers or tuple(range(num_layers))
        if max(layers) >= num_layers:
            raise JaxpeftError(f"--reft_layers {list(layers)}: the model has {num_layers} "
                               "layers")
        bound = 1.0 / math.sqrt(hidden)  # torch's nn.Linear(hidden, r)
        table = {}
        for i in layers:
            k0, k1, k2 = jax.random.split(jax.random.fold_in(rng, i), 3)
            table[f"layer_{i}"] = {
                "rotation": jax.random.normal(k0, (hidden, options.rank), jnp.float32),
                "weight": jax.random.uniform(k1, (hidden, options.rank), jnp.float32,
                                             -bound, bound),
                "bias": jax.random.uniform(k2, (options.rank,), jnp.float32, -bound, bound)}
        return {**params, ROOT: table}

    def rules(self, options):
        return [(f"{ROOT}/.*", True), (".*", False)]

    def hooks(self, options):
        return (LoreftHook(options.first, options.last),)

    def merge(self, params, options):
        raise JaxpeftError("loreft: an intervention depends on the hidden state and its "
                           "position; there are no weights to merge it into")
