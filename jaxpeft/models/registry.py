"""The encoder families jaxpeft runs, by `model_type`: one line each."""

from __future__ import annotations

from typing import Any, Optional

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.bert import BERT, ELECTRA, ROBERTA, XLM_ROBERTA
from jaxpeft.models.deberta import DEBERTA_V2
from jaxpeft.models.distilbert import DISTILBERT
from jaxpeft.models.modernbert import MODERNBERT
from jaxpeft.models.family import Family

FAMILIES = {f.name: f for f in (BERT, ROBERTA, XLM_ROBERTA, ELECTRA, DISTILBERT,
                                         DEBERTA_V2, MODERNBERT)}


def get_family(model_type: Optional[str], source: str = "config.json") -> Family:
    """The family of a config.json's `model_type`; a clear error for others."""
    if model_type not in FAMILIES:
        raise JaxpeftError(f"{source}: model_type {model_type!r} is not supported; "
                           f"supported model types: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def family_of_params(params: Any) -> Family:
    """The family whose backbone a parameter tree holds (by its top-level prefix)."""
    for family in FAMILIES.values():
        if family.prefix in params:
            return family
    raise JaxpeftError(f"a parameter tree with top-level modules {sorted(params)} is no "
                       f"supported encoder ({', '.join(FAMILIES)})")


def backbone_prefixes() -> set:
    """The backbone prefixes of every family (`bert`, `model`, ...)."""
    return {f.prefix for f in FAMILIES.values()}


def norm_regex() -> str:
    """Regex of a LayerNorm module's name in any family."""
    names = dict.fromkeys(n for f in FAMILIES.values() for n in f.norms)
    return "(?:" + "|".join(names) + ")"


def target_aliases() -> dict:
    """transformers-style names users may give for our target names: each family's module
    path inside a layer (`attention.self.query`, `ffn.lin2`) and its last part where that
    names one target only (`q_lin`, `query_proj`), and a pooler's dense layer
    (`bert.pooler.dense`)."""
    aliases, last = {}, {}
    for family in FAMILIES.values():
        for target, module in family.targets.items():
            aliases[module] = target
            last.setdefault(module.rsplit(".", 1)[-1], set()).add(target)
        if family.pooler:
            aliases[family.module_name("pooler")] = "pooler"
    aliases.update({name: t.pop() for name, t in last.items() if len(t) == 1})
    return {a: t for a, t in aliases.items() if a != t}


def build_model(config, runtime=None):
    """The Flax classifier of `config`'s family."""
    family = get_family(config.model_type)
    return family.model(config) if runtime is None else family.model(config, runtime)
