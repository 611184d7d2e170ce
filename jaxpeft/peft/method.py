"""The PEFT-method interface, and `Peft`: a method bound to its options.

A method is one module under `jaxpeft/peft/` defining a `PeftMethod` subclass and one line in
`registry.py`. It says:
- `Options`: its config dataclass (frozen, with `to_dict`/`from_dict`); fields declared with
  `flag(...)` are run flags (`--lora_rank`), generated into `RunConfig`, `--help`, sweeps and
  validation by the registry, and read back by `options_from`; `shared_flag(...)` reuses a
  flag another method declares (VeRA's targets are `--lora_targets`);
- `augment`: the leaves it adds to the parameter tree (LoRA's `lora_a`/`lora_b`);
- `rules`: path rules deciding which leaves train (the head's rules come first, always);
- `hooks`: what the forward pass needs (`DenseHook`s / `EmbeddingHook`s installed in the
  model's `Runtime`), and `virtual_tokens`: input slots it needs before each example (soft
  prompts);
- `lr_multipliers`: per-leaf learning-rate factors (LoRA+), if any;
- `penalty` and `wrap_optimizer`: a loss term and an optimizer wrapper, if training needs
  them (AdaLoRA's orthogonality penalty and rank allocator);
- `merge`: folding its leaves into plain weights, where the method allows it;
- `codec`: its naming in Hugging Face peft's files (`jaxpeft.peft.codec.PeftCodec`), where
  peft has the method.

Everything else (the run loop, adapter files, the peft export's shared parts, counts, the
benchmark, the tests) works through `Peft`, never through a method's name. A `Peft` is what
an adapter folder saves and what `load_adapter` restores, so a tree is never applied without
the options it was trained with.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, ClassVar, Mapping, Optional

import jax
import numpy as np
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.bert import SequenceClassifier
from jaxpeft.models.checkpoint import hf_module_key
from jaxpeft.models.registry import family_of_params
from jaxpeft.peft.codec import PeftCodec
from jaxpeft.peft.masks import ParamCounts, Rules, count_params, head_rules, mask_from_rules


def flag(name: str, default: Any, help: str, *,
         choices: Optional[Callable[[], tuple]] = None) -> Any:
    """An option field that is also the run flag `--name` (its default and help are the
    flag's). The field's own `__post_init__` checks stay the place for value checks."""
    return dataclasses.field(default=default, metadata={"flag": name, "help": help,
                                                        "choices": choices})


def shared_flag(name: str, default: Any) -> Any:
    """An option field read from the flag `--name` that another method declares with `flag`
    (one flag, one help text: VeRA's targets are LoRA's `--lora_targets`)."""
    return dataclasses.field(default=default, metadata={"flag": name, "help": None,
                                                        "choices": None})


def module_patterns(entries: tuple, flag_name: str, kind: type = int) -> tuple:
    """`((PATTERN, value), ...)` of a per-layer option given as `PATTERN=VALUE` entries (the
    flag form of peft's `rank_pattern`-style dicts), in order; each value a positive `kind`,
    each PATTERN a regex. Raises one clear error naming the flag and the entry."""
    out = []
    for entry in entries:
        pattern, sep, raw = str(entry).rpartition("=")
        if not sep or not pattern:
            raise JaxpeftError(f"--{flag_name}: {entry!r} is not PATTERN=VALUE")
        try:
            value = kind(raw.strip())
            re.compile(pattern)
        except ValueError:
            value = None
        except re.error as err:
            raise JaxpeftError(f"--{flag_name}: {pattern!r} is not a regex ({err})") from None
        if value is None or value <= 0:
            raise JaxpeftError(f"--{flag_name}: {entry!r}: the value must be a positive "
                               f"{kind.__name__}")
        out.append((pattern, value))
    return tuple(out)


def pattern_value(patterns: tuple, module: tuple, default: Any) -> Any:
    """The value `module_patterns` gives the layer at module path `module`: that of the first
    pattern p for which `(.*[.])?(p)$` matches the layer's transformers module name (peft's
    `get_pattern_key`), else `default`."""
    name = hf_module_key(module)
    for pattern, value in patterns:
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """A method flag as the run configuration sees it: name, default, Python type (`int`,
    `float`, `bool`, `str`, `tuple`), help, allowed values, the methods reading it."""

    name: str
    default: Any
    kind: type
    help: str
    choices: Optional[Callable[[], tuple]]
    methods: tuple


_KINDS = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple,
          "Optional[float]": float}


def value_kind(annotation: Any) -> type:
    """The Python type an option field holds, from its annotation (a string under
    `from __future__ import annotations`): int, float, bool, str or tuple."""
    return annotation if isinstance(annotation, type) else _KINDS[str(annotation)]


def option_flags(options_cls: type) -> dict:
    """`{option field name: flag name}` of an `Options` dataclass's flag fields."""
    return {f.name: f.metadata["flag"] for f in dataclasses.fields(options_cls)
            if "flag" in f.metadata}


def flag_specs(methods) -> dict:
    """`{flag name: FlagSpec}` declared by `methods`' `Options`, in declaration order; a
    flag two methods read must have one default, and one of them must declare its help."""
    specs: dict = {}
    for method in methods:
        for f in dataclasses.fields(method.Options):
            if "flag" not in f.metadata:
                continue
            name, meta = f.metadata["flag"], f.metadata
            kind, old = value_kind(f.type), specs.get(name)
            if old is not None and old.default != f.default:
                raise ValueError(f"--{name}: {method.name} and {old.methods} declare the "
                                 f"defaults {f.default!r} and {old.default!r}")
            specs[name] = FlagSpec(name, f.default, kind,
                                   meta["help"] or (old.help if old else None),
                                   meta["choices"] or (old.choices if old else None),
                                   (old.methods if old else ()) + (method.name,))
    unexplained = [n for n, spec in specs.items() if not spec.help]
    if unexplained:
        raise ValueError(f"shared flags no method declares: {unexplained}")
    return specs


class MethodOptions:
    """Base of every method's frozen options dataclass: the JSON round trip for
    `adapter.json`. `label` names the method in errors."""

    label: ClassVar[str] = "method"
    # Fields newer than some saved adapter files, with the value those files meant.
    added_fields: ClassVar[dict] = {}

    def to_dict(self) -> dict:
        """Plain-dict view, for JSON files (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "MethodOptions":
        """Inverse of `to_dict`; every field must be present (no silent defaults), except a
        field added after files were written (`added_fields`: the value that reproduces
        what those files meant)."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {**{k: v for k, v in cls.added_fields.items() if k not in d}, **d}
        if set(d) != names:
            raise JaxpeftError(f"{cls.label} options {sorted(d)} do not match {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class RankPatterns:
    """Per-layer ranks and alphas of a low-rank method's options (LoRA, DoRA, LoHa, LoKr):
    its `rank_pattern` / `alpha_pattern` fields (peft's keys of the same names) hold
    `PATTERN=VALUE` entries, read by `rank_for`, `alpha_for` and `scale_for`."""

    def check_patterns(self) -> None:
        """Normalises the pattern fields to tuples of strings and checks them."""
        for name in ("rank_pattern", "alpha_pattern"):
            object.__setattr__(self, name, tuple(str(e) for e in getattr(self, name)))
        self.patterns()

    def patterns(self) -> tuple:
        """`(rank pairs, alpha pairs)`: `((PATTERN, value), ...)` of each pattern flag."""
        return (module_patterns(self.rank_pattern, "lora_rank_pattern", int),
                module_patterns(self.alpha_pattern, "lora_alpha_pattern", float))

    def rank_for(self, module: tuple) -> int:
        """The rank of the layer at module path `module`."""
        return pattern_value(self.patterns()[0], module, self.rank)

    def alpha_for(self, module: tuple) -> float:
        """The alpha of the layer at module path `module`."""
        return pattern_value(self.patterns()[1], module, self.alpha)

    def scale_for(self, module: tuple) -> float:
        """The multiplier of the update in the layer at module path `module` (peft's
        `scaling[adapter]` of that layer): alpha / r."""
        return self.alpha_for(module) / self.rank_for(module)

    def peft_patterns(self) -> dict:
        """The patterns as peft's config keys."""
        ranks, alphas = self.patterns()
        return {"rank_pattern": dict(ranks), "alpha_pattern": dict(alphas)}

    @staticmethod
    def from_peft(config: Mapping) -> dict:
        """The pattern fields of a peft config's `rank_pattern` / `alpha_pattern`."""
        return {f: tuple(f"{p}={v}" for p, v in (config.get(f) or {}).items())
                for f in ("rank_pattern", "alpha_pattern")}


@dataclasses.dataclass(frozen=True)
class NoOptions(MethodOptions):
    """The options of a method that has none."""


class PeftMethod:
    """One PEFT method. Subclasses set the class attributes and override what they need."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line, for --help and the README
    Options: ClassVar[type] = NoOptions
    default_learning_rate: ClassVar[float] = 1e-3
    # Whether `merge` can fold the method into plain weights (not: adapters, prompts).
    mergeable: ClassVar[bool] = True
    # Its naming in Hugging Face peft's files; None where peft does not have the method.
    codec: ClassVar[Optional[PeftCodec]] = None

    def options_from(self, run: Any) -> Any:
        """The method's options from a run configuration (an object with the flags as
        attributes): each `flag` field from its flag, the others at their defaults."""
        return self.Options(**{field: getattr(run, name)
                               for field, name in option_flags(self.Options).items()})

    def requires(self, options: Any) -> tuple:
        """What the encoder family must have for this method: target names (`query`, `qkv`,
        ...) or `biases` (default: nothing)."""
        return ()

    def augment(self, params: Any, options: Any, rng: jax.Array) -> Any:
        """The parameter tree with this method's leaves added (default: unchanged)."""
        return params

    def rules(self, options: Any) -> Rules:
        """`(regex, trainable)` rules for the leaves the head rules leave; must cover all."""
        raise NotImplementedError

    def hooks(self, options: Any) -> tuple:
        """`DenseHook`s / `EmbeddingHook`s the forward pass needs (default: none)."""
        return ()

    def virtual_tokens(self, options: Any) -> int:
        """Virtual-token slots the data pipeline reserves before each example (default 0)."""
        return 0

    def lr_multipliers(self, options: Any) -> Rules:
        """`(regex, factor)` rules scaling some leaves' learning rate (LoRA+); default none."""
        return []

    def penalty(self, options: Any) -> Optional[Callable[[Any], jax.Array]]:
        """A term added to the training loss, a function of the trainable tree (AdaLoRA's
        orthogonality penalty); default none."""
        return None

    def wrap_optimizer(self, options: Any, tx: Any, total_steps: int) -> Any:
        """The optax transformation the run trains with, given the plain one (AdaLoRA's rank
        allocator acts after each update); default `tx` itself."""
        return tx

    def merge(self, params: Any, options: Any) -> Any:
        """The tree with this method's leaves folded into plain weights (default: unchanged,
        for methods that add no leaves)."""
        return params


def fold_into_kernels(params: Any, leaves: tuple,
                      fold: Callable[[jax.Array, dict, tuple], jax.Array]) -> Any:
    """The tree with `leaves` dropped from every module that holds any of them and its kernel
    replaced by `fold(kernel, held, module)`, `held` mapping each of those leaves the module
    has to its value (`module`: its path, for per-layer options): the merge of every method
    that rewrites the frozen kernel."""
    flat = dict(traverse_util.flatten_dict(params))
    for mod in {p[:-1] for p in flat if p[-1] in leaves}:
        held = {n: flat.pop(mod + (n,)) for n in leaves if mod + (n,) in flat}
        flat[mod + ("kernel",)] = fold(flat[mod + ("kernel",)], held, mod)
    return traverse_util.unflatten_dict(flat)


# What a method may require of a family beyond target layers and biases
# (`Family.provides`): what the method does with it, and what a family without it does.
_CAPABILITIES = {
    "layer_hooks": ("acts between the layers of the shared layer stack",
                    "runs its own"),
    "attention_prefix": ("needs attention that takes extra keys and values",
                         "computes attention positions from its keys (relative or rotary), "
                         "which a prefix has none of"),
}


@dataclasses.dataclass(frozen=True)
class Peft:
    """A method with its options and whether BERT's pooler trains beside the head.

    Build one with `jaxpeft.peft.make_peft(name, run)` or restore it with
    `jaxpeft.peft.peft_from_dict`; then `init` (augment the tree and configure the model),
    `mask`, `count`, `merge`, and `to_dict` for the adapter files.
    """

    method: PeftMethod
    options: Any
    train_pooler: bool = False

    @property
    def name(self) -> str:
        """The method's registry name (`--method`)."""
        return self.method.name

    def check_family(self, family) -> None:
        """Refuses, in one line, a family that lacks what this method needs (LoRA on query
        and value of ModernBERT, whose projection is the fused `qkv`; BitFit without biases)."""
        required = self.method.requires(self.options)
        missing = [r for r in required if r not in family.provides()]
        for capability, (needs, instead) in _CAPABILITIES.items():
            if capability in missing:
                raise JaxpeftError(f"{self.name} {needs}; {family.name} {instead}: choose "
                                   "another method or a BERT-like model")
        if self.train_pooler and "pooler" in family.expand_targets(
                [r for r in required if r not in missing]):
            raise JaxpeftError(f"{self.name}: --train_pooler trains the pooler whole, so it "
                               "cannot also be a target; drop one (all-linear includes the "
                               "pooler: list the other targets instead)")
        if missing:
            offered = ", ".join(family.target_names)
            raise JaxpeftError(
                f"{self.name} needs {', '.join(missing)}, which {family.name} does not have "
                f"(its layers: {offered}{'' if family.biases else '; no biases'}); choose "
                "others with the method's targets flag")

    def init(self, model: SequenceClassifier, params: Any,
             rng: jax.Array) -> tuple[SequenceClassifier, Any]:
        """`(model, params)` ready to train: new leaves added, forward-pass hooks installed."""
        self.check_family(family_of_params(params))
        return self.attach(model), self.method.augment(params, self.options, rng)

    def attach(self, model: SequenceClassifier) -> SequenceClassifier:
        """The same model with this method's hooks (for a tree that already has its leaves)."""
        runtime = dataclasses.replace(model.runtime, hooks=self.method.hooks(self.options))
        return model.clone(runtime=runtime)

    def mask(self, params: Any) -> Any:
        """Bool tree of trainable leaves: the head (and pooler, if asked), then the method's."""
        return mask_from_rules(params, head_rules(family_of_params(params), self.train_pooler)
                               + list(self.method.rules(self.options)))

    @property
    def virtual_tokens(self) -> int:
        """Virtual-token slots this method needs before each example."""
        return self.method.virtual_tokens(self.options)

    @property
    def penalty(self) -> Optional[Callable[[Any], jax.Array]]:
        """The method's loss term over the trainable tree, or None."""
        return self.method.penalty(self.options)

    def wrap_optimizer(self, tx: Any, total_steps: int) -> Any:
        """The optimizer this method trains with, from the plain one."""
        return self.method.wrap_optimizer(self.options, tx, total_steps)

    def lr_multipliers(self, params: Any) -> Optional[Any]:
        """A tree of per-leaf learning-rate factors, or None when every factor is 1."""
        rules = list(self.method.lr_multipliers(self.options))
        return mask_from_rules(params, rules + [(".*", 1.0)]) if rules else None

    def trainable_leaves(self, params: Any) -> dict:
        """`{path: numpy array}` of the leaves this method trains; only those leave the
        device."""
        flat, mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(
            self.mask(params))
        fetched = jax.device_get({p: v for p, v in flat.items() if mask[p]})
        return {p: np.asarray(v) for p, v in fetched.items()}

    def count(self, params: Any) -> ParamCounts:
        """Total and trainable parameter counts of `params` under this method."""
        return count_params(params, self.mask(params))

    def merge(self, model: SequenceClassifier, params: Any) -> tuple[SequenceClassifier, Any]:
        """A plain model and tree computing the same function (for inference and export)."""
        merged = self.method.merge(params, self.options)
        return model.clone(runtime=dataclasses.replace(model.runtime, hooks=())), merged

    def to_dict(self) -> dict:
        """Plain-dict view, saved in `adapter.json`."""
        return {"method": self.name, "options": self.options.to_dict(),
                "train_pooler": self.train_pooler}

    def require_peft_export(self) -> None:
        """Raises a clear error if Hugging Face peft has no format for this method and
        options."""
        codec = self.method.codec
        why = (f"Hugging Face peft has no {self.name!r} method; export works for methods peft "
               "implements") if codec is None else codec.unsupported(self.options)
        if why:
            raise JaxpeftError(f"--export_peft: {why}")
