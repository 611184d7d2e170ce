"""BOFT (Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization"; peft's BOFT): each target's input is rotated by a product of block-diagonal
orthogonal matrices interleaved by butterfly permutations, and its output columns scaled.

Beside each `--lora_targets` kernel `(in, out)` the tree gets `boft_r` `(m, blocks, b, b)`
(peft's `boft_R`, m = `--boft_n_butterfly_factor`) and `boft_s` `(out,)` (peft's `boft_s`).
Factor i turns each `b × b` block R into the orthogonal Cayley transform `(I − S)(I + S)⁻¹` of
its skew part `S = (R − Rᵀ)/2`, lays the blocks along the diagonal (`BD_i`) and conjugates by
the i-th butterfly permutation (`P_i BD_i P_iᵀ`, peft's `block_butterfly_perm`); the rotation
is `M = M_{m−1} ⋯ M_1 M_0`, and the layer computes `((x M) W) ⊙ s + bias`, which is folded
into the frozen kernel as `(M W) ⊙ s`. `R = 0`, `s = 1` at init: the model starts as the
base. Block size `--boft_block_size` (or the number of blocks, `--boft_block_num`; exactly one
of them non-zero, as peft requires). `--boft_dropout` is peft's multiplicative dropout: in
each training step and layer, one butterfly factor drawn at random has that fraction of its
blocks (rounded down) replaced by the identity.

peft runs butterfly factors above 1 only with its CUDA extension; without it (any CPU) it
silently builds one factor, so an export with m > 1 loads in peft only where that extension
builds. The tests compare m = 1 with peft itself (counts, export, logits, gradients, import,
merge) and m = 2 with the rotation peft's own helpers (`block_butterfly_perm`, `perm2mat`,
`cayley_batch`) build from the same `boft_R`.
"""

from __future__ import annotations

import dataclasses
import functools
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
from jaxpeft.peft.oft import check_one_of

LEAVES = ("boft_r", "boft_s")


