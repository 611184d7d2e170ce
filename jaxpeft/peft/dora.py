"""DoRA (Liu et al., 2024): weight-decomposed LoRA, on the LoRA flags.

Each targeted kernel `W` (in, out) gets LoRA's `lora_a`/`lora_b` and a magnitude vector
`lora_magnitude` (out,), initialised to the column norms of `W` (peft's `use_dora=True`). The
layer computes `m / ||W + s·A B||_col · (W + s·A B)` applied to `x`, plus the bias, written as
a correction of the base output so `W + s·A B` never needs a gradient:
`y + (m/n − 1) ⊙ (x W) + (m/n) ⊙ (x A B)·s`. The norm `n` is detached from the gradient, as
in the paper (§4.3) and peft.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import DenseHook, Dropout, per_token, token_matmul
from jaxpeft.peft.lora import Lora, LoraCodec, LoraConfig, add_lora, bias_rules
from jaxpeft.peft.method import fold_into_kernels


def _column_norm(kernel, a, b, scale):
    """||W + s·A B|| over the input axis, in float32."""
    return jnp.linalg.norm(kernel + (a @ b) * scale, axis=0)


@dataclasses.dataclass(frozen=True)
class DoraHook(DenseHook):
    """DoRA's output in layers holding `lora_magnitude`."""

    config: LoraConfig
    leaves: tuple = ("lora_a", "lora_b", "lora_magnitude")

    def __call__(self, dense, x, y, kernel, bias, deterministic):
        if not dense.has_variable("params", "lora_magnitude"):
            return y
        get = lambda name: dense.get_variable("params", name)  # noqa: E731
        a, b, m = get("lora_a"), get("lora_b"), get("lora_magnitude")
        scale = self.config.scale_for(tuple(dense.scope.path))
        norm = jax.lax.stop_gradient(_column_norm(get("kernel"), a, b, scale))
        ratio = per_token(m / norm, y)
        h = Dropout(self.config.dropout)(x, deterministic=deterministic)
        # Without dropout the base product is already in y; with it, DoRA (like peft) uses
        # the dropped input for the magnitude correction too.
        base = y - bias if h is x else token_matmul(h, kernel)
        low_rank = token_matmul(token_matmul(h, a.astype(y.dtype)), b.astype(y.dtype))
        return y + (ratio - 1) * base + ratio * low_rank * jnp.asarray(scale, y.dtype)


class DoraCodec(LoraCodec):
    """peft's LORA with `use_dora`: LoRA's tensors and `lora_magnitude_vector`."""

    label = "DoRA"

    def config(self, options, family):
        return {**super().config(options, family), "use_dora": True}

    def matches(self, config):
        return config.get("peft_type") == "LORA" and bool(config.get("use_dora"))

    def leaf(self, path, value):
        if path[-1] == "lora_magnitude":
            return "lora_magnitude_vector", value
        return super().leaf(path, value)


def _plain_init(options) -> None:
    if options.init != "default":
        raise JaxpeftError(f"--lora_init={options.init}: DoRA starts from LoRA's default "
                           "initialisation only")


class Dora(Lora):
    """LoRA leaves plus a trained magnitude per output column of each targeted kernel."""

    name = "dora"
    summary = "weight-decomposed LoRA: LoRA direction plus a magnitude vector (Liu et al., 2024)"
    codec = DoraCodec()

    def options_from(self, run):
        options = super().options_from(run)
        _plain_init(options)
        return options

    def augment(self, params, options, rng):
        _plain_init(options)
        flat = dict(traverse_util.flatten_dict(add_lora(params, options, rng)))
        for path in [p for p in flat if p[-1] == "lora_a"]:
            # b = 0 at init, so m = ||W||_col and the layer starts equal to the base layer.
            flat[path[:-1] + ("lora_magnitude",)] = jnp.linalg.norm(
                flat[path[:-1] + ("kernel",)], axis=0)
        return traverse_util.unflatten_dict(flat)

    def rules(self, options):
        return [(r".*/lora_(a|b|magnitude)", True), *bias_rules(options), (".*", False)]

    def hooks(self, options):
        return (DoraHook(options),)

    def merge(self, params, options):
        def fold(kernel, held, module):
            a, b, m = held["lora_a"], held["lora_b"], held["lora_magnitude"]
            scale = options.scale_for(module)
            return (kernel + (a @ b) * scale) * (m / _column_norm(kernel, a, b, scale))

        return fold_into_kernels(params, ("lora_a", "lora_b", "lora_magnitude"), fold)
