"""LoHa (Hyeon-Woo et al., 2022, FedPara; peft's LOHA): a Hadamard product of two low-rank
updates per targeted Dense layer.

Beside each `--lora_targets` kernel `(in, out)` the tree gets `loha_u1`, `loha_u2`
`(in, r)` and `loha_v1`, `loha_v2` `(r, out)`; the layer adds `x @ ΔW` with
`ΔW = (u1 @ v1) ⊙ (u2 @ v2) · alpha / r`, so a rank-r pair reaches rank r² updates. peft's
initialisation: `u1`, `v1`, `v2` Kaiming-uniform (bound 1/sqrt(fan_in) of peft's layout),
`u2 = 0`, so the model starts equal to the base. The rank, alpha and targets are LoRA's
flags (`--lora_rank`, `--lora_alpha`, `--lora_targets`, and the per-layer
`--lora_rank_pattern`, `--lora_alpha_pattern`). peft's training-time dropouts are
`--rank_dropout` (each output column of ΔW dropped, the kept ones rescaled by the inverse of
the kept fraction) and `--module_dropout` (the layer's whole update skipped), both drawn
afresh per layer and step, as peft does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import DenseHook, token_matmul
from jaxpeft.peft.codec import PeftCodec
from jaxpeft.peft.lora import (check_targets, peft_target_modules, target_modules,
                               targets_of_modules)
from jaxpeft.peft.method import (MethodOptions, PeftMethod, RankPatterns, flag,
                                 fold_into_kernels, shared_flag)

LEAVES = ("loha_u1", "loha_v1", "loha_u2", "loha_v2")


@dataclasses.dataclass(frozen=True)
class LohaConfig(RankPatterns, MethodOptions):
    """LoHa options: rank r of each factor pair, alpha (scale alpha / r), targets, peft's
    rank and module dropout."""

    rank: int = shared_flag("lora_rank", 8)
    alpha: float = shared_flag("lora_alpha", 16.0)
    targets: tuple = shared_flag("lora_targets", ("query", "value"))
    rank_dropout: float = flag("rank_dropout", 0.0, "LoHa, LoKr: in training, the probability "
                               "of dropping each output column of a layer's update (peft's "
                               "rank_dropout).")
    module_dropout: float = flag("module_dropout", 0.0, "LoHa, LoKr: in training, the "
                                 "probability of skipping a layer's whole update (peft's "
                                 "module_dropout; OFT's is read on import and, as in peft, "
                                 "not applied).")
    rank_pattern: tuple = shared_flag("lora_rank_pattern", ())
    alpha_pattern: tuple = shared_flag("lora_alpha_pattern", ())
    label: ClassVar[str] = "LoHa"
    added_fields: ClassVar[dict] = {"rank_dropout": 0.0, "module_dropout": 0.0,
                                    "rank_pattern": (), "alpha_pattern": ()}

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise JaxpeftError(f"{self.label} rank must be a positive integer, got "
                               f"{self.rank!r}")
        if self.alpha <= 0:
            raise JaxpeftError(f"{self.label} alpha must be > 0, got {self.alpha}")
        check_dropouts(self)
        self.check_patterns()
        object.__setattr__(self, "targets", check_targets(self.targets, self.label))


def check_dropouts(options) -> None:
    """peft's LyCORIS dropouts are probabilities in [0, 1)."""
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(options, name)
        if not 0.0 <= value < 1.0:
            raise JaxpeftError(f"{options.label}: --{name} must be in [0, 1), got {value}")


def lycoris_dropout(dense, delta, options, rescale: bool, deterministic: bool):
    """ΔW `(in, out)` after peft's training-time dropouts: each output column kept with
    probability `1 − rank_dropout` (the kept ones multiplied by the inverse of the kept
    fraction when `rescale`; none kept gives a zero update where peft divides by zero), then
    the whole update kept with probability `1 − module_dropout`. Keys come from the layer's
    `dropout` stream, so every layer and step draws afresh."""
    if deterministic or not (options.rank_dropout or options.module_dropout):
        return delta
    rank_key, module_key = jax.random.split(dense.make_rng("dropout"))
    if options.rank_dropout:
        keep = (jax.random.uniform(rank_key, (delta.shape[1],)) > options.rank_dropout)
        keep = keep.astype(delta.dtype)
        if rescale:
            kept = keep.mean()
            keep = jnp.where(kept > 0, keep / jnp.where(kept > 0, kept, 1), 0)
        delta = delta * keep
    if options.module_dropout:
        delta = delta * (jax.random.uniform(module_key) > options.module_dropout).astype(
            delta.dtype)
    return delta


