"""Training state, the jitted train and eval steps, and a compilation counter.

`train_step(state, batch, rng, frozen) -> (state, metrics)` and `eval_step(params, batch)
-> dict` are pure top-level functions; the model and optimizer are bound with
`functools.partial` and the result is jitted once (`make_train_step`, `make_eval_step`).
The state holds only what training changes: the step, the trainable leaves and their
optimizer state. Frozen weights are a separate, non-donated argument (as in levanter and
lorax), so they exist once on the device and are never copied; the gradient is taken with
respect to the trainable leaves only.

A batch is a dict of numpy arrays: `input_ids`, `attention_mask`, `token_type_ids`
(`[batch, length]`), `labels` (`[batch]`, int or float for regression) and `weights`
(`[batch]`, 0 for padding rows so a padded last batch is exact). A packed batch has
`[rows, length]` token arrays with `position_ids` and `segment_ids` instead of
`attention_mask`, and `example_row`/`example_pos` locating each example's first token.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from jaxpeft.errors import JaxpeftError, first_line
from jaxpeft.models.bert import SequenceClassifier
from jaxpeft.peft.masks import combine, partition


@flax.struct.dataclass
class TrainState:
    """Step counter, the trainable leaves (`None` at frozen places) and their optimizer
    state. `combine(state.trainable, frozen)` is the full parameter tree."""

    step: jax.Array
    trainable: Any
    opt_state: Any


def create_train_state(params: Any, mask: Any, tx: optax.GradientTransformation,
                       shardings: Optional[Callable[[Any], Any]] = None
                       ) -> tuple[TrainState, Any]:
    """`(state, frozen)`: `params` split by `mask`, the optimizer initialised on the
    trainable half.

    Only the trainable leaves are copied (the train step donates the state, and the caller's
    `params` stay usable); `frozen` holds the caller's own arrays, so base weights are never
    duplicated. `shardings` (a tree of shapes -> a tree of shardings, e.g.
    `Sharder.shardings`) makes the state directly in its shards: the optimizer's moments
    never exist whole on one device.
    """
    trainable, frozen = partition(params, mask)

    def init(trainable):
        return TrainState(step=jnp.zeros((), jnp.int32),
                          trainable=jax.tree.map(jnp.copy, trainable),
                          opt_state=tx.init(trainable))

    if shardings is None:
        return init(trainable), frozen
    out = shardings(jax.eval_shape(init, trainable))
    return jax.jit(init, out_shardings=out)(trainable), frozen


def per_example_loss(logits: jax.Array, labels: jax.Array, is_regression: bool) -> jax.Array:
    """Cross-entropy for classification, squared error for regression (`num_labels == 1`)."""
    if is_regression:
        return jnp.square(logits[:, 0] - labels.astype(jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


PACKED_INPUTS = ("position_ids", "segment_ids", "example_row", "example_pos")


def forward(model: SequenceClassifier, params: Any, batch: dict, deterministic: bool,
            rngs=None) -> jax.Array:
    """The model's logits for a (padded or packed) batch dict."""
    extra = {k: batch[k] for k in PACKED_INPUTS if k in batch}
    return model.apply({"params": params}, batch["input_ids"], batch.get("attention_mask"),
                       batch["token_type_ids"], deterministic=deterministic, rngs=rngs,
                       **extra)


def train_step(state: TrainState, batch: dict, rng: jax.Array, frozen: Any, *,
               model: SequenceClassifier, tx: optax.GradientTransformation,
               penalty: Optional[Callable[[Any], jax.Array]] = None):
    """One optimizer step on the weighted mean loss (plus the method's `penalty` of the
    trainable tree, if it has one); returns `(state, {loss, update stats})`."""
    # A fresh dropout key per step, derived rather than carried, so resuming is exact.
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(trainable):
        logits = forward(model, combine(trainable, frozen), batch, False,
                        {"dropout": dropout_rng})
        per = per_example_loss(logits, batch["labels"], model.config.is_regression)
        w = batch["weights"].astype(jnp.float32)
        loss = jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)
        return loss if penalty is None else loss + penalty(trainable)

    loss, grads = jax.value_and_grad(loss_fn)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state.trainable, updates)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, {"loss": loss, **update_stats(grads, updates, state.trainable)}


# What `train_step` reports besides the loss; the run log averages each over its window.
STEP_STATS = ("grad_norm", "update_norm", "update_ratio", "loss_decrease")


