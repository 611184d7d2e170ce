"""jaxpeft: parameter-efficient fine-tuning (LoRA, DoRA, IA3, VeRA, adapters, prompts, ...) of
BERT/RoBERTa on GLUE in JAX.

Public API:
  load_pretrained(name_or_path, num_labels=None, dtype="float32") -> Pretrained
"""

import os

# transformers announces on import that PyTorch is missing, which is normal here (jaxpeft
# uses it for tokenizers only); users who want its advisory warnings can set the variable.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from jaxpeft.errors import JaxpeftError  # noqa: E402
from jaxpeft.models import (EncoderConfig, Pretrained, Runtime, SequenceClassifier,  # noqa: E402
                            load_pretrained)

__version__ = "0.1.0"

__all__ = ["EncoderConfig", "JaxpeftError", "Pretrained", "Runtime", "SequenceClassifier",
           "load_pretrained", "__version__"]
