"""Flax encoders of every supported family (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT,
DeBERTa-v2/v3, ModernBERT), classification heads and Hugging Face checkpoint loading."""

from jaxpeft.models.checkpoint import Pretrained, load_pretrained, load_tokenizer
from jaxpeft.models.config import EncoderConfig
from jaxpeft.models.encoder import Runtime
from jaxpeft.models.bert import SequenceClassifier

__all__ = ["EncoderConfig", "Pretrained", "Runtime", "SequenceClassifier", "load_pretrained",
           "load_tokenizer"]