def update_stats(grads: Any, updates: Any, params: Any) -> dict:
    """Size of one step: gradient norm, ‖Δθ‖, ‖Δθ‖/‖θ‖ and the first-order loss decrease.

    These explain learning rates across methods: Adam moves each trainable coordinate by about
    the learning rate, so the loss decrease a step buys, −⟨g, Δθ⟩, grows with how many
    coordinates train. Reductions over the trainable leaves only, a few per step.
    """
    param_norm = optax.global_norm(params)
    update_norm = optax.global_norm(updates)
    dot = sum(jnp.vdot(g.astype(jnp.float32), u.astype(jnp.float32))
              for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(updates)))
    return {"grad_norm": optax.global_norm(grads), "update_norm": update_norm,
            "update_ratio": update_norm / jnp.maximum(param_norm, 1e-12),
            "loss_decrease": -dot}


def eval_step(params: Any, batch: dict, *, model: SequenceClassifier) -> dict:
    """Predictions (class id or regression value) and per-example loss.

    Padding rows are told apart on the host by their index (-1), so no weights come back.
    """
    logits = forward(model, params, batch, True)
    is_regression = model.config.is_regression
    preds = logits[:, 0] if is_regression else jnp.argmax(logits, axis=-1)
    return {"predictions": preds,
            "loss": per_example_loss(logits, batch["labels"], is_regression)}


def make_train_step(model: SequenceClassifier, tx: optax.GradientTransformation,
                    compiler_options: Optional[dict] = None, state_shardings: Any = None,
                    penalty: Optional[Callable[[Any], jax.Array]] = None):
    """`train_step` with the model and optimizer bound, jitted once, donating the state
    (never the frozen weights, which every step reads). `compiler_options` are XLA options
    for this one program (`--train_step_xla_options`); they change which kernels run, not
    the math. `state_shardings` (the state's `NamedSharding`s) pins the new state to the
    layout of the old, so every step reuses the donated buffers and one compilation."""
    step = functools.partial(train_step, model=model, tx=tx, penalty=penalty)
    pinned = {} if state_shardings is None else {"out_shardings": (state_shardings, None)}
    return jax.jit(step, donate_argnums=0, compiler_options=compiler_options or None,
                   **pinned)


def check_compiler_options(options: dict) -> None:
    """Compiles a tiny program with `options`, so an option this jaxlib or backend rejects
    is one clear error before anything loads, not a failure at the first step."""
    if not options:
        return
    try:
        jax.jit(lambda x: x @ x, compiler_options=options).lower(jnp.ones((2, 2))).compile()
    except Exception as e:  # noqa: BLE001 - XLA raises several kinds for an unknown option
        raise JaxpeftError(f"--train_step_xla_options {options}: XLA on "
                           f"{jax.default_backend()} refuses them ({first_line(e)})") from None


def use_compilation_cache(directory: Optional[str]) -> None:
    """Turns JAX's persistent compilation cache on in `directory` (None: leaves it off).

    Every compilation is kept (no minimum compile time), since even the small eval shapes
    take seconds to compile on CPU; the cache key covers the program, shapes, devices and
    versions, so a stale entry is never used.
    """
    if directory:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def make_eval_step(model: SequenceClassifier):
    """`eval_step` with the model bound, jitted once."""
    return jax.jit(functools.partial(eval_step, model=model))


class CompileCounter:
    """Counts the programs XLA builds while `counting()` is active: compiled, or loaded from
    JAX's persistent compilation cache (a load stands for a compilation of an earlier run, so
    a resumed or repeated run counts the same programs as the first).

    jax.monitoring has no way to unregister a listener, so one listener per process is
    registered on first use and shared.
    """

    _instance = None
    EVENTS = ("/jax/core/compile/backend_compile_duration",
              "/jax/compilation_cache/cache_retrieval_time_sec")

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    @classmethod
    def shared(cls) -> "CompileCounter":
        """The process's counter."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    @contextlib.contextmanager
    def counting(self):
        """Counts compilations inside the block; yields a function returning the count."""
        start, self.active = self.count, True
        try:
            yield lambda: self.count - start
        finally:
            self.active = False

    def _on_event(self, event, duration, **kwargs):
        if self.active and event in self.EVENTS:
            self.count += 1
