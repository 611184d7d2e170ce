"""PEFT methods as trainable masks over one parameter tree: full, LoRA, BitFit."""

from jaxpeft.peft.adapters import export_peft, load_adapter, read_adapter_config, save_adapter
from jaxpeft.peft.bitfit import bitfit_mask
from jaxpeft.peft.lora import LoraConfig, add_lora, lora_mask, lora_model, merge_lora
from jaxpeft.peft.masks import (ParamCounts, combine, count_params, full_mask, mask_from_rules,
                                partition, path_str)
from jaxpeft.peft.methods import METHODS, trainable_mask

__all__ = ["METHODS", "LoraConfig", "ParamCounts", "add_lora", "bitfit_mask", "combine",
           "count_params", "export_peft", "full_mask", "load_adapter", "lora_mask",
           "lora_model", "mask_from_rules", "merge_lora", "partition", "path_str",
           "read_adapter_config", "save_adapter", "trainable_mask"]
