"""Encoder configuration, read from a Hugging Face `config.json`.

Only the fields that change the computation are kept; everything is validated here so that
the modules can trust their config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

from jaxpeft.errors import JaxpeftError

# Families whose position ids count from `pad_token_id + 1` (fairseq's convention).
POSITIONS_AFTER_PAD = ("roberta", "xlm-roberta")

# transformers' names for activation functions -> ours (see models.encoder.ACTIVATIONS).
_SUPPORTED_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of an encoder and its sequence-classification head, in BERT's
    field names (each family's `config.json` names are translated by its `Family`).

    `num_labels == 1` means regression (one output, MSE loss), as in transformers.
    `type_vocab_size == 0`: no token types (DistilBERT). `embedding_size`: ELECTRA's
    embedding width when it differs from the hidden size.
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
    embedding_size: Optional[int] = None

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
    def absolute_positions(self) -> bool:
        """Whether the embeddings add a position table (DeBERTa-v3's relative attention does
        not)."""
        return True

    @property
    def project_in_embeddings(self) -> bool:
        """Whether narrow embeddings are widened before their LayerNorm (DeBERTa) rather
        than after the embeddings (ELECTRA)."""
        return False

    @property
    def embedding_width(self) -> int:
        """Width of the embedding tables (the hidden size unless `embedding_size` says)."""
        return self.embedding_size or self.hidden_size

    @property
    def position_offset(self) -> int:
        """The first position id of a sequence: RoBERTa and XLM-R count from
        `pad_token_id + 1`."""
        return self.pad_token_id + 1 if self.model_type in POSITIONS_AFTER_PAD else 0

    @property
    def is_regression(self) -> bool:
        """True when the head has one output trained with mean squared error."""
        return self.num_labels == 1

    @classmethod
    def family_fields(cls, d: dict, source: str) -> dict:
        """A family's own reading of its config.json fields (checks, normalised values);
        a family config class overrides it."""
        return d

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], num_labels: Optional[int] = None,
                     source: str = "config.json") -> "EncoderConfig":
        """Builds a config from a parsed Hugging Face `config.json`.

        `num_labels` overrides the checkpoint's own label count (a fresh head is then used if
        the shapes differ). Raises `JaxpeftError` for architectures this encoder cannot run.
        """
        from jaxpeft.models.registry import get_family  # the families import this module

        if not isinstance(d, Mapping):
            raise JaxpeftError(f"{source}: not a model configuration (a JSON object)")
        family = get_family(d.get("model_type"), source)
        model_type = family.name
        cls = family.config_class or cls
        d = cls.family_fields(family.translate_config(d), source)
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
        missing = [k for k in _SIZES if k not in d]
        if missing:
            raise JaxpeftError(f"{source}: missing required fields: {', '.join(missing)}")
        _check_values({k: d[k] for k in _SIZES}, {f.name: f for f in dataclasses.fields(cls)},
                      source)
        if d["hidden_size"] % d["num_attention_heads"]:
            raise JaxpeftError(
                f"{source}: hidden_size {d['hidden_size']} is not a multiple of "
                f"num_attention_heads {d['num_attention_heads']}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        _check_values(kwargs, fields, source)
        kwargs["num_labels"] = int(num_labels)
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = 1 if model_type in POSITIONS_AFTER_PAD else 0
        if kwargs.get("embedding_size") == kwargs["hidden_size"]:
            kwargs["embedding_size"] = None
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """Plain-dict view, for JSON files."""
        return dataclasses.asdict(self)


_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "intermediate_size")
_DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
             "pooler_dropout", "embedding_dropout")


def _check_values(values: dict, fields: dict, source: str) -> None:
    """Refuses config.json values of the wrong type (`"hidden_size": "384"`) or out of range
    (a negative eps, a dropout outside [0, 1), a size below 1), by name: they would otherwise
    surface deep in the model or as a non-finite loss."""
    for name, value in values.items():
        kind = str(fields[name].type).replace("Optional[", "").rstrip("]")
        if value is None and name not in _SIZES:
            continue  # unset: the default applies (transformers writes null for some)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "int" and not (number and isinstance(value, int)):
            raise JaxpeftError(f"{source}: {name} must be a whole number, got {value!r}")
        if kind == "float" and not (number and math.isfinite(value)):
            raise JaxpeftError(f"{source}: {name} must be a finite number, got {value!r}")
        if kind == "bool" and not isinstance(value, bool):
            raise JaxpeftError(f"{source}: {name} must be true or false, got {value!r}")
        if name in _SIZES and value < 1:
            raise JaxpeftError(f"{source}: {name} must be >= 1, got {value!r}")
        if name in _DROPOUTS and not 0 <= value < 1:
            raise JaxpeftError(f"{source}: {name} must be in [0, 1), got {value!r}")
        if name == "layer_norm_eps" and value <= 0:
            raise JaxpeftError(f"{source}: layer_norm_eps must be > 0, got {value!r}")
