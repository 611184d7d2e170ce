"""Test helpers: tiny PyTorch reference models saved as Hugging Face folders."""

from pathlib import Path

import numpy as np


def tiny_hf_config(model_type: str, num_labels: int = 2, **overrides):
    """A 2-layer, hidden-32 transformers config for BERT or RoBERTa."""
    import transformers

    common = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=72, num_labels=num_labels,
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    common.update(overrides)
    if model_type == "bert":
        return transformers.BertConfig(type_vocab_size=2, **common)
    return transformers.RobertaConfig(type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                                      eos_token_id=2, **common)


def save_torch_model(torch_cls, config, out_dir: Path, seed: int = 0):
    """Builds a seeded PyTorch model and saves it (safetensors) into `out_dir`."""
    import torch

    torch.manual_seed(seed)
    model = torch_cls(config).eval()
    model.save_pretrained(out_dir)
    return model


def random_batch(model_type: str, batch=4, length=12, vocab=120, pairs=False, seed=0):
    """Random ids with right padding of varied length (and BERT sentence-pair types)."""
    rng = np.random.default_rng(seed)
    pad = 1 if model_type == "roberta" else 0
    ids = rng.integers(3, vocab, size=(batch, length))
    lengths = np.linspace(length, 3, batch).astype(int)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, pad)
    types = np.zeros_like(ids)
    if pairs:
        types = ((np.arange(length)[None, :] >= lengths[:, None] // 2) & (mask == 1)).astype(
            np.int64)
    return ids, mask, types


def torch_forward(model, ids, mask, types):
    """(logits, last_hidden_state) of a PyTorch *ForSequenceClassification model."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types), output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


def jax_forward(pre, ids, mask, types):
    """(logits, last_hidden_state) of a jaxpeft model, as numpy."""
    logits, hidden = pre.model.apply({"params": pre.params}, ids, mask, types,
                                     deterministic=True, output_hidden_states=True)
    return np.asarray(logits), np.asarray(hidden)