def _uniform(key, shape, fan_in):
    bound = 1.0 / math.sqrt(fan_in)  # torch's kaiming_uniform_(a=sqrt(5))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def add_loha(params, config: LohaConfig, rng: jax.Array):
    """A new tree with LoHa's four factors beside every targeted kernel."""
    flat = dict(traverse_util.flatten_dict(params))
    if any(p[-1] in LEAVES for p in flat):
        raise JaxpeftError("these params already have LoHa leaves")
    for i, mod in enumerate(target_modules(flat, config.targets, "LoHa")):
        fan_in, fan_out = flat[mod + ("kernel",)].shape
        r = config.rank_for(mod)
        keys = jax.random.split(jax.random.fold_in(rng, i), 3)
        # peft's hada_w1_b (r, in) has fan-in `in`; hada_w1_a, hada_w2_a (out, r) have r.
        flat[mod + ("loha_u1",)] = _uniform(keys[0], (fan_in, r), fan_in)
        flat[mod + ("loha_v1",)] = _uniform(keys[1], (r, fan_out), r)
        flat[mod + ("loha_u2",)] = jnp.zeros((fan_in, r), jnp.float32)
        flat[mod + ("loha_v2",)] = _uniform(keys[2], (r, fan_out), r)
    return traverse_util.unflatten_dict(flat)


def loha_delta(u1, v1, u2, v2, scale):
    """`ΔW (in, out) = (u1 @ v1) ⊙ (u2 @ v2) · scale`."""
    return (u1 @ v1) * (u2 @ v2) * scale


@dataclasses.dataclass(frozen=True)
class LohaHook(DenseHook):
    """Computes `x @ (W + ΔW) + b` in layers holding LoHa leaves: ΔW is formed (in x out)
    once per call, as peft does, and folded into the frozen kernel, so the layer runs one
    product over the tokens and one input-gradient product, not two of each (XLA drops the
    base output `y`); ΔW's gradient is `xᵀ dy` either way."""

    config: LohaConfig
    leaves: tuple = LEAVES

    def __call__(self, dense, x, y, kernel, bias, deterministic):
        if not dense.has_variable("params", "loha_u1"):
            return y
        u1, v1, u2, v2 = (dense.get_variable("params", n).astype(y.dtype) for n in LEAVES)
        scale = self.config.scale_for(tuple(dense.scope.path))
        delta = loha_delta(u1, v1, u2, v2, jnp.asarray(scale, y.dtype))
        delta = lycoris_dropout(dense, delta, self.config, True, deterministic)
        return token_matmul(x, kernel + delta) + bias


class LohaCodec(PeftCodec):
    """peft's LOHA: `hada_w1_a` (out, r), `hada_w1_b` (r, in), `hada_w2_a`, `hada_w2_b`."""

    peft_type = "LOHA"
    markers = ("hada_",)
    NAMES = {"loha_u1": "hada_w1_b", "loha_v1": "hada_w1_a", "loha_u2": "hada_w2_b",
             "loha_v2": "hada_w2_a"}

    def config(self, options, family):
        return {"r": options.rank, "alpha": options.alpha,
                "rank_dropout": options.rank_dropout, "module_dropout": options.module_dropout,
                "use_effective_conv2d": False, "init_weights": True,
                "target_modules": peft_target_modules(options, family),
                **options.peft_patterns()}

    def options_from(self, config, modules):
        return LohaConfig(rank=int(config["r"]), alpha=float(config["alpha"]),
                          **RankPatterns.from_peft(config),
                          targets=targets_of_modules(modules, "LoHa"),
                          rank_dropout=float(config.get("rank_dropout") or 0.0),
                          module_dropout=float(config.get("module_dropout") or 0.0))

    def leaf(self, path, value):
        return (self.NAMES[path[-1]], value.T) if path[-1] in self.NAMES else None


class Loha(PeftMethod):
    """LoHa on the `--lora_targets` Dense layers; its four factors (and the head) train."""

    name = "loha"
    summary = "Hadamard product of two low-rank updates (LoHa, Hyeon-Woo et al., 2022)"
    Options = LohaConfig
    default_learning_rate = 1e-3
    codec = LohaCodec()

    def requires(self, options):
        return options.targets

    def augment(self, params, options, rng):
        return add_loha(params, options, rng)

    def rules(self, options):
        return [(r".*/loha_[uv][12]", True), (".*", False)]

    def hooks(self, options):
        return (LohaHook(options),)

    def merge(self, params, options):
        return fold_into_kernels(params, LEAVES, lambda kernel, held, module: kernel + loha_delta(
            *(held[n] for n in LEAVES), options.scale_for(module)))
