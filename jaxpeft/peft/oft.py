"""OFT (Qiu et al., 2023; peft's OFT): an orthogonal rotation of each targeted layer's input.

A target `(in, out)` gets `oft_q (in / b, b(b-1)/2)`: per block of `b = --oft_block_size`
input features, the upper triangle of a skew-symmetric `Q`. The rotation of each block is
the Cayley transform `R = (I - Q)(I + Q)⁻¹`, or, as peft does by default, its Neumann series
`I + 2Q + 2Q² + ... + Qⁿ⁻¹` of `n = --oft_neumann_terms` terms (0: the exact transform). The
layer computes `(x R) W + bias` with `R` block-diagonal; jaxpeft folds `R` into the frozen
kernel (`(R W)`, b x b blocks times W), so the tokens meet one product. `Q = 0` at init
(`R = I`): the model starts as the base. The leaves keep peft's layout (`oft_R.weight`:
the upper triangles, row-major). The targets are LoRA's flag (`--lora_targets`). As in
peft, the blocks are given by their size or by their number per layer (`--oft_r`, peft's
`r`: then b = the layer's input width / r), exactly one of the two non-zero.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import DenseHook, token_matmul
from jaxpeft.peft.codec import PeftCodec
from jaxpeft.peft.lora import (check_targets, peft_target_modules, target_modules,
                               targets_of_modules)
from jaxpeft.peft.method import MethodOptions, PeftMethod, fold_into_kernels, flag, shared_flag


def check_one_of(options, label: str, **flags: str) -> None:
    """Two non-negative integer fields (`field=flag name`) of which exactly one is non-zero:
    blocks given by their size or by their number, as peft's OFT and BOFT take them."""
    for field, flag_name in flags.items():
        value = getattr(options, field)
        if not isinstance(value, int) or value < 0:
            raise JaxpeftError(f"--{flag_name} must be an integer >= 0, got {value!r}")
    if sum(getattr(options, field) != 0 for field in flags) != 1:
        names = [f"--{n}" for n in flags.values()]
        raise JaxpeftError(f"{label}: give exactly one of {names[0]} and {names[1]} (the "
                           "other 0)")


@dataclasses.dataclass(frozen=True)
class OftConfig(MethodOptions):
    """OFT options: block size (or blocks per layer), Neumann terms of the Cayley transform
    (0: exact), targets."""

    block_size: int = flag("oft_block_size", 32, "OFT: input features per orthogonal block "
                           "(must divide each target's input width; 0: set by --oft_r).")
    neumann_terms: int = flag("oft_neumann_terms", 5, "OFT: terms of the Neumann series for "
                              "the Cayley transform (peft's default 5); 0: the exact "
                              "transform.")
    targets: tuple = shared_flag("lora_targets", ("query", "value"))
    r: int = flag("oft_r", 0, "OFT: orthogonal blocks per targeted layer, instead of a block "
                  "size (peft's r; give --oft_block_size=0 with it).")
    label: ClassVar[str] = "OFT"
    added_fields: ClassVar[dict] = {"r": 0}

    def __post_init__(self):
        check_one_of(self, "OFT", block_size="oft_block_size", r="oft_r")
        if self.block_size == 1:
            raise JaxpeftError("--oft_block_size must be >= 2 (1 rotates nothing)")
        if not isinstance(self.neumann_terms, int) or self.neumann_terms < 0:
            raise JaxpeftError(f"--oft_neumann_terms must be >= 0, got {self.neumann_terms!r}")
        object.__setattr__(self, "targets", check_targets(self.targets, "OFT"))

    def block(self, fan_in: int, module: tuple) -> int:
        """The block size of a layer of `fan_in` inputs, checked to divide it."""
        b = self.block_size or fan_in // self.r
        if self.block_size and fan_in % b:
            raise JaxpeftError(f"--oft_block_size={b} does not divide the {fan_in} input "
                               f"features of {'/'.join(module)}")
        if self.r and (fan_in % self.r or b < 2):
            raise JaxpeftError(f"--oft_r={self.r} does not split the {fan_in} input features "
                               f"of {'/'.join(module)} into blocks of 2 or more")
        return b


