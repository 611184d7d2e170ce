"""LoKr (Edalati et al., 2022, KronA; LyCORIS; peft's LOKR): a Kronecker product update per
targeted Dense layer.

A layer `out x in` is split as `out = a·b`, `in = c·d` (each the divisor pair nearest its
square root, or by `--lokr_decompose_factor`); the update is `ΔW = (w1 ⊗ w2) · alpha / r`
with `w1 (a, c)` and `w2 (b, d)`. `w2` is the low-rank product `w2_a (b, r) @ w2_b (r, d)`
where r is under half its larger side, else a full matrix; `w1` likewise with
`--lokr_decompose_both`, else full. The leaves keep peft's names and layout (`lokr_w1`,
`lokr_w1_a`, `lokr_w1_b`, `lokr_w2`, `lokr_w2_a`, `lokr_w2_b`, each `(rows, cols)` of
peft's `(out, in)` orientation); the layer adds `x @ ΔWᵀ`. peft's initialisation: `w1` (or
`w1_a`) zeros, the rest Kaiming-uniform, so the model starts as the base. Rank, alpha and
targets are LoRA's flags (`--lora_rank`, `--lora_alpha`, `--lora_targets`); peft's
training-time dropouts LoHa's (`--rank_dropout`, `--module_dropout`), the kept columns
rescaled only with `--lokr_rank_dropout_scale`, as in peft.
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
from jaxpeft.peft.loha import check_dropouts, lycoris_dropout
from jaxpeft.peft.lora import (check_targets, peft_target_modules, target_modules,
                               targets_of_modules)
from jaxpeft.peft.method import (MethodOptions, PeftMethod, RankPatterns, flag,
                                 fold_into_kernels, shared_flag)

LEAVES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def kron_factors(dim: int, factor: int = -1) -> tuple[int, int]:
    """`(m, n)` with `m · n = dim`: `(factor, dim // factor)` when `factor` divides `dim`;
    otherwise the divisor pair where the divisors, walked upwards, first pass the square root
    (`m <= n`), none over `factor` (-1: no bound). peft's `factorization`, which LoKr's
    shapes depend on."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m = 1
    for d in range(2, dim + 1):
        if m >= dim // m:
            break
        if dim % d:
            continue
        if d > limit:
            break
        m = d
    return min(m, dim // m), max(m, dim // m)


@dataclasses.dataclass(frozen=True)
class LokrConfig(RankPatterns, MethodOptions):
    """LoKr options: rank r of the low-rank factors, alpha (scale alpha / r), targets, whether
    the first factor is low-rank too, the split factor, peft's rank and module dropout."""

    rank: int = shared_flag("lora_rank", 8)
    alpha: float = shared_flag("lora_alpha", 16.0)
    targets: tuple = shared_flag("lora_targets", ("query", "value"))
    decompose_both: bool = flag("lokr_decompose_both", False, "LoKr: make the first Kronecker "
                                "factor low-rank too (where the rank is under half its side).")
    decompose_factor: int = flag("lokr_decompose_factor", -1, "LoKr: split each dimension "
                                 "into this factor and the rest (-1: the divisors nearest "
                                 "its square root).")
    rank_dropout: float = shared_flag("rank_dropout", 0.0)
    module_dropout: float = shared_flag("module_dropout", 0.0)
    rank_dropout_scale: bool = flag("lokr_rank_dropout_scale", False, "LoKr: rescale the "
                                    "columns --rank_dropout keeps by the inverse of the kept "
                                    "fraction (peft's rank_dropout_scale; LoHa always does).")
    rank_pattern: tuple = shared_flag("lora_rank_pattern", ())
    alpha_pattern: tuple = shared_flag("lora_alpha_pattern", ())
    label: ClassVar[str] = "LoKr"
    added_fields: ClassVar[dict] = {"rank_dropout": 0.0, "module_dropout": 0.0,
                                    "rank_dropout_scale": False, "rank_pattern": (),
                                    "alpha_pattern": ()}

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise JaxpeftError(f"LoKr rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise JaxpeftError(f"LoKr alpha must be > 0, got {self.alpha}")
        check_dropouts(self)
        self.check_patterns()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise JaxpeftError(f"--lokr_decompose_factor must be > 0 or -1, got "
                               f"{self.decompose_factor}")
        object.__setattr__(self, "targets", check_targets(self.targets, "LoKr"))

    def shapes(self, fan_in: int, fan_out: int, r: int) -> dict:
        """`{leaf: shape}` of one `fan_in x fan_out` layer of rank r (peft's rules)."""
        (a, b), (c, d) = (kron_factors(fan_out, self.decompose_factor),
                          kron_factors(fan_in, self.decompose_factor))
        out = ({"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
               if self.decompose_both and r < max(a, c) / 2 else {"lokr_w1": (a, c)})
        out.update({"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)} if r < max(b, d) / 2
                   else {"lokr_w2": (b, d)})
        return out


def _uniform(key, shape):
    bound = 1.0 / math.sqrt(shape[1])  # torch's kaiming_uniform_(a=sqrt(5)) on (rows, fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def add_lokr(params, config: LokrConfig, rng: jax.Array):
    """A new tree with LoKr's factors beside every targeted kernel."""
    flat = dict(traverse_util.flatten_dict(params))
    if any(p[-1] in LEAVES for p in flat):
        raise JaxpeftError("these params already have LoKr leaves")
    for i, mod in enumerate(target_modules(flat, config.targets, "LoKr")):
        fan_in, fan_out = flat[mod + ("kernel",)].shape
        shapes = config.shapes(fan_in, fan_out, config.rank_for(mod))
        keys = jax.random.split(jax.random.fold_in(rng, i), len(shapes))
        for key, (name, shape) in zip(keys, shapes.items()):
            zero = name in ("lokr_w1", "lokr_w1_a")  # the update starts at 0
            flat[mod + (name,)] = jnp.zeros(shape, jnp.float32) if zero else _uniform(key, shape)
    return traverse_util.unflatten_dict(flat)


def lokr_delta(leaves: dict, scale) -> jax.Array:
    """`ΔW` of one layer in our `(in, out)` orientation: `(w1 ⊗ w2)ᵀ · scale`."""
    w1 = leaves["lokr_w1"] if "lokr_w1" in leaves else leaves["lokr_w1_a"] @ leaves["lokr_w1_b"]
    w2 = leaves["lokr_w2"] if "lokr_w2" in leaves else leaves["lokr_w2_a"] @ leaves["lokr_w2_b"]
    return jnp.kron(w1, w2).T * scale


@dataclasses.dataclass(frozen=True)
class LokrHook(DenseHook):
    """Computes `x @ (W + ΔW) + b` in layers holding LoKr leaves: ΔW formed once per call,
    as peft does, and folded into the frozen kernel (one product over the tokens, as
    `LohaHook`)."""

    config: LokrConfig
    leaves: tuple = LEAVES

    def __call__(self, dense, x, y, kernel, bias, deterministic):
        held = {n: dense.get_variable("params", n).astype(y.dtype) for n in LEAVES
                if dense.has_variable("params", n)}
        if not held:
            return y
        scale = self.config.scale_for(tuple(dense.scope.path))
        delta = lokr_delta(held, jnp.asarray(scale, y.dtype))
        delta = lycoris_dropout(dense, delta, self.config, self.config.rank_dropout_scale,
                                deterministic)
        return token_matmul(x, kernel + delta) + bias


class LokrCodec(PeftCodec):
    """peft's LOKR: the leaves under their own names, in peft's layout already."""

    peft_type = "LOKR"
    markers = ("lokr_",)

    def config(self, options, family):
        return {"r": options.rank, "alpha": options.alpha,
                "rank_dropout": options.rank_dropout, "module_dropout": options.module_dropout,
                "use_effective_conv2d": False, "decompose_both": options.decompose_both,
                "decompose_factor": options.decompose_factor,
                "rank_dropout_scale": options.rank_dropout_scale,
                "init_weights": True, "target_modules": peft_target_modules(options, family),
                **options.peft_patterns()}

    def options_from(self, config, modules):
        return LokrConfig(rank=int(config["r"]), alpha=float(config["alpha"]),
                          **RankPatterns.from_peft(config),
                          targets=targets_of_modules(modules, "LoKr"),
                          decompose_both=bool(config.get("decompose_both")),
                          decompose_factor=int(config.get("decompose_factor", -1)),
                          rank_dropout=float(config.get("rank_dropout") or 0.0),
                          module_dropout=float(config.get("module_dropout") or 0.0),
                          rank_dropout_scale=bool(config.get("rank_dropout_scale")))

    def leaf(self, path, value):
        return (path[-1], value) if path[-1] in LEAVES else None


class Lokr(PeftMethod):
    """LoKr on the `--lora_targets` Dense layers; its Kronecker factors (and the head) train."""

    name = "lokr"
    summary = "Kronecker product of a small and a low-rank factor (LoKr, Edalati et al., 2022)"
    Options = LokrConfig
    default_learning_rate = 1e-3
    codec = LokrCodec()

    def requires(self, options):
        return options.targets

    def augment(self, params, options, rng):
        return add_lokr(params, options, rng)

    def rules(self, options):
        return [(r".*/lokr_w[12](_[ab])?", True), (".*", False)]

    def hooks(self, options):
        return (LokrHook(options),)

    def merge(self, params, options):
        return fold_into_kernels(
            params, LEAVES, lambda kernel, held, module: kernel + lokr_delta(
                held, options.scale_for(module)))
