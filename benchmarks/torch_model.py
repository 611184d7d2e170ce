"""The PyTorch side of the benchmarks: a transformers model training what a jaxpeft `Peft`
trains, built from the method objects (no method names here).

Methods Hugging Face peft has become a `PeftModel` with the config our export writes; the
others (BitFit, full) keep the plain model with `requires_grad` set from our trainable mask,
mapped to transformers' parameter names. Either way the trainable count equals ours.
"""

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.models import EncoderConfig
from jaxpeft.models.registry import build_model, get_family
from jaxpeft.models.checkpoint import hf_key
from jaxpeft.peft import Peft
from jaxpeft.peft.hf_export import peft_config_dict


def _trainable_names(model, peft: Peft) -> set:
    """transformers parameter names of the leaves `peft` trains (from shapes only)."""
    cfg = EncoderConfig.from_hf_dict(model.config.to_dict(), model.config.num_labels)
    ours = build_model(cfg)
    shapes = jax.eval_shape(
        lambda: peft.init(ours, ours.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
                          ["params"], jax.random.key(0))[1])
    mask = traverse_util.flatten_dict(peft.mask(shapes))
    return {hf_key(path) for path, trainable in mask.items() if trainable}


def _check_forward(model, name: str) -> None:
    """Raises NotImplementedError where peft builds the model but its forward refuses it
    (prefix tuning on BERT and RoBERTa under transformers 5): no peer to time."""
    import torch

    ids = torch.full((1, 4), 5, dtype=torch.long)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except ValueError as e:
        raise NotImplementedError(f"{name}: no PyTorch peer (peft's forward refuses this "
                                  f"model: {e})") from None


def torch_model_for(model, peft: Peft):
    """`model` (a transformers *ForSequenceClassification) set up to train what `peft` does."""
    import peft as hf_peft

    if peft.method.codec is not None:
        why = peft.method.codec.unsupported(peft.options)
        if why:
            raise NotImplementedError(f"{peft.name}: no PyTorch peer with these options ({why})")
        family = get_family(model.config.model_type)
        ours = EncoderConfig.from_hf_dict(model.config.to_dict(), model.config.num_labels)
        config = hf_peft.get_peft_config(peft_config_dict(peft, model.name_or_path, family,
                                                          inference_mode=False, config=ours))
        peer = hf_peft.get_peft_model(model, config)
        _check_forward(peer, peft.name)
        return peer
    names = _trainable_names(model, peft)
    missing = names - {name for name, _ in model.named_parameters()}
    if missing:
        raise NotImplementedError(f"{peft.name}: no PyTorch peer (peft has no such method, and "
                                  f"it trains parameters transformers lacks, e.g. "
                                  f"{sorted(missing)[0]})")
    found = set()
    for name, p in model.named_parameters():
        p.requires_grad = name in names
        found.update({name} & names)
    if found != names:
        raise RuntimeError(f"no transformers parameter for: {sorted(names - found)[:5]}")
    return model
