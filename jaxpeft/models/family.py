"""`Family`: what jaxpeft needs to know of one encoder family (BERT, RoBERTa, ELECTRA, ...).

A family is one module (its Flax model, unless it shares another's) and one `Family` value
in `jaxpeft.models.registry`. The value says how the family's transformers checkpoints and
config files are named, which Flax module runs it, and where PEFT methods find their
targets, so the loader, the methods, the export and the import need no per-family code.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

# Our name of each layer a method may target; `Family.targets` gives its module per family.
# `qkv` is a fused query/key/value projection (ModernBERT's Wqkv); `pooler` is the dense layer
# of a pretrained pooler outside the layers (BERT's), where the family has one.
TARGET_NAMES = ("query", "key", "value", "qkv", "attention_output", "intermediate", "output",
                "pooler")
# peft's `target_modules="all-linear"`: every target the family has (the head trains whole).
ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class Family:
    """One encoder family.

    name: `model_type` in config.json.
    prefix: the backbone's name in the parameter tree and in transformers' state dicts.
    hf_class: transformers' `*ForSequenceClassification` class.
    model: the Flax module class, called `model(config, runtime)`.
    targets: our target name (`TARGET_NAMES`) -> transformers' module path inside one layer
      (BERT: `attention.self.query`; DistilBERT: `attention.q_lin`).
    layers: transformers' path of the layer list below the prefix.
    head: top-level modules of the task head, trained by every method (peft's
      `modules_to_save`).
    pooler: the module path of a pretrained pooler (BERT's) that `--train_pooler` trains, or
      whose `dense` layer a method targets (`pooler`).
    norms: the names of its LayerNorm modules.
    peft_norms: peft's `target_modules` for its LayerNorms, where the names alone would
      also hit modules without weights (ModernBERT's first `attn_norm` is an identity).
    word_embeddings: transformers' path of the token embedding table below the prefix.
    biases: whether its layers have biases (BitFit needs them).
    config_names: config.json field -> `EncoderConfig` field, where the family names it
      otherwise (DistilBERT's `dim`, `n_layers`, ...).
    config_fixed: `EncoderConfig` values the family fixes whatever its config says.
    config_class: an `EncoderConfig` subclass with the family's own fields (DeBERTa's
      relative attention), if it has any.
    attention_prefix: whether its attention takes keys and values beyond the input's
      (`AttentionHook`: prefix tuning); not where positions enter attention itself
      (DeBERTa's relative terms, ModernBERT's rotary keys), which a prefix has none of.
    layer_hooks: whether its layer stack is the shared `EncoderLayers`, which runs
      `LayerHook`s between layers (ReFT); DeBERTa and ModernBERT run their own stacks.
    """

    name: str
    prefix: str
    hf_class: str
    model: Any
    targets: Mapping[str, str]
    layers: str = "encoder.layer"
    head: tuple = ("classifier",)
    pooler: Optional[str] = None
    norms: tuple = ("LayerNorm",)
    peft_norms: Any = None
    word_embeddings: str = "embeddings.word_embeddings"
    biases: bool = True
    config_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    config_fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config_class: Any = None
    attention_prefix: bool = True
    layer_hooks: bool = True

    def translate_config(self, d: Mapping) -> dict:
        """A config.json's fields under `EncoderConfig`'s names."""
        out = {self.config_names.get(k, k): v for k, v in d.items()}
        return {**out, **self.config_fixed, "model_type": self.name}

    @property
    def layer_regex(self) -> str:
        """Regex of a layer's module path in our trees (`bert/encoder/layer_3`)."""
        return re.escape(self.prefix + "/" + self.layers.replace(".", "/")) + r"_\d+"

    @property
    def target_names(self) -> tuple:
        """The target names this family has: its layers' and, with a pooler, `pooler`."""
        return tuple(self.targets) + (("pooler",) if self.pooler else ())

    def expand_targets(self, targets) -> tuple:
        """`targets` with `all-linear` replaced by every target this family has."""
        expanded = (t2 for t in targets for t2 in (self.target_names if t == ALL_LINEAR else (t,)))
        return tuple(dict.fromkeys(expanded))

    def module_name(self, target: str) -> str:
        """transformers' module name of `target` (the first layer's, for a layer target)."""
        if target == "pooler":
            return self.pooler + ".dense"
        return f"{self.prefix}.{self.layers}.0.{self.targets[target]}"

    def target_regex(self, target: str) -> str:
        """Regex of the module path (in our trees) of one target in every layer (the pooler's
        dense layer for `pooler`)."""
        if target == "pooler":
            return re.escape(self.module_name("pooler").replace(".", "/"))
        return self.layer_regex + "/" + re.escape(self.targets[target].replace(".", "/"))

    def peft_regex(self, targets) -> str:
        """peft's `target_modules` regex (full match over transformers module names) of
        `targets` in every layer (and of the pooler's dense layer)."""
        targets = self.expand_targets(targets)
        alternatives = "|".join(re.escape(self.targets[t]) for t in targets if t != "pooler")
        layers = rf".*\.{re.escape(self.layers)}\.\d+\.(?:{alternatives})"
        if "pooler" not in targets:
            return layers
        pooler = re.escape(self.module_name("pooler"))
        return f"(?:{layers}|{pooler})" if alternatives else pooler

    def peft_names(self, targets) -> list:
        """peft's `target_modules` as a list of module-name suffixes."""
        return [self.module_name(t) if t == "pooler" else self.targets[t]
                for t in self.expand_targets(targets)]

    def head_regex(self) -> str:
        """Regex over our parameter paths of the task head."""
        return "(?:" + "|".join(re.escape(h) for h in self.head) + ")/.*"

    def pooler_regex(self) -> Optional[str]:
        """Regex over our parameter paths of the pretrained pooler, if the family has one."""
        return None if self.pooler is None else re.escape(self.pooler.replace(".", "/")) + "/.*"

    def provides(self) -> set:
        """What PEFT methods may require of it: its target names (and `all-linear`), `biases`,
        `attention_prefix` and `layer_hooks`."""
        return (set(self.target_names) | {ALL_LINEAR} | ({"biases"} if self.biases else set())
                | ({"attention_prefix"} if self.attention_prefix else set())
                | ({"layer_hooks"} if self.layer_hooks else set()))

    @property
    def class_stem(self) -> str:
        """The stem of the family's transformers class names (`Bert`, `XLMRoberta`)."""
        return self.hf_class.removesuffix("ForSequenceClassification")
