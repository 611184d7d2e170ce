"""LoRA (Hu et al., 2021) by augmenting the parameter tree.

`add_lora` puts `lora_a: (in, r)` (random, as peft's Kaiming-uniform init) and
`lora_b: (r, out)` (zeros) beside each targeted Dense `kernel`; `LoraHook` makes those layers
add `dropout(x) @ lora_a @ lora_b * scale`, the scale (alpha / r) travelling with the
method's options, never as a model default. With `lora_b = 0` the model computes exactly
what the base model does. `merge_lora` folds the update into the kernels for inference.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import DenseHook, Dropout, token_matmul
from jaxpeft.models.family import ALL_LINEAR, TARGET_NAMES, Family
from jaxpeft.models.registry import FAMILIES, family_of_params, target_aliases
from jaxpeft.peft.masks import path_str
from jaxpeft.peft.codec import PeftCodec
from jaxpeft.peft.method import (MethodOptions, PeftMethod, RankPatterns, flag,
                                 fold_into_kernels)

def check_targets(targets, method: str) -> tuple:
    """Target names (`jaxpeft.models.family.TARGET_NAMES`) with transformers-style aliases
    resolved (`attention.self.query`, DistilBERT's `q_lin`, `ffn.lin2`, ...) and duplicates
    dropped; an unknown or empty list is a `JaxpeftError` naming the valid targets.
    `all-linear` stays as given: each family resolves it (`Family.expand_targets`)."""
    aliases = target_aliases()
    resolved = tuple(dict.fromkeys(aliases.get(t, t) for t in targets))
    unknown = [t for t in resolved if t not in TARGET_NAMES + (ALL_LINEAR,)]
    if unknown or not resolved:
        raise JaxpeftError(
            f"unknown {method} target module(s) {', '.join(map(repr, unknown)) or '(none given)'}"
            f"; valid targets: {', '.join(TARGET_NAMES + (ALL_LINEAR,))}")
    return resolved


def _family(paths) -> Family:
    return family_of_params({p[0] for p in paths})


def target_modules(flat: dict, targets, method: str) -> list:
    """Sorted module paths (of a flattened tree) of the Dense layers `targets` name in the
    tree's family."""
    family = _family(flat)
    targets = family.expand_targets(targets)
    missing = [t for t in targets if t not in family.target_names]
    if missing:
        raise JaxpeftError(f"{method}: {family.name} has no {', '.join(missing)} layer; its "
                           f"targets: {', '.join(family.target_names)}")
    rx = re.compile("|".join(f"(?:{family.target_regex(t)})" for t in targets))
    modules = sorted({p[:-1] for p in flat
                      if p[-1] == "kernel" and rx.fullmatch(path_str(p[:-1]))})
    if not modules:
        raise JaxpeftError(f"no Dense layer matches the {method} targets {list(targets)}")
    return modules


LORA_INITS = ("default", "gaussian", "pissa", "olora")
# peft's `bias`: which of the base model's biases train beside the LoRA factors.
LORA_BIASES = ("none", "all", "lora_only")
# Inits that take lora_a, lora_b from the base kernel: the tree keeps those first factors as
# frozen `lora_a0`, `lora_b0`, and the layer subtracts their product (the residual base).
FROM_KERNEL = ("pissa", "olora")


@dataclasses.dataclass(frozen=True)
class LoraConfig(RankPatterns, MethodOptions):
    """LoRA options.

    rank: r, the inner dimension of the update. alpha: scale numerator; the update is scaled
    by `alpha / r` (or `alpha / sqrt(r)` with `use_rslora`). dropout: on the LoRA input.
    targets: which Dense layers of every encoder layer get LoRA (see `TARGETS`).
    loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): `lora_b` learns at this multiple of the
    learning rate (0: off, plain LoRA). A training option; the forward pass ignores it.
    rank_pattern, alpha_pattern: other ranks / alphas for some layers, `PATTERN=VALUE`
    entries matched as peft's `rank_pattern` / `alpha_pattern` keys (`rank_for`,
    `alpha_for`, `scale_for` give a layer's values). bias: peft's `bias`, the base biases
    that train too: none, all (every bias of the encoder, pooler included: LoRA plus
    BitFit), lora_only (those of the adapted layers).
    """

    rank: int = flag("lora_rank", 8, "LoRA rank r.")
    alpha: float = flag("lora_alpha", 16.0, "LoRA alpha; the update is scaled by alpha/r.")
    dropout: float = flag("lora_dropout", 0.0, "Dropout on the LoRA input.")
    targets: tuple = flag("lora_targets", ("query", "value"), "Layers that get LoRA: query, "
                          "key, value (qkv on ModernBERT), attention_output, intermediate, "
                          "output, pooler (BERT's pretrained pooler), or all-linear (every "
                          "one the model has, as peft's).")
    use_rslora: bool = flag("lora_rslora", False, "Scale LoRA by alpha/sqrt(r) (rsLoRA).")
    loraplus_lr_ratio: float = flag("loraplus_lr_ratio", 0.0, "LoRA+: lora_b learns at this "
                                    "multiple of the learning rate (Hayou et al. suggest 16; "
                                    "0: off).")
    init: str = flag("lora_init", "default", "LoRA's initialisation (peft's init_lora_weights): "
                     "default (lora_a Kaiming-uniform, lora_b 0), gaussian (lora_a normal with "
                     "std 1/r), pissa (the kernel's top-r singular directions, Meng et al. "
                     "2024), olora (its QR factors, Buyukakyuz 2024); pissa and olora start "
                     "lora_a, lora_b at those factors and subtract them from the base.",
                     choices=lambda: LORA_INITS)
    rank_pattern: tuple = flag("lora_rank_pattern", (), "LoRA, DoRA, LoHa, LoKr: other ranks "
                               "for some layers, as PATTERN=R entries (peft's rank_pattern): "
                               "the first PATTERN, a regex, that matches the end of a layer's "
                               "module name (e.g. 'layer.0.attention.self.query=16') gives "
                               "its rank.")
    alpha_pattern: tuple = flag("lora_alpha_pattern", (), "LoRA, DoRA, LoHa, LoKr: other "
                                "alphas for some layers, as PATTERN=ALPHA entries matched as "
                                "--lora_rank_pattern's (peft's alpha_pattern).")
    bias: str = flag("lora_bias", "none", "LoRA, DoRA: base biases that train too (peft's "
                     "bias): none, all (every bias of the encoder and pooler, as BitFit), "
                     "lora_only (the biases of the adapted layers).",
                     choices=lambda: LORA_BIASES)
    label: ClassVar[str] = "LoRA"
    added_fields: ClassVar[dict] = {"init": "default", "rank_pattern": (), "alpha_pattern": (),
                                    "bias": "none"}

    def __post_init__(self):
        if self.loraplus_lr_ratio < 0:
            raise JaxpeftError(f"LoRA+ learning-rate ratio must be >= 0 (0: off), got "
                               f"{self.loraplus_lr_ratio}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise JaxpeftError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise JaxpeftError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise JaxpeftError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", check_targets(self.targets, "LoRA"))
        if self.init not in LORA_INITS:
            raise JaxpeftError(f"--lora_init={self.init!r} is not one of: "
                               f"{', '.join(LORA_INITS)}")
        if self.bias not in LORA_BIASES:
            raise JaxpeftError(f"--lora_bias={self.bias!r} is not one of: "
                               f"{', '.join(LORA_BIASES)}")
        self.check_patterns()

    @property
    def scale(self) -> float:
        """The multiplier of `x @ a @ b` in layers no pattern names."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def scale_for(self, module: tuple) -> float:
        """The multiplier of `x @ a @ b` in the layer at module path `module` (peft's
        `scaling[adapter]` of that layer)."""
        r = self.rank_for(module)
        return self.alpha_for(module) / (math.sqrt(r) if self.use_rslora else r)


def add_lora(params: Any, config: LoraConfig, rng: jax.Array) -> Any:
    """Returns a new tree with `lora_a` / `lora_b` beside every targeted kernel.

    Default: `lora_a` uniform in `±1/sqrt(in)` (peft's `kaiming_uniform_(a=sqrt(5))`),
    `lora_b` zero, so the adapted model starts equal to the base model; `gaussian`: `lora_a`
    normal with std 1/r. `pissa` / `olora` (`kernel_factors`) start both at factors of the
    kernel and keep them as frozen `lora_a0` / `lora_b0`, whose product the layer subtracts:
    the model starts equal to the base, the base kernel itself is never changed.
    """
    flat = dict(traverse_util.flatten_dict(params))
    modules = target_modules(flat, config.targets, "LoRA")
    if any(p[-1] in ("lora_a", "lora_b") for p in flat):
        raise JaxpeftError("these params already have LoRA leaves")
    for i, mod in enumerate(modules):
        kernel = flat[mod + ("kernel",)]
        fan_in, fan_out = kernel.shape
        key, r = jax.random.fold_in(rng, i), config.rank_for(mod)
        if config.init in FROM_KERNEL:
            a, b = kernel_factors(kernel, config.init, r, config.scale_for(mod))
            flat[mod + ("lora_a0",)], flat[mod + ("lora_b0",)] = a, b
        else:
            if config.init == "gaussian":
                a = jax.random.normal(key, (fan_in, r), jnp.float32) / r
            else:
                bound = 1.0 / math.sqrt(fan_in)
                a = jax.random.uniform(key, (fan_in, r), jnp.float32, -bound, bound)
            b = jnp.zeros((r, fan_out), jnp.float32)
        flat[mod + ("lora_a",)], flat[mod + ("lora_b",)] = a, b
    return traverse_util.unflatten_dict(flat)


def kernel_factors(kernel: jax.Array, init: str, r: int,
                   scale: float) -> tuple[jax.Array, jax.Array]:
    """`(a (in, r), b (r, out))` with `scale · a @ b` the part of `kernel (in, out)` that
    PiSSA or OLoRA (`init`) moves into the adapter (peft's `pissa_init` / `olora_init` on `W =
    kernelᵀ`). PiSSA: the top-r singular triplets, `a = U_r sqrt(S_r / scale)`, `b =
    sqrt(S_r / scale) V_rᵀ`; OLoRA: `W = QR`, `a = R_rᵀ`, `b = Q_rᵀ`. Singular vectors and QR
    columns are defined up to sign; `a @ b` is not, so the model is the same as peft's."""
    w = kernel.astype(jnp.float32).T  # peft's (out, in) weight
    if init == "pissa":
        v, s, uh = jnp.linalg.svd(w, full_matrices=False)
        root = jnp.sqrt(s[:r] / scale)
        return (root[:, None] * uh[:r]).T, (v[:, :r] * root).T
    q, rr = jnp.linalg.qr(w)
    return rr[:r].T, q[:, :r].T


def merge_lora(params: Any, config: LoraConfig) -> Any:
    """Folds `(a @ b - a0 @ b0) * scale` into each kernel (`a0 @ b0`: PiSSA's and OLoRA's
    first factors, zero otherwise) and drops the LoRA leaves."""
    def fold(kernel, held, module):
        delta = held["lora_a"] @ held["lora_b"]
        if "lora_a0" in held:
            delta = delta - held["lora_a0"] @ held["lora_b0"]
        return kernel + delta * config.scale_for(module)

    return fold_into_kernels(params, ("lora_a", "lora_b", "lora_a0", "lora_b0"), fold)


def portable_lora(params: Any, config: LoraConfig) -> tuple[Any, LoraConfig]:
    """A PiSSA or OLoRA tree as a plain LoRA of rank 2r on the unchanged base (peft's
    conversion for sharing such adapters): `a' = [a, a0]`, `b' = [b; -b0]`, alpha scaled so
    that `scale` stays; other trees unchanged."""
    if config.init not in FROM_KERNEL:
        return params, config
    flat = dict(traverse_util.flatten_dict(params))
    for path in [p for p in flat if p[-1] == "lora_a0"]:
        mod = path[:-1]
        a0, b0 = flat.pop(path), flat.pop(mod + ("lora_b0",))
        flat[mod + ("lora_a",)] = jnp.concatenate([flat[mod + ("lora_a",)], a0], axis=1)
        flat[mod + ("lora_b",)] = jnp.concatenate([flat[mod + ("lora_b",)], -b0], axis=0)
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    ranks, alphas = config.patterns()  # every layer's rank and alpha change alike
    return traverse_util.unflatten_dict(flat), dataclasses.replace(
        config, rank=2 * config.rank, alpha=config.alpha * factor, init="default",
        rank_pattern=tuple(f"{p}={2 * r}" for p, r in ranks),
        alpha_pattern=tuple(f"{p}={a * factor}" for p, a in alphas))


@dataclasses.dataclass(frozen=True)
class LoraHook(DenseHook):
    """Adds `dropout(x) @ lora_a @ lora_b * scale` in layers holding LoRA leaves.

    The low-rank path stays separate (never `kernel + a @ b`), so training needs no gradient
    for the full kernel.
    """

    config: LoraConfig
    leaves: tuple = ("lora_a", "lora_b", "lora_a0", "lora_b0")

    def __call__(self, dense, x, y, kernel, bias, deterministic):
        if not dense.has_variable("params", "lora_a"):
            return y
        get = lambda n: dense.get_variable("params", n).astype(y.dtype)  # noqa: E731
        scale = jnp.asarray(self.config.scale_for(tuple(dense.scope.path)), y.dtype)
        h = Dropout(self.config.dropout)(x, deterministic=deterministic)
        out = y + token_matmul(token_matmul(h, get("lora_a")), get("lora_b")) * scale
        if dense.has_variable("params", "lora_a0"):
            # PiSSA / OLoRA: the residual base, W - scale · a0 b0, on the undropped input.
            out = out - token_matmul(token_matmul(x, get("lora_a0")), get("lora_b0")) * scale
        return out


class LoraCodec(PeftCodec):
    """peft's LORA: `lora_A.weight` (r, in) and `lora_B.weight` (out, r) per target."""

    peft_type = "LORA"
    label = "LoRA"
    markers = ("lora_",)

    def portable(self, peft, params):
        options = peft.options
        params, converted = portable_lora(params, options)
        return dataclasses.replace(peft, options=converted), params

    def config(self, options, family):
        return {"r": options.rank, "lora_alpha": options.alpha, "lora_dropout": options.dropout,
                "use_rslora": options.use_rslora, **options.peft_patterns(),
                "target_modules": peft_target_modules(options, family),
                "fan_in_fan_out": False, "bias": options.bias,
                "init_lora_weights": True if options.init == "default" else options.init}

    def matches(self, config):
        return config.get("peft_type") == "LORA" and not config.get("use_dora")

    def saved_tensors(self, config, saved):
        # With bias="all" peft saves every `.bias` of the model, the head's wrapper included:
        # its trained copy once more (`classifier.modules_to_save.bias`) and its untrained
        # original. `classifier.bias` is the head; the copies carry nothing else.
        if config.get("bias") != "all":
            return saved
        return {k: v for k, v in saved.items()
                if not re.search(r"\.(?:modules_to_save|original_module)\.(?:\w+\.)*bias$", k)}

    def options_from(self, config, modules):
        return lora_options_from_peft(config, modules, self.label)

    def leaf(self, path, value):
        # ours: a (in, r), b (r, out); peft: lora_A.weight (r, in), lora_B.weight (out, r)
        names = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}
        return (names[path[-1]], value.T) if path[-1] in names else None


class Lora(PeftMethod):
    """LoRA on the `--lora_targets` Dense layers; `lora_a`/`lora_b` (and the head) train."""

    name = "lora"
    summary = "low-rank updates of chosen Dense layers (Hu et al., 2021)"
    Options = LoraConfig
    default_learning_rate = 5e-4
    codec = LoraCodec()

    def requires(self, options):
        return options.targets + (("biases",) if options.bias != "none" else ())

    def augment(self, params, options, rng):
        return add_lora(params, options, rng)

    def rules(self, options):
        return [(r".*/lora_[ab]", True), *bias_rules(options), (".*", False)]

    def hooks(self, options):
        return (LoraHook(options),)

    def lr_multipliers(self, options):
        return [(r".*/lora_b", options.loraplus_lr_ratio)] if options.loraplus_lr_ratio else []

    def merge(self, params, options):
        return merge_lora(params, options)


def bias_rules(options: LoraConfig) -> list:
    """The mask rules of peft's `bias` option: every `bias` leaf (`all`), or those of the
    adapted layers in any family (`lora_only`), trainable."""
    if options.bias == "all":
        return [(r".*/bias", True)]
    if options.bias == "lora_only":
        layers = "|".join(f.target_regex(t) for f in FAMILIES.values()
                          for t in f.expand_targets(options.targets) if t in f.target_names)
        return [(f"(?:{layers})/bias", True)]
    return []


def targets_of_modules(modules: set, method: str) -> tuple:
    """Our target names of module paths (`("bert", "encoder", "layer_0", ...)`)."""
    family = _family(modules) if modules else None
    regexes = {t: family.target_regex(t) for t in family.target_names} if family else {}
    found = [t for t, rx in regexes.items()
             if any(re.fullmatch(rx, path_str(m)) for m in modules)]
    unknown = [m for m in modules
               if not any(re.fullmatch(rx, path_str(m)) for rx in regexes.values())]
    if unknown or not found:
        raise JaxpeftError(f"{method} adapter on modules jaxpeft does not adapt: "
                           f"{sorted(path_str(m) for m in unknown)[:3] or '(none)'}")
    return tuple(found)


def lora_options_from_peft(config, modules: set, method: str) -> "LoraConfig":
    """`LoraConfig` of a peft LoRA/DoRA `adapter_config.json`; refuses what differs from a
    plain per-module LoRA (fan_in_fan_out, another bias option)."""
    if config.get("fan_in_fan_out"):
        raise JaxpeftError(f"{method}: fan_in_fan_out adapters are not supported (they are "
                           "for GPT-2-style Conv1D layers, which no encoder here has)")
    bias = config.get("bias") or "none"
    if bias not in LORA_BIASES:
        raise JaxpeftError(f"{method}: bias={bias!r} is not supported (jaxpeft has "
                           f"{', '.join(LORA_BIASES)})")
    init = config.get("init_lora_weights", True)
    init = {True: "default", False: "default"}.get(init, init)
    if init not in LORA_INITS:
        raise JaxpeftError(f"{method}: init_lora_weights={init!r} is not supported (jaxpeft "
                           f"has {', '.join(LORA_INITS)})")
    return LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                      dropout=float(config.get("lora_dropout") or 0.0),
                      targets=targets_of_modules(modules, method),
                      use_rslora=bool(config.get("use_rslora")), init=init, bias=bias,
                      **RankPatterns.from_peft(config))


def peft_target_modules(config: LoraConfig, family: Family) -> Any:
    """peft's `target_modules` for these targets in `family`: a name list, or a regex when
    ambiguous.

    peft matches list entries as module-name suffixes, where BERT's `output.dense` would also
    hit `attention.output.dense`; a full-match regex over the module name is exact.
    """
    if "output" not in family.expand_targets(config.targets):
        return family.peft_names(config.targets)
    return family.peft_regex(config.targets)
