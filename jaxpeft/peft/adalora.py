"""AdaLoRA (Zhang et al., 2023; peft's ADALORA): an SVD-shaped update per target whose rank
budget is reallocated during training by importance.

Beside each `--lora_targets` kernel `(in, out)` the tree gets `adalora_a (in, r)`,
`adalora_e (r,)` and `adalora_b (r, out)` with r = `--adalora_init_r`; the layer adds
`x @ (a · e) @ b · alpha / (r + 1e-5)` (peft's `lora_A`, `lora_E`, `lora_B`; `e` starts at 0,
`a` and `b` normal with std 0.02, so the model starts as the base). Training adds two things,
both run inside the one jitted step:
- the orthogonality penalty `--adalora_orth_reg × mean over the a's and b's of ‖PᵀP − I‖_F`
  (peft adds it to the loss; the logged training loss includes it);
- the rank allocator (`rank_allocator`, wrapped around the optimizer): after each update,
  every triplet (a column, a value, b row) is scored by smoothed sensitivity × uncertainty of
  `|θ · ∇θ|` (EMAs `--adalora_beta1`, `--adalora_beta2`), and the values `e` of the lowest
  scores are set to 0 so that the kept triplets fit the budget: all `init_r` per target up to
  step `--adalora_tinit`, then a cubic decrease to `--adalora_target_r` per target at step
  `total − --adalora_tfinal` (a mask every `--adalora_delta_t` steps), after which the
  pattern is fixed. Ranks shrink by masking, never by reshaping, so nothing recompiles; the
  schedule is computed on the host once (as peft does, in float64) and indexed by the
  allocator's own step count, kept in the optimizer state (resumes are exact).
Step numbering is peft's `update_and_allocate(global_step)` with the 0-based index of the
update just made. The peft export writes every triplet (masked ones hold `e = 0`) with no
`rank_pattern`, which peft loads with the same logits; an imported adapter with a
`rank_pattern` is re-expanded to `init_r` with zeros in the dropped triplets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import Dropout, DenseHook, token_matmul
from jaxpeft.peft.codec import PeftCodec
from jaxpeft.peft.lora import (check_targets, peft_target_modules, target_modules,
                               targets_of_modules)
from jaxpeft.peft.method import MethodOptions, PeftMethod, fold_into_kernels, flag, shared_flag

LEAVES = ("adalora_a", "adalora_e", "adalora_b")


@dataclasses.dataclass(frozen=True)
class AdaloraConfig(MethodOptions):
    """AdaLoRA options: initial and target rank per target, alpha, dropout, targets, the
    budget schedule (tinit, tfinal, delta_t, in steps), the EMA factors and the
    orthogonality penalty's weight."""

    init_r: int = flag("adalora_init_r", 12, "AdaLoRA: initial rank of every target.")
    target_r: int = flag("adalora_target_r", 8, "AdaLoRA: average rank per target at the end "
                         "of the budget schedule.")
    alpha: float = shared_flag("lora_alpha", 16.0)
    dropout: float = shared_flag("lora_dropout", 0.0)
    targets: tuple = shared_flag("lora_targets", ("query", "value"))
    tinit: int = flag("adalora_tinit", 0, "AdaLoRA: steps at the full budget before ranks "
                      "shrink.")
    tfinal: int = flag("adalora_tfinal", 0, "AdaLoRA: final steps with the rank pattern "
                       "fixed.")
    delta_t: int = flag("adalora_delta_t", 1, "AdaLoRA: steps between two budget "
                        "allocations.")
    beta1: float = flag("adalora_beta1", 0.85, "AdaLoRA: EMA factor of the sensitivity.")
    beta2: float = flag("adalora_beta2", 0.85, "AdaLoRA: EMA factor of the uncertainty.")
    orth_reg: float = flag("adalora_orth_reg", 0.5, "AdaLoRA: weight of the orthogonality "
                           "penalty.")
    label: ClassVar[str] = "AdaLoRA"

    def __post_init__(self):
        for name in ("init_r", "target_r", "delta_t"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise JaxpeftError(f"--adalora_{name} must be a positive integer, got {value!r}")
        if self.target_r > self.init_r:
            raise JaxpeftError(f"--adalora_target_r ({self.target_r}) exceeds "
                               f"--adalora_init_r ({self.init_r})")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise JaxpeftError(f"--adalora_{name} must be an integer >= 0, got {value!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise JaxpeftError(f"--adalora_{name} must be in (0, 1)")
        if self.orth_reg < 0:
            raise JaxpeftError(f"--adalora_orth_reg must be >= 0, got {self.orth_reg}")
        if self.alpha <= 0:
            raise JaxpeftError(f"AdaLoRA alpha must be > 0, got {self.alpha}")
        object.__setattr__(self, "targets", check_targets(self.targets, "AdaLoRA"))

    @property
    def scale(self) -> float:
        """The multiplier of `x (a · e) b`: alpha over the initial rank (peft's ranknum)."""
        return self.alpha / (self.init_r + 1e-5)

    def schedule(self, total_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """`(budget, allocate)` for each 0-based step of a `total_steps` run, per target
        (multiply by the number of targets): peft's `budget_schedule`, in float64, with the
        forced allocation at `total − tfinal`."""
        if self.tinit >= total_steps - self.tfinal:
            raise JaxpeftError(f"AdaLoRA: --adalora_tinit={self.tinit} and --adalora_tfinal="
                               f"{self.tfinal} leave no budget phase in {total_steps} steps")
        budget = np.zeros(total_steps + 1, np.float64)
        allocate = np.zeros(total_steps + 1, bool)
        for step in range(total_steps + 1):
            if step <= self.tinit:
                budget[step], allocate[step] = 1.0, False
            elif step > total_steps - self.tfinal:
                budget[step], allocate[step] = 0.0, True
            else:
                mul = 1 - (step - self.tinit) / (total_steps - self.tfinal - self.tinit)
                budget[step] = mul ** 3
                allocate[step] = step % self.delta_t == 0 or step == total_steps - self.tfinal
        return budget, allocate


def add_adalora(params, config: AdaloraConfig, rng: jax.Array):
    """A new tree with AdaLoRA's triplets beside every targeted kernel."""
    flat = dict(traverse_util.flatten_dict(params))
    if any(p[-1] in LEAVES for p in flat):
        raise JaxpeftError("these params already have AdaLoRA leaves")
    r = config.init_r
    for i, mod in enumerate(target_modules(flat, config.targets, "AdaLoRA")):
        fan_in, fan_out = flat[mod + ("kernel",)].shape
        ka, kb = jax.random.split(jax.random.fold_in(rng, i))
        flat[mod + ("adalora_a",)] = 0.02 * jax.random.normal(ka, (fan_in, r), jnp.float32)
        flat[mod + ("adalora_e",)] = jnp.zeros((r,), jnp.float32)
        flat[mod + ("adalora_b",)] = 0.02 * jax.random.normal(kb, (r, fan_out), jnp.float32)
    return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass(frozen=True)
class AdaloraHook(DenseHook):
    """Adds `dropout(x) @ (a · e) @ b · scale` in layers holding AdaLoRA leaves."""

    scale: float
    dropout: float
    leaves: tuple = LEAVES

    def __call__(self, dense, x, y, kernel, bias, deterministic):
        if not dense.has_variable("params", "adalora_a"):
            return y
        a, e, b = (dense.get_variable("params", n).astype(y.dtype) for n in LEAVES)
        h = Dropout(self.dropout)(x, deterministic=deterministic)
        return y + token_matmul(token_matmul(h, a * e), b) * jnp.asarray(self.scale, y.dtype)


def _modules(flat: dict) -> list:
    """Module paths holding AdaLoRA triplets in a flattened (trainable) tree."""
    return sorted(p[:-1] for p, v in flat.items() if p[-1] == "adalora_e" and v is not None)


def orthogonality_penalty(config: AdaloraConfig):
    """`params -> orth_reg × mean ‖PᵀP − I‖_F` over the a's (`aᵀa`) and b's (`b bᵀ`): peft's
    penalty on `lora_A Aᵀ` and `Bᵀ lora_B`."""
    def penalty(params):
        flat = traverse_util.flatten_dict(params)
        terms = []
        for mod in _modules(flat):
            a, b = flat[mod + ("adalora_a",)], flat[mod + ("adalora_b",)]
            eye = jnp.eye(a.shape[1], dtype=a.dtype)
            terms += [jnp.linalg.norm(a.T @ a - eye), jnp.linalg.norm(b @ b.T - eye)]
        return config.orth_reg * sum(terms) / len(terms) if terms else jnp.zeros(())
    return penalty


class AllocatorState(NamedTuple):
    """The wrapped optimizer's state, the allocator's step count, the smoothed sensitivity
    and uncertainty of every AdaLoRA leaf, and the fixed final pattern of each target."""

    inner: Any
    count: jax.Array
    sensitivity: dict
    uncertainty: dict
    pattern: dict


def _key(mod: tuple, leaf: str = "") -> str:
    # String keys: the allocator's state is checkpointed, and orbax keys pytrees by strings.
    return "/".join(mod) + (f":{leaf}" if leaf else "")


def rank_allocator(inner: optax.GradientTransformation, config: AdaloraConfig,
                   total_steps: int) -> optax.GradientTransformation:
    """`inner` with AdaLoRA's budget allocation after each update (see the module
    docstring): the updates it returns set the masked triplets' values `e` to 0."""
    fractions, allocate = config.schedule(total_steps)
    final = total_steps - config.tfinal

    def leaves(tree):
        flat = traverse_util.flatten_dict(tree)
        return {_key(mod, n): flat[mod + (n,)] for mod in _modules(flat) for n in LEAVES}

    def init(params):
        own = leaves(params)
        # Distinct arrays for each field: the state is donated, and XLA refuses one buffer
        # donated twice.
        zeros = lambda: {k: jnp.zeros_like(v) for k, v in own.items()}  # noqa: E731
        pattern = {k.rsplit(":", 1)[0]: jnp.ones_like(v, bool) for k, v in own.items()
                   if k.endswith(":adalora_e")}
        return AllocatorState(inner.init(params), jnp.zeros((), jnp.int32), zeros(),
                              zeros(), pattern)

    def update(grads, state, params):
        updates, inner_state = inner.update(grads, state.inner, params)
        step = state.count
        new = leaves(jax.tree.map(lambda p, u: p + u, params, updates))
        g = leaves(grads)
        scoring = step < final
        sens, unc = {}, {}
        for k, value in new.items():
            ipt = jnp.abs(value * g[k])
            s = config.beta1 * state.sensitivity[k] + (1 - config.beta1) * ipt
            u = config.beta2 * state.uncertainty[k] + (1 - config.beta2) * jnp.abs(ipt - s)
            sens[k] = jnp.where(scoring, s, state.sensitivity[k])
            unc[k] = jnp.where(scoring, u, state.uncertainty[k])
        modules = sorted(state.pattern)
        score = {}
        for m in modules:
            el = {n: sens[_key((m,), n)] * unc[_key((m,), n)] for n in LEAVES}
            score[m] = (el["adalora_e"] + el["adalora_a"].mean(axis=0)
                        + el["adalora_b"].mean(axis=1))
        init_budget = config.init_r * len(modules)
        target = config.target_r * len(modules)
        index = jnp.minimum(step, total_steps)
        # peft: int((init − target) · fraction + target), a Python int of a float64
        budgets = np.floor((init_budget - target) * fractions + target).astype(np.int32)
        budget = jnp.asarray(budgets)[index]
        k = init_budget - budget
        ranked = jnp.sort(jnp.concatenate([score[m] for m in modules]))
        threshold = jnp.where(k > 0, ranked[jnp.maximum(k - 1, 0)], -jnp.inf)
        masking = jnp.asarray(allocate)[index]
        pattern, flat_updates = {}, dict(traverse_util.flatten_dict(updates))
        flat_params = traverse_util.flatten_dict(params)
        for m in modules:
            keep = jnp.where(step > final, state.pattern[m], score[m] > threshold)
            pattern[m] = jnp.where(step == final, keep, state.pattern[m])
            e_new = new[_key((m,), "adalora_e")]
            e_new = jnp.where(masking & ~keep, jnp.zeros_like(e_new), e_new)
            path = tuple(m.split("/")) + ("adalora_e",)
            flat_updates[path] = e_new - flat_params[path]
        reset = step == final  # peft resets the scores once the pattern is fixed
        sens = {k: jnp.where(reset, jnp.zeros_like(v), v) for k, v in sens.items()}
        unc = {k: jnp.where(reset, jnp.zeros_like(v), v) for k, v in unc.items()}
        return (traverse_util.unflatten_dict(flat_updates),
                AllocatorState(inner_state, step + 1, sens, unc, pattern))

    return optax.GradientTransformation(init, update)


class AdaloraCodec(PeftCodec):
    """peft's ADALORA: `lora_A` (r, in), `lora_E` (r, 1), `lora_B` (out, r) per target."""

    peft_type = "ADALORA"
    markers = ("lora_",)
    NAMES = {"adalora_a": "lora_A", "adalora_e": "lora_E", "adalora_b": "lora_B"}

    def config(self, options, family):
        return {"init_r": options.init_r, "target_r": options.target_r,
                "lora_alpha": options.alpha, "lora_dropout": options.dropout,
                "target_modules": peft_target_modules(options, family),
                "tinit": options.tinit, "tfinal": options.tfinal, "deltaT": options.delta_t,
                "beta1": options.beta1, "beta2": options.beta2,
                "orth_reg_weight": options.orth_reg,
                # peft refuses a config without a schedule that fits; the adapter's own run
                # length is not part of its options, and loading never uses it.
                "total_step": options.tinit + options.tfinal + 1,
                "rank_pattern": None, "fan_in_fan_out": False, "bias": "none",
                "init_lora_weights": True}

    def options_from(self, config, modules):
        if config.get("bias", "none") != "none" or config.get("fan_in_fan_out"):
            raise JaxpeftError("AdaLoRA: bias / fan_in_fan_out adapters are not supported")
        # A field the file leaves out takes peft's default, as peft's own loader does.
        get = lambda name, default: config.get(name, default)  # noqa: E731
        return AdaloraConfig(
            init_r=int(get("init_r", 12)), target_r=int(get("target_r", 8)),
            alpha=float(get("lora_alpha", 8)), dropout=float(get("lora_dropout", 0) or 0),
            targets=targets_of_modules(modules, "AdaLoRA"), tinit=int(get("tinit", 0)),
            tfinal=int(get("tfinal", 0)), delta_t=int(get("deltaT", 1)),
            beta1=float(get("beta1", 0.85)), beta2=float(get("beta2", 0.85)),
            orth_reg=float(get("orth_reg_weight", 0.5)))

    def as_saved(self, tensors, config):
        # The allocator zeroes the singular value of each triplet it masks, so exact zeros
        # name them (dropping them leaves the function as it is; peft keeps `ranknum`). peft
        # prunes from its first allocation on; with no zero, or only zeros (an untrained
        # adapter, whose E start at 0), nothing was masked and the file stays whole.
        values = {k: v for k, v in tensors.items() if k.endswith(".lora_E")}
        if all(v.all() for v in values.values()) or not any(v.any() for v in values.values()):
            return tensors, config
        out, pattern = dict(tensors), {}
        for key, value in values.items():
            keep = value[:, 0] != 0
            stem = key.removesuffix(".lora_E")
            pattern[stem.removeprefix(self.prefix) + ".lora_E"] = keep.tolist()
            out[key] = value[keep]
            out[stem + ".lora_A"] = tensors[stem + ".lora_A"][keep]
            out[stem + ".lora_B"] = tensors[stem + ".lora_B"][:, keep]
        return out, {**config, "rank_pattern": pattern}

    def saved_tensors(self, config, saved):
        # peft saves only the kept triplets when training fixed a rank pattern (and loads
        # them into smaller layers with the initial ranknum): zeros in the dropped ones give
        # the same function at full rank.
        pattern = config.get("rank_pattern") or {}
        out = dict(saved)
        for name, keep in pattern.items():
            # peft keys the pattern by module name below the PeftModel (`bert.encoder...`)
            stem = name.rsplit(".lora_E", 1)[0]
            stem = stem if stem.startswith(self.prefix) else self.prefix + stem
            keep = np.asarray(keep, bool)
            for key, axis in ((f"{stem}.lora_E", 0), (f"{stem}.lora_A", 0),
                              (f"{stem}.lora_B", 1)):
                if key not in out or out[key].shape[axis] == keep.size:
                    continue
                if out[key].shape[axis] != keep.sum():
                    raise JaxpeftError(f"AdaLoRA: {key} has {out[key].shape[axis]} triplets, "
                                       f"its rank_pattern keeps {int(keep.sum())}")
                shape = list(out[key].shape)
                shape[axis] = keep.size
                full = np.zeros(shape, out[key].dtype)
                index = [slice(None)] * len(shape)
                index[axis] = np.flatnonzero(keep)
                full[tuple(index)] = out[key]
                out[key] = full
        return out

    def leaf(self, path, value):
        if path[-1] == "adalora_e":
            return "lora_E", value[:, None]
        return (self.NAMES[path[-1]], value.T) if path[-1] in self.NAMES else None


class Adalora(PeftMethod):
    """AdaLoRA on the `--lora_targets` Dense layers: its triplets (and the head) train, under
    the orthogonality penalty and the rank allocator."""

    name = "adalora"
    summary = ("SVD-shaped low-rank updates whose rank budget moves to the important layers "
               "during training (AdaLoRA, Zhang et al., 2023)")
    Options = AdaloraConfig
    default_learning_rate = 1e-3
    codec = AdaloraCodec()

    def requires(self, options):
        return options.targets

    def augment(self, params, options, rng):
        return add_adalora(params, options, rng)

    def rules(self, options):
        return [(r".*/adalora_[aeb]", True), (".*", False)]

    def hooks(self, options):
        return (AdaloraHook(scale=options.scale, dropout=options.dropout),)

    def penalty(self, options):
        return orthogonality_penalty(options) if options.orth_reg else None

    def wrap_optimizer(self, options, tx, total_steps):
        return rank_allocator(tx, options, total_steps)

    def merge(self, params, options):
        def fold(kernel, held, module):
            a, e, b = (held[n] for n in LEAVES)
            return kernel + (a * e) @ b * options.scale

        return fold_into_kernels(params, LEAVES, fold)