@dataclasses.dataclass(frozen=True)
class BoftConfig(MethodOptions):
    """BOFT options: the block size or the number of blocks (one of them 0), the number of
    butterfly factors, targets."""

    block_size: int = flag("boft_block_size", 4, "BOFT: size of each orthogonal block (0: "
                           "set by --boft_block_num).")
    block_num: int = flag("boft_block_num", 0, "BOFT: number of orthogonal blocks per factor "
                          "(0: set by --boft_block_size).")
    butterfly_factors: int = flag("boft_n_butterfly_factor", 1, "BOFT: butterfly factors in "
                                  "the rotation (1: block-diagonal OFT with output scales).")
    dropout: float = flag("boft_dropout", 0.0, "BOFT: in training, the fraction of the blocks "
                          "of one randomly chosen butterfly factor set to the identity "
                          "(peft's multiplicative boft_dropout).")
    targets: tuple = shared_flag("lora_targets", ("query", "value"))
    label: ClassVar[str] = "BOFT"
    added_fields: ClassVar[dict] = {"dropout": 0.0}

    def __post_init__(self):
        check_one_of(self, "BOFT", block_size="boft_block_size", block_num="boft_block_num")
        if not 0.0 <= self.dropout < 1.0:
            raise JaxpeftError(f"--boft_dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.butterfly_factors, int) or self.butterfly_factors < 1:
            raise JaxpeftError("--boft_n_butterfly_factor must be a positive integer, got "
                               f"{self.butterfly_factors!r}")
        object.__setattr__(self, "targets", check_targets(self.targets, "BOFT"))

    def blocks(self, fan_in: int) -> tuple[int, int]:
        """`(number of blocks, block size)` for a layer of `fan_in` inputs, with peft's
        checks."""
        f = self.butterfly_factors - 1
        if self.block_num:
            if fan_in % self.block_num:
                raise JaxpeftError(f"BOFT: {fan_in} inputs are not divisible by "
                                   f"--boft_block_num={self.block_num}")
            if f and (f > int(np.log2(self.block_num)) or self.block_num % 2 ** f):
                raise JaxpeftError(f"BOFT: --boft_block_num={self.block_num} does not allow "
                                   f"{self.butterfly_factors} butterfly factors")
            num, size = self.block_num, fan_in // self.block_num
        else:
            if fan_in % (self.block_size * 2 ** f):
                raise JaxpeftError(f"BOFT: {fan_in} inputs do not fit --boft_block_size="
                                   f"{self.block_size} with {self.butterfly_factors} "
                                   "butterfly factors")
            num, size = fan_in // self.block_size, self.block_size
        if f and (num % 2 or size % 2):
            raise JaxpeftError(f"BOFT: butterfly factors need an even number of blocks and an "
                               f"even block size (got {num} blocks of {size})")
        return num, size


@functools.lru_cache(maxsize=None)
def butterfly_perm(n: int, blocks: int, half: int, factors: int) -> np.ndarray:
    """peft's `block_butterfly_perm(n, blocks, half, factors)`: the identity without butterfly
    factors; else, within each group of `n // blocks` entries, runs of `half` taken in the
    order of the even-numbered runs, then the odd-numbered ones."""
    if factors == 0:
        return np.arange(n)
    if blocks * half * 2 > n:
        raise JaxpeftError("BOFT: invalid number of blocks for the butterfly permutation")
    group = n // blocks
    runs = np.concatenate([np.arange(0, group / half, 2), np.arange(1, group / half, 2)])
    order = np.concatenate([np.arange(int(p * half), int(p * half + half)) for p in runs])
    return np.concatenate([start + order for start in range(0, n, group)])


def identity_blocks(key: jax.Array, factors: int, num: int, rate: float) -> jax.Array:
    """peft's multiplicative dropout as a `(factors, num)` mask: in one factor drawn at
    random, `int(rate · num)` of its blocks drawn at random (True: use the identity)."""
    factor_key, block_key = jax.random.split(key)
    chosen = jax.random.randint(factor_key, (), 0, factors)
    blocks = jax.random.permutation(block_key, num) < int(rate * num)
    return (jnp.arange(factors)[:, None] == chosen) & blocks[None, :]


def rotation(boft_r: jax.Array, config: BoftConfig, drop_key=None) -> jax.Array:
    """The `(in, in)` rotation M of one layer's `boft_r` `(m, blocks, b, b)`; with
    `drop_key`, `--boft_dropout`'s blocks replaced by the identity first."""
    m, num, size, _ = boft_r.shape
    n = num * size
    skew = 0.5 * (boft_r - jnp.swapaxes(boft_r, -1, -2))
    eye = jnp.eye(size, dtype=boft_r.dtype)
    q = jnp.linalg.solve(eye + skew, jnp.broadcast_to(eye, skew.shape) - skew)
    if drop_key is not None and config.dropout:
        q = jnp.where(identity_blocks(drop_key, m, num, config.dropout)[..., None, None], eye, q)
    total = None
    for i in range(m):
        block_diag = jnp.einsum("ij,iab->iajb", jnp.eye(num, dtype=q.dtype),
                                q[i]).reshape(n, n)
        perm = butterfly_perm(n, int(num / 2 ** i), int(size / 2), m - 1)
        factor = block_diag[perm][:, perm]  # P BD Pᵀ with P[a, perm[a]] = 1
        total = factor if total is None else factor @ total
    return total


def add_boft(params, config: BoftConfig):
    """A new tree with BOFT's leaves (R = 0, s = 1) beside every targeted kernel."""
    flat = dict(traverse_util.flatten_dict(params))
    if any(p[-1] in LEAVES for p in flat):
        raise JaxpeftError("these params already have BOFT leaves")
    for mod in target_modules(flat, config.targets, "BOFT"):
        fan_in, fan_out = flat[mod + ("kernel",)].shape
        num, size = config.blocks(fan_in)
        flat[mod + ("boft_r",)] = jnp.zeros((config.butterfly_factors, num, size, size),
                                            jnp.float32)
        flat[mod + ("boft_s",)] = jnp.ones((fan_out,), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def rotated_kernel(kernel, boft_r, boft_s, config: BoftConfig, drop_key=None):
    """`(M W) ⊙ s`: the kernel that computes BOFT's output before the bias."""
    return (rotation(boft_r, config, drop_key).astype(kernel.dtype) @ kernel) * boft_s.astype(
        kernel.dtype)


@dataclasses.dataclass(frozen=True)
class BoftHook(DenseHook):
    """Computes `x ((M W) ⊙ s) + b` in layers holding BOFT leaves."""

    config: BoftConfig
    leaves: tuple = LEAVES

    def __call__(self, dense, x, y, kernel, bias, deterministic):
        if not dense.has_variable("params", "boft_r"):
            return y
        r, s = (dense.get_variable("params", n) for n in LEAVES)
        drop_key = None if deterministic or not self.config.dropout else dense.make_rng(
            "dropout")
        return token_matmul(x, rotated_kernel(kernel, r.astype(jnp.float32), s, self.config,
                                              drop_key).astype(y.dtype)) + bias


class BoftCodec(PeftCodec):
    """peft's BOFT: `boft_R` `(m, blocks, b, b)` and `boft_s` `(out, 1)` per target."""

    peft_type = "BOFT"
    markers = ("boft_",)

    def config(self, options, family):
        return {"boft_block_size": options.block_size, "boft_block_num": options.block_num,
                "boft_n_butterfly_factor": options.butterfly_factors,
                "boft_dropout": options.dropout,
                "target_modules": peft_target_modules(options, family),
                "fan_in_fan_out": False, "bias": "none", "init_weights": True}

    def options_from(self, config, modules):
        if config.get("fan_in_fan_out") or config.get("bias", "none") != "none":
            raise JaxpeftError("BOFT: fan_in_fan_out and trained biases are not supported")
        return BoftConfig(block_size=int(config["boft_block_size"]),
                          block_num=int(config["boft_block_num"]),
                          butterfly_factors=int(config["boft_n_butterfly_factor"]),
                          dropout=float(config.get("boft_dropout") or 0.0),
                          targets=targets_of_modules(modules, "BOFT"))

    def leaf(self, path, value):
        if path[-1] == "boft_r":
            return "boft_R", value
        return ("boft_s", value[:, None]) if path[-1] == "boft_s" else None


class Boft(PeftMethod):
    """BOFT on the `--lora_targets` Dense layers; R, s (and the head) train."""

    name = "boft"
    summary = ("orthogonal rotations of the input from butterfly-factored block-diagonal "
               "matrices, and output scales (BOFT, Liu et al., 2024)")
    Options = BoftConfig
    default_learning_rate = 1e-3
    codec = BoftCodec()

    def requires(self, options):
        return options.targets

    def augment(self, params, options, rng):
        return add_boft(params, options)

    def rules(self, options):
        return [(r".*/boft_[rs]", True), (".*", False)]

    def hooks(self, options):
        return (BoftHook(options),)

    def merge(self, params, options):
        return fold_into_kernels(params, LEAVES, lambda kernel, held, _: rotated_kernel(
            kernel, held["boft_r"], held["boft_s"], options))
