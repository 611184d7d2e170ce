"""AdamW with warmup + linear decay, gradient clipping, and freezing via `optax.masked`.

The optimizer is built for a trainable mask: `optax.masked(adamw, trainable)` updates the
trainable leaves and keeps optimizer state for them alone, and
`optax.masked(set_to_zero(), frozen)` freezes the rest explicitly (`optax.masked` on its own
would pass frozen leaves' updates through unchanged). The train step feeds gradients for the
trainable leaves only (`None` elsewhere), so frozen weights never get a gradient at all.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import optax
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.peft.masks import path_str

# No weight decay on biases and LayerNorm parameters (as BERT and the HF Trainer do).
_NO_DECAY = re.compile(r".*/bias|.*LayerNorm/.*")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters and the learning-rate schedule.

    The schedule rises linearly from 0 to `learning_rate` over `warmup_steps`, then falls
    linearly to 0 at `total_steps` (transformers' `get_linear_schedule_with_warmup`).
    """

    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise JaxpeftError(f"learning rate must be > 0, got {self.learning_rate}")
        if self.total_steps <= 0:
            raise JaxpeftError(f"total steps must be > 0, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise JaxpeftError(f"warmup steps must be in [0, total steps={self.total_steps}], "
                               f"got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise JaxpeftError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            raise JaxpeftError(f"max grad norm must be >= 0 (0 = no clipping), got "
                               f"{self.max_grad_norm}")


def make_schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0, then linear decay to 0 at `total_steps`."""
    decay = optax.linear_schedule(config.learning_rate, 0.0,
                                  max(config.total_steps - config.warmup_steps, 1))
    if config.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def learning_rate_at(config: OptimConfig, step: int) -> float:
    """The schedule's value at `step`, in plain Python (for logging without a device op)."""
    w, total, lr = config.warmup_steps, config.total_steps, config.learning_rate
    if step < w:
        return lr * step / w
    frac = min(step - w, max(total - w, 1)) / max(total - w, 1)
    return lr * (1.0 - frac)


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: kernels, embeddings, LoRA factors."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {p: not _NO_DECAY.fullmatch(path_str(p)) for p in flat})


def make_optimizer(config: OptimConfig, params: Any, trainable: Any) -> optax.GradientTransformation:
    """AdamW over the `trainable` leaves of `params`; the other leaves are frozen."""
    inner = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm
        else optax.identity(),
        optax.adamw(make_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=decay_mask(params)),
    )
    frozen = jax.tree.map(lambda m: not m, trainable)
    return optax.chain(optax.masked(inner, trainable), optax.masked(optax.set_to_zero(), frozen))
