"""IA3 (Liu et al., 2022): learned vectors that rescale activations, initialised to ones.

`--ia3_targets` picks Dense layers by LoRA's target names. `output` and `attention_output`
(the layers transformers names `output.dense`) scale their **input**, as IA3 scales the
feed-forward activation and as peft's BERT defaults do (`feedforward_modules=["output.dense"]`,
whose suffix match also hits `attention.output.dense`); every other target scales its
output (bias included, as peft does). Leaves: `ia3_in` (in,) or `ia3_out` (out,).

Our default targets are the paper's, `key,value,output` (14,594 trainable on MiniLM with 2
labels); `--ia3_targets=key,value,output,attention_output` is peft's default set (16,898).
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import DenseHook, per_token, token_matmul
from jaxpeft.models.registry import family_of_params
from jaxpeft.peft.lora import check_targets, target_modules, targets_of_modules
from jaxpeft.peft.codec import PeftCodec
from jaxpeft.peft.method import MethodOptions, PeftMethod, flag

# Targets whose input is scaled (transformers' `output.dense` modules).
INPUT_SCALED = ("output", "attention_output")


@dataclasses.dataclass(frozen=True)
class Ia3Config(MethodOptions):
    """IA3 options: `targets`, any of LoRA's target names."""

    targets: tuple = flag("ia3_targets", ("key", "value", "output"), "Layers IA3 scales "
                          "(names as --lora_targets): output and attention_output scale their "
                          "input, the others their output. Add attention_output for peft's "
                          "default set and count.")
    label: ClassVar[str] = "IA3"

    def __post_init__(self):
        object.__setattr__(self, "targets", check_targets(self.targets, "IA3"))


@dataclasses.dataclass(frozen=True)
class Ia3Hook(DenseHook):
    """`(x ⊙ ia3_in) W + b`, or `(x W + b) ⊙ ia3_out`."""

    leaves: tuple = ("ia3_in", "ia3_out")

    def __call__(self, dense, x, y, kernel, bias, deterministic):
        if dense.has_variable("params", "ia3_in"):
            # XLA drops the unscaled product y, which is no longer used.
            scaled = x * per_token(dense.get_variable("params", "ia3_in"), x)
            y = token_matmul(scaled, kernel) + bias
        if dense.has_variable("params", "ia3_out"):
            y = y * per_token(dense.get_variable("params", "ia3_out"), y)
        return y


class Ia3Codec(PeftCodec):
    """peft's IA3: `ia3_l` per target, `feedforward_modules` the input-scaled ones."""

    peft_type = "IA3"
    markers = ("ia3_l",)

    def config(self, options, family):
        targets = family.expand_targets(options.targets)
        return {"target_modules": family.peft_regex(targets),
                "feedforward_modules": family.peft_regex([t for t in targets
                                                          if t in INPUT_SCALED] or ["output"]),
                "fan_in_fan_out": False, "init_ia3_weights": True}

    def options_from(self, config, modules):
        targets = targets_of_modules(modules, "IA3")
        family = family_of_params({m[0] for m in modules})
        # peft scales the input of its feedforward modules (a regex, or name suffixes); ours
        # are output and attention_output.
        ff = config.get("feedforward_modules") or []
        for t in targets:
            name = family.module_name(t)
            is_ff = bool(re.fullmatch(ff, name)) if isinstance(ff, str) else any(
                name == f or name.endswith("." + f) for f in ff)
            if is_ff != (t in INPUT_SCALED):
                raise JaxpeftError(f"IA3 adapter scales the {'input' if is_ff else 'output'} of "
                                   f"{t}; jaxpeft scales the input of output/attention_output "
                                   "and the output of the others")
        return Ia3Config(targets=targets)

    def leaf(self, path, value):
        # peft: ia3_l (1, in) on feed-forward layers, (out, 1) on the others
        if path[-1] == "ia3_in":
            return "ia3_l", value.reshape(1, -1)
        if path[-1] == "ia3_out":
            return "ia3_l", value.reshape(-1, 1)
        return None


class Ia3(PeftMethod):
    """Scaling vectors on the `--ia3_targets` layers (and the head) train."""

    name = "ia3"
    summary = "learned scaling vectors on keys, values and the FFN activation (Liu et al., 2022)"
    Options = Ia3Config
    default_learning_rate = 3e-3  # the IA3 paper's (T-Few) learning rate
    codec = Ia3Codec()

    def requires(self, options):
        return options.targets

    def augment(self, params, options, rng):
        flat = dict(traverse_util.flatten_dict(params))
        for target in family_of_params(params).expand_targets(options.targets):
            leaf = "ia3_in" if target in INPUT_SCALED else "ia3_out"
            for mod in target_modules(flat, (target,), "IA3"):
                size = flat[mod + ("kernel",)].shape[0 if leaf == "ia3_in" else 1]
                flat[mod + (leaf,)] = jnp.ones((size,), jnp.float32)
        return traverse_util.unflatten_dict(flat)

    def rules(self, options):
        return [(r".*/ia3_(in|out)", True), (".*", False)]

    def hooks(self, options):
        return (Ia3Hook(),)

    def merge(self, params, options):
        flat = dict(traverse_util.flatten_dict(params))
        for path in [p for p in flat if p[-1] in ("ia3_in", "ia3_out")]:
            mod, s = path[:-1], flat.pop(path)
            if path[-1] == "ia3_in":
                flat[mod + ("kernel",)] = flat[mod + ("kernel",)] * s[:, None]
            else:
                flat[mod + ("kernel",)] = flat[mod + ("kernel",)] * s[None, :]
                if mod + ("bias",) in flat:  # bias-free layers (ModernBERT)
                    flat[mod + ("bias",)] = flat[mod + ("bias",)] * s
        return traverse_util.unflatten_dict(flat)
