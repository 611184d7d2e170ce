"""jaxpeft: parameter-efficient fine-tuning (LoRA, BitFit, full) of BERT/RoBERTa on GLUE in JAX.

Public API:
  load_pretrained(name_or_path, num_labels=None, dtype="float32") -> Pretrained
"""

from jaxpeft.errors import JaxpeftError
from jaxpeft.models import EncoderConfig, Pretrained, Runtime, SequenceClassifier, load_pretrained

__version__ = "0.1.0"

__all__ = ["EncoderConfig", "JaxpeftError", "Pretrained", "Runtime", "SequenceClassifier",
           "load_pretrained", "__version__"]