def add_oft(params, config: OftConfig):
    """A new tree with a zero `oft_q` beside every targeted kernel."""
    flat = dict(traverse_util.flatten_dict(params))
    if any(p[-1] == "oft_q" for p in flat):
        raise JaxpeftError("these params already have OFT leaves")
    for mod in target_modules(flat, config.targets, "OFT"):
        fan_in = flat[mod + ("kernel",)].shape[0]
        b = config.block(fan_in, mod)
        flat[mod + ("oft_q",)] = jnp.zeros((fan_in // b, b * (b - 1) // 2), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def rotation(q: jax.Array, block_size: int, terms: int) -> jax.Array:
    """The `(blocks, b, b)` rotations of `q (blocks, b(b-1)/2)` (peft's `_cayley_batch`)."""
    rows, cols = np.triu_indices(block_size, 1)
    upper = jnp.zeros((q.shape[0], block_size, block_size), q.dtype).at[:, rows, cols].set(q)
    skew = upper - jnp.swapaxes(upper, -1, -2)
    eye = jnp.broadcast_to(jnp.eye(block_size, dtype=q.dtype), skew.shape)
    if terms == 0:
        # R (I + Q) = I - Q, solved for R: the exact Cayley transform.
        return jnp.swapaxes(jnp.linalg.solve(jnp.swapaxes(eye + skew, -1, -2),
                                             jnp.swapaxes(eye - skew, -1, -2)), -1, -2)
    out, power = eye, eye
    for k in range(1, terms):
        power = power @ skew
        out = out + (1.0 if k == terms - 1 and k > 1 else 2.0) * power
    return out


def rotated_kernel(kernel: jax.Array, q: jax.Array, config: OftConfig) -> jax.Array:
    """`R W` for block-diagonal `R`: each block of `b` input rows of `kernel` rotated (b from
    the number of blocks `q` holds)."""
    b = kernel.shape[0] // q.shape[0]
    r = rotation(q, b, config.neumann_terms).astype(kernel.dtype)
    blocks = kernel.reshape(r.shape[0], b, kernel.shape[-1])
    return jnp.einsum("rkc,rco->rko", r, blocks).reshape(kernel.shape)


@dataclasses.dataclass(frozen=True)
class OftHook(DenseHook):
    """Computes `x (R W) + b` in layers holding `oft_q`."""

    config: OftConfig
    leaves: tuple = ("oft_q",)

    def __call__(self, dense, x, y, kernel, bias, deterministic):
        if not dense.has_variable("params", "oft_q"):
            return y
        q = dense.get_variable("params", "oft_q").astype(y.dtype)
        return token_matmul(x, rotated_kernel(kernel, q, self.config)) + bias


class OftCodec(PeftCodec):
    """peft's OFT: `oft_R.weight` (blocks, b(b-1)/2) per target, peft's layout already."""

    peft_type = "OFT"
    markers = ("oft_R",)

    def config(self, options, family):
        return {"r": options.r, "oft_block_size": options.block_size, "module_dropout": 0.0,
                "fan_in_fan_out": False, "bias": "none", "init_weights": True, "coft": False,
                "eps": 6e-5, "block_share": False,
                "use_cayley_neumann": options.neumann_terms > 0,
                "num_cayley_neumann_terms": options.neumann_terms or 5,
                # The series as peft computes it since 0.18 (the one implemented here); peft
                # warns about adapters that do not say so.
                "peft_version": "0.18.0",
                "target_modules": peft_target_modules(options, family)}

    def options_from(self, config, modules):
        # peft (0.21) builds OFT's module_dropout layer but never applies it in the forward: read
        # and ignored here as there.
        for name in ("coft", "block_share"):
            if config.get(name):
                raise JaxpeftError(f"OFT: {name}={config[name]} is not implemented in jaxpeft")
        terms = int(config.get("num_cayley_neumann_terms", 5))
        return OftConfig(block_size=int(config.get("oft_block_size") or 0),
                         r=int(config.get("r") or 0),
                         neumann_terms=terms if config.get("use_cayley_neumann", True) else 0,
                         targets=targets_of_modules(modules, "OFT"))

    def leaf(self, path, value):
        return ("oft_R.weight", value) if path[-1] == "oft_q" else None


class Oft(PeftMethod):
    """OFT on the `--lora_targets` Dense layers; the rotations' parameters (and the head)
    train."""

    name = "oft"
    summary = "orthogonal rotation of the layer inputs in blocks (OFT, Qiu et al., 2023)"
    Options = OftConfig
    default_learning_rate = 1e-3
    codec = OftCodec()

    def requires(self, options):
        return options.targets

    def augment(self, params, options, rng):
        return add_oft(params, options)

    def rules(self, options):
        return [(r".*/oft_q", True), (".*", False)]

    def hooks(self, options):
        return (OftHook(config=options),)

    def merge(self, params, options):
        return fold_into_kernels(
            params, ("oft_q",), lambda kernel, held, _: rotated_kernel(kernel, held["oft_q"],
                                                                   options))
