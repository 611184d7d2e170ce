"""Bottleneck adapters: Houlsby et al. (2019) and Pfeiffer et al. (2021).

An adapter maps a sub-layer's output `y` (hidden size d) to `y + relu(y W_down + b_down)
W_up + b_up`, with a `--adapter_size` (k) bottleneck, before the residual connection and
LayerNorm. Houlsby puts one after the attention output projection and one after the
feed-forward output projection of every layer; Pfeiffer only the feed-forward one. `W_down`
is drawn N(0, 0.02²) and `W_up`, `b_up` are zero, so each adapter starts as the identity and
the model equals the base model. The adapters and every LayerNorm inside the encoder layers
train (as in both papers), plus the head. Leaves sit beside the projection's kernel:
`adapter_down`, `adapter_down_bias`, `adapter_up`, `adapter_up_bias`.

Adapters are nonlinear, so they cannot be merged into the weights, and Hugging Face peft has
no bottleneck adapters, so there is no peft export.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import DenseHook, per_token, token_matmul
from jaxpeft.models.registry import norm_regex
from jaxpeft.peft.lora import target_modules
from jaxpeft.peft.method import MethodOptions, PeftMethod, flag


@dataclasses.dataclass(frozen=True)
class AdapterConfig(MethodOptions):
    """Bottleneck adapter options: `size`, the bottleneck width k."""

    size: int = flag("adapter_size", 64, "Bottleneck width of adapter_houlsby / "
                     "adapter_pfeiffer.")
    label: ClassVar[str] = "adapter"

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size <= 0:
            raise JaxpeftError(f"adapter size must be a positive integer, got {self.size!r}")


@dataclasses.dataclass(frozen=True)
class AdapterHook(DenseHook):
    """Adds the bottleneck adapter to the output of layers holding its leaves."""

    leaves: tuple = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")

    def __call__(self, dense, x, y, kernel, bias, deterministic):
        if not dense.has_variable("params", "adapter_down"):
            return y
        get = lambda name: dense.get_variable("params", name)  # noqa: E731
        down = token_matmul(y, get("adapter_down").astype(y.dtype))
        h = jax.nn.relu(down + per_token(get("adapter_down_bias"), down))
        up = token_matmul(h, get("adapter_up").astype(y.dtype))
        return y + up + per_token(get("adapter_up_bias"), up)


class _Bottleneck(PeftMethod):
    """Adapters after the projections named by `placements` (LoRA's target names)."""

    placements: tuple = ()
    Options = AdapterConfig
    default_learning_rate = 1e-3
    mergeable = False

    def requires(self, options):
        return self.placements

    def augment(self, params, options, rng):
        flat = dict(traverse_util.flatten_dict(params))
        for i, mod in enumerate(target_modules(flat, self.placements, self.name)):
            d = flat[mod + ("kernel",)].shape[1]
            flat[mod + ("adapter_down",)] = 0.02 * jax.random.normal(
                jax.random.fold_in(rng, i), (d, options.size), jnp.float32)
            flat[mod + ("adapter_down_bias",)] = jnp.zeros((options.size,), jnp.float32)
            flat[mod + ("adapter_up",)] = jnp.zeros((options.size, d), jnp.float32)
            flat[mod + ("adapter_up_bias",)] = jnp.zeros((d,), jnp.float32)
        return traverse_util.unflatten_dict(flat)

    def rules(self, options):
        return [(r".*/adapter_(down|up)(_bias)?", True),
                (rf".*/layers?_\d+/(?:.*/)?{norm_regex()}/(scale|bias)", True), (".*", False)]

    def hooks(self, options):
        return (AdapterHook(),)

    def merge(self, params, options):
        raise JaxpeftError(f"{self.name}: bottleneck adapters are nonlinear and cannot be "
                           "merged into the weights")


class AdapterHoulsby(_Bottleneck):
    """Two adapters per layer: after attention and after the feed-forward block."""

    name = "adapter_houlsby"
    summary = "bottleneck adapters after attention and FFN (Houlsby et al., 2019; no peft export)"
    placements = ("attention_output", "output")


class AdapterPfeiffer(_Bottleneck):
    """One adapter per layer, after the feed-forward block."""

    name = "adapter_pfeiffer"
    summary = "a bottleneck adapter after each FFN (Pfeiffer et al., 2021; no peft export)"
    placements = ("output",)
