"""Encoder configuration, read from a Hugging Face `config.json`.

Only the fields that change the computation are kept; everything is validated here so that
the modules can trust their config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from jaxpeft.errors import JaxpeftError

SUPPORTED_MODEL_TYPES = ("bert", "roberta")

# transformers' names for activation functions -> ours (see models.encoder.ACTIVATIONS).
_SUPPORTED_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of a BERT/RoBERTa encoder and its sequence-classification head.

    `num_labels == 1` means regression (one output, MSE loss), as in transformers.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    classifier_dropout: Optional[float] = None
    num_labels: int = 2

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def head_dropout(self) -> float:
        """Dropout before the classifier, as transformers resolves it."""
        if self.classifier_dropout is not None:
            return self.classifier_dropout
        return self.hidden_dropout_prob

    @property
    def position_offset(self) -> int:
        """The first position id of a sequence: RoBERTa counts from `pad_token_id + 1`."""
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @property
    def is_regression(self) -> bool:
        """True when the head has one output trained with mean squared error."""
        return self.num_labels == 1

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], num_labels: Optional[int] = None,
                     source: str = "config.json") -> "EncoderConfig":
        """Builds a config from a parsed Hugging Face `config.json`.

        `num_labels` overrides the checkpoint's own label count (a fresh head is then used if
        the shapes differ). Raises `JaxpeftError` for architectures this encoder cannot run.
        """
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise JaxpeftError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
        pos_type = d.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise JaxpeftError(
                f"{source}: position_embedding_type {pos_type!r} is not supported "
                "(only 'absolute', as in bert-base and roberta-base)")
        if d.get("hidden_act", "gelu") not in _SUPPORTED_ACTS:
            raise JaxpeftError(
                f"{source}: hidden_act {d.get('hidden_act')!r} is not supported; "
                f"supported: {', '.join(_SUPPORTED_ACTS)}")
        if num_labels is None:
            num_labels = d.get("num_labels") or len(d.get("id2label") or {}) or 2
        if num_labels < 1:
            raise JaxpeftError(f"num_labels must be >= 1, got {num_labels}")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "intermediate_size") if k not in d]
        if missing:
            raise JaxpeftError(f"{source}: missing required fields: {', '.join(missing)}")
        if d["hidden_size"] % d["num_attention_heads"]:
            raise JaxpeftError(
                f"{source}: hidden_size {d['hidden_size']} is not a multiple of "
                f"num_attention_heads {d['num_attention_heads']}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        kwargs["num_labels"] = int(num_labels)
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = 1 if model_type == "roberta" else 0
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """Plain-dict view, for JSON files."""
        return dataclasses.asdict(self)
