"""VeRA (Kopiczko et al., 2024): one pair of frozen random matrices shared by all targeted
layers, and two trained vectors per layer.

The tree gets, once at its root, `vera_A` (r, in_max) and `vera_B` (out_max, r), Kaiming-
uniform from `projection_seed` (peft's layout and init; regenerated from the seed, so adapter
files need not hold them), and beside each `--lora_targets` kernel `vera_lambda_d` (r,),
initialised to 0.1, and `vera_lambda_b` (out,), zeros, so training starts at the base model.
A layer adds `lambda_b ⊙ ((lambda_d ⊙ (dropout(x) A[:, :in]ᵀ)) B[:out]ᵀ)`. `--vera_rank`
(default 256) sets r; the targets and dropout are LoRA's flags, `--lora_targets` and
`--lora_dropout`. The peft export writes the projections
too (`save_projection=True`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import DenseHook, Dropout, per_token, token_matmul
from jaxpeft.peft.lora import check_targets, peft_target_modules, target_modules
from jaxpeft.peft.codec import PeftCodec
from jaxpeft.peft.method import MethodOptions, PeftMethod, fold_into_kernels, flag, shared_flag

D_INITIAL = 0.1  # peft's and the paper's initial lambda_d


@dataclasses.dataclass(frozen=True)
class VeraConfig(MethodOptions):
    """VeRA options: rank r of the shared projections, targets, dropout, projection seed."""

    rank: int = flag("vera_rank", 256, "VeRA rank r of the shared random projections.")
    targets: tuple = shared_flag("lora_targets", ("query", "value"))
    dropout: float = shared_flag("lora_dropout", 0.0)
    projection_seed: int = 0
    label: ClassVar[str] = "VeRA"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise JaxpeftError(f"VeRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise JaxpeftError(f"VeRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", check_targets(self.targets, "VeRA"))


@dataclasses.dataclass(frozen=True)
class VeraHook(DenseHook):
    """VeRA's low-rank update in layers holding `vera_lambda_d`."""

    dropout: float
    leaves: tuple = ("vera_lambda_d", "vera_lambda_b")
    root_leaves: tuple = ("vera_A", "vera_B")

    def __call__(self, dense, x, y, kernel, bias, deterministic):
        if not dense.has_variable("params", "vera_lambda_d"):
            return y
        root = dense.scope.root  # the shared projections live once, at the tree's root
        a = root.get_variable("params", "vera_A")[:, :x.shape[-1]].astype(y.dtype)
        b = root.get_variable("params", "vera_B")[:y.shape[-1]].astype(y.dtype)
        get = lambda name: dense.get_variable("params", name)  # noqa: E731
        h = Dropout(self.dropout)(x, deterministic=deterministic)
        down = token_matmul(h, a.T)
        down = per_token(get("vera_lambda_d"), down) * down
        up = token_matmul(down, b.T)
        return y + per_token(get("vera_lambda_b"), up) * up


def _kaiming_uniform(key, shape):
    # torch's kaiming_uniform_(fan_in, gain sqrt(2)) on a (rows, fan_in) matrix, as peft
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class VeraCodec(PeftCodec):
    """peft's VERA: `vera_lambda_d`/`vera_lambda_b` per target, the projections at the top
    (`save_projection`); no import (peft draws them from torch's generator)."""

    peft_type = "VERA"

    def config(self, options, family):
        return {"r": options.rank, "target_modules": peft_target_modules(options, family),
                "projection_prng_key": options.projection_seed, "save_projection": True,
                "vera_dropout": options.dropout, "d_initial": D_INITIAL,
                "fan_in_fan_out": False, "bias": "none"}

    def leaf(self, path, value):
        return (path[-1], value) if path[-1] in ("vera_lambda_d", "vera_lambda_b") else None

    def options_from(self, config, modules):
        raise JaxpeftError("importing peft VeRA adapters is not supported: their shared "
                           "projections come from torch's random generator, ours from JAX's")

    def extra(self, params, options):
        return {"base_model.vera_A": params["vera_A"], "base_model.vera_B": params["vera_B"]}


class Vera(PeftMethod):
    """Shared frozen projections; per-layer `vera_lambda_d`/`vera_lambda_b` (and the head)
    train."""

    name = "vera"
    summary = "shared frozen random projections, trained scaling vectors (Kopiczko et al., 2024)"
    Options = VeraConfig
    default_learning_rate = 4e-3
    codec = VeraCodec()

    def requires(self, options):
        return options.targets

    def augment(self, params, options, rng):
        flat = dict(traverse_util.flatten_dict(params))
        modules = target_modules(flat, options.targets, "VeRA")
        shapes = [flat[m + ("kernel",)].shape for m in modules]
        key_a, key_b = jax.random.split(jax.random.key(options.projection_seed))
        flat[("vera_A",)] = _kaiming_uniform(key_a, (options.rank, max(s[0] for s in shapes)))
        flat[("vera_B",)] = _kaiming_uniform(key_b, (max(s[1] for s in shapes), options.rank))
        for mod, (_, fan_out) in zip(modules, shapes):
            flat[mod + ("vera_lambda_d",)] = jnp.full((options.rank,), D_INITIAL, jnp.float32)
            flat[mod + ("vera_lambda_b",)] = jnp.zeros((fan_out,), jnp.float32)
        return traverse_util.unflatten_dict(flat)

    def rules(self, options):
        return [(r".*/vera_lambda_(b|d)", True), (".*", False)]

    def hooks(self, options):
        return (VeraHook(dropout=options.dropout),)

    def merge(self, params, options):
        params = dict(params)
        a, b = params.pop("vera_A"), params.pop("vera_B")

        def fold(kernel, held, module):
            d, lb = held["vera_lambda_d"], held["vera_lambda_b"]
            return kernel + (a[:, :kernel.shape[0]].T * d) @ b[:kernel.shape[1]].T * lb

        return fold_into_kernels(params, ("vera_lambda_d", "vera_lambda_b"), fold)
