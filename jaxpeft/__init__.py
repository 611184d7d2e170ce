"""jaxpeft: parameter-efficient fine-tuning (LoRA, DoRA, IA3, VeRA, adapters, prompts, ...) of
BERT-family encoders (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, DeBERTa-v2/v3, ModernBERT) on
GLUE in JAX.

Public API:
  load_pretrained(name_or_path, num_labels=None, dtype="float32") -> Pretrained
"""

import os

# transformers announces on import that PyTorch is missing, which is normal here (jaxpeft
# uses it for tokenizers only); users who want its advisory warnings can set the variable.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import importlib  # noqa: E402

from jaxpeft.errors import JaxpeftError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["EncoderConfig", "JaxpeftError", "Pretrained", "Runtime", "SequenceClassifier",
           "load_pretrained", "__version__"]

# The model API loads on first use, so that importing a light module (jaxpeft.errors,
# jaxpeft.data.tasks) does not import JAX.
_FROM_MODELS = {"EncoderConfig", "Pretrained", "Runtime", "SequenceClassifier", "load_pretrained"}


def __getattr__(name):
    if name in _FROM_MODELS:
        return getattr(importlib.import_module("jaxpeft.models"), name)
    raise AttributeError(f"module 'jaxpeft' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _FROM_MODELS)
