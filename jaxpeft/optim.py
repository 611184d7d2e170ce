"""AdamW with warmup + linear decay, gradient clipping, built from the trainable mask.

Freezing has one mechanism: the mask. The train step differentiates only the trainable half
of the tree (`jaxpeft.peft.partition`), whose frozen places are `None`; the optimizer is
`optax.masked(adamw, mask)`, which keeps Adam's state for the trainable leaves alone. Because
`optax.masked` passes masked-out updates through unchanged, `make_optimizer` also refuses
(when tracing, at no run-time cost) an update tree holding an array at a frozen place, so a
frozen weight can never receive a raw gradient.
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


def decay_mask(tree: Any) -> Any:
    """True for leaves that get weight decay: kernels, embeddings, LoRA factors. `tree` is any
    tree with the params' structure (the params, or their mask)."""
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict(
        {p: not _NO_DECAY.fullmatch(path_str(p)) for p in flat})


def _frozen_places_empty(mask: Any) -> optax.GradientTransformation:
    """Stateless check: every frozen place of the update tree is `None` (no gradient)."""

    def update(updates, state, params=None):
        flat = traverse_util.flatten_dict(updates)
        for path, trainable in traverse_util.flatten_dict(mask).items():
            if not trainable and flat.get(path) is not None:
                raise ValueError(f"{path_str(path)} is frozen but received an update; "
                                 "differentiate the trainable tree only (peft.partition)")
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _scale_by_leaf(factors: Any) -> optax.GradientTransformation:
    """Stateless: multiplies each leaf's update by its factor (frozen places stay None)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda f, u: None if u is None else u * f, factors, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: OptimConfig, mask: Any,
                   lr_multipliers: Any = None) -> optax.GradientTransformation:
    """AdamW with state for the leaves `mask` marks trainable, for trees shaped like `mask`
    whose frozen places are `None` (the trainable half from `peft.partition`).

    `lr_multipliers` (a tree of floats, e.g. LoRA+'s ratio on `lora_b`) scales each leaf's
    whole AdamW step, decoupled weight decay included, as a per-parameter-group learning
    rate does in PyTorch.
    """
    inner = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm
        else optax.identity(),
        optax.adamw(make_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=decay_mask(mask)),
    )
    chain = [_frozen_places_empty(mask), optax.masked(inner, mask)]
    if lr_multipliers is not None:
        chain.append(_scale_by_leaf(lr_multipliers))
    return optax.chain(*chain)
