"""PEFT methods over one parameter tree: a registry of `PeftMethod`s, each bound to its
options as a `Peft` (init, mask, count, merge), adapter files and the peft export."""

from jaxpeft.peft.adapters import load_adapter, read_adapter_config, save_adapter
from jaxpeft.peft.hf_export import export_merged, export_peft
from jaxpeft.peft.hf_import import import_peft
from jaxpeft.peft.lora import LoraConfig, add_lora, merge_lora
from jaxpeft.peft.weighted import combine_lora
from jaxpeft.peft.masks import (ParamCounts, combine, count_params, mask_from_rules, partition,
                                path_str)
from jaxpeft.peft.codec import PeftCodec
from jaxpeft.peft.method import MethodOptions, NoOptions, Peft, PeftMethod, flag, shared_flag
from jaxpeft.peft.registry import (METHODS, get_method, make_peft, method_flags, peft_from_dict,
                                   peft_from_run)

__all__ = ["METHODS", "LoraConfig", "MethodOptions", "NoOptions", "ParamCounts", "Peft",
           "PeftCodec", "PeftMethod", "add_lora", "combine", "combine_lora", "count_params",
           "export_merged",
           "export_peft", "flag", "get_method", "import_peft", "load_adapter", "make_peft",
           "mask_from_rules", "merge_lora", "method_flags", "partition", "path_str",
           "peft_from_dict", "peft_from_run", "read_adapter_config", "save_adapter",
           "shared_flag"]
