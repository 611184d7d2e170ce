"""How a PEFT method's adapter is named in Hugging Face peft's files: `PeftCodec`.

A method that peft also implements carries one codec (`PeftMethod.codec`), defined in the
method's own module. The export (`hf_export`) and the import (`hf_import`) run the same
codec, one forwards and one backwards, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional

from jaxpeft.errors import JaxpeftError


class PeftCodec:
    """One method's peft naming. Subclasses set `peft_type` and override what they need."""

    # peft's `peft_type` in adapter_config.json.
    peft_type: ClassVar[str] = ""
    # What peft's state dict puts before a transformers key (prompt learning: "base_model.").
    prefix: ClassVar[str] = "base_model.model."
    # How the names of its own tensors inside a module begin (`lora_` of `lora_A.weight`): the
    # import finds the adapted modules by them.
    markers: ClassVar[tuple] = ()

    def unsupported(self, options: Any) -> Optional[str]:
        """Why these options have no peft export, or None when they have one."""
        return None

    def portable(self, peft: Any, params: Any) -> tuple[Any, Any]:
        """`(peft, params)` as the export writes them: a tree peft loads on the unchanged
        base (LoRA from PiSSA/OLoRA: a plain LoRA of twice the rank); default unchanged."""
        return peft, params

    def config(self, options: Any, family: Any) -> dict:
        """The method's fields of peft's `adapter_config.json` (beside task and head) for a
        model of `family` (`jaxpeft.models.family.Family`: its module names)."""
        raise NotImplementedError

    def model_fields(self, config: Any) -> dict:
        """Fields of `adapter_config.json` taken from the base model's `EncoderConfig`, where
        peft cannot read them from every family's transformers config."""
        return {}

    def leaf(self, path: tuple, value: Any) -> Optional[tuple[str, Any]]:
        """`(peft key below the module, value)` for a trainable leaf peft names its own way
        (a leaf the method added, or a base leaf peft keeps a copy of); None otherwise. A
        leaf at the tree's root maps to one of peft's top-level keys (a soft prompt)."""
        return None

    def extra(self, params: Any, options: Any) -> dict:
        """Frozen tensors peft's file also needs, by full peft key (VeRA's projections)."""
        return {}

    def as_saved(self, tensors: dict, config: dict) -> tuple[dict, dict]:
        """`(tensors, adapter_config)` as peft itself saves them (AdaLoRA: only the triplets
        its allocator kept, and the `rank_pattern` naming them); default unchanged. The
        import's `saved_tensors` undoes it."""
        return tensors, config

    def saved_tensors(self, config: Mapping, saved: dict) -> dict:
        """peft's saved tensors in the layout the export writes (AdaLoRA: pruned triplets
        back at full rank); default unchanged."""
        return saved

    def matches(self, config: Mapping) -> bool:
        """Whether a peft `adapter_config.json` describes this method (import)."""
        return config.get("peft_type") == self.peft_type

    def options_from(self, config: Mapping, modules: set) -> Any:
        """The options of a peft adapter (`modules`: our paths of the modules its tensors
        sit in); a clear error for what jaxpeft cannot reproduce."""
        raise JaxpeftError(f"importing peft {self.peft_type} adapters is not supported")
