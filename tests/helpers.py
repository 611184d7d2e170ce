"""Test helpers: tiny PyTorch reference models saved as Hugging Face folders, small run
configurations and the readers the run tests share."""

import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# transformers' sequence-classification class of each family the tests build.
HF_CLASSES = {"bert": "BertForSequenceClassification",
              "roberta": "RobertaForSequenceClassification",
              "xlm-roberta": "XLMRobertaForSequenceClassification",
              "electra": "ElectraForSequenceClassification",
              "distilbert": "DistilBertForSequenceClassification",
              "deberta-v2": "DebertaV2ForSequenceClassification",
              "modernbert": "ModernBertForSequenceClassification"}
PAD_AFTER = ("roberta", "xlm-roberta")  # families whose pad id is 1


def tiny_hf_config(model_type: str, num_labels: int = 2, **overrides):
    """A 2-layer (DistilBERT: 3), hidden-32 transformers config of a family; ELECTRA's
    embeddings are narrower (16) than its hidden size, as in the small checkpoints; DeBERTa
    is laid out as v3 (shared attention keys, c2p and p2c, LayerNorm'd relative embeddings,
    no absolute positions or token types) with 8 position buckets, fewer than the test
    sequences' lengths, so the logarithmic buckets are used; ModernBERT has 4 layers (global,
    local, local, global) with a local window of 4 tokens each side, shorter than the test
    sequences, and mean pooling."""
    import transformers

    common = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=72, num_labels=num_labels,
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    common.update(overrides)
    if model_type == "bert":
        return transformers.BertConfig(type_vocab_size=2, **common)
    if model_type == "electra":
        return transformers.ElectraConfig(type_vocab_size=2, embedding_size=16, **common)
    if model_type == "deberta-v2":
        v3 = dict(relative_attention=True, position_buckets=8, max_relative_positions=-1,
                  norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
                  position_biased_input=False, type_vocab_size=0, pooler_hidden_act="gelu")
        if "classifier_dropout" in common:
            common["cls_dropout"] = common.pop("classifier_dropout")
        return transformers.DebertaV2Config(**{**v3, **common})
    if model_type == "modernbert":
        names = {"hidden_dropout_prob": "mlp_dropout",
                 "attention_probs_dropout_prob": "attention_dropout"}
        values = {names.get(k, k): v for k, v in common.items()}
        values.setdefault("classifier_pooling", "mean")
        values["num_hidden_layers"] = overrides.get("num_hidden_layers", 4)
        return transformers.ModernBertConfig(
            local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2, **values)
    if model_type == "distilbert":
        names = {"hidden_size": "dim", "num_hidden_layers": "n_layers",
                 "num_attention_heads": "n_heads", "intermediate_size": "hidden_dim",
                 "hidden_dropout_prob": "dropout",
                 "attention_probs_dropout_prob": "attention_dropout",
                 "classifier_dropout": "seq_classif_dropout"}
        values = {names.get(k, k): v for k, v in common.items()}
        values["n_layers"] = overrides.get("num_hidden_layers", 3)
        return transformers.DistilBertConfig(**values)
    cls = {"roberta": transformers.RobertaConfig,
           "xlm-roberta": transformers.XLMRobertaConfig}[model_type]
    return cls(type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)


def tiny_torch_model(model_type: str, out_dir: Path, num_labels: int = 2, **overrides):
    """A seeded tiny `*ForSequenceClassification` of a family, saved into `out_dir`."""
    import transformers

    cls = getattr(transformers, HF_CLASSES[model_type])
    return save_torch_model(cls, tiny_hf_config(model_type, num_labels, **overrides), out_dir)


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
    pad = 1 if model_type in PAD_AFTER else 0
    ids = rng.integers(3, vocab, size=(batch, length))
    lengths = np.linspace(length, 3, batch).astype(int)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, pad)
    types = np.zeros_like(ids)
    if pairs and model_type not in PAD_AFTER:  # RoBERTa's pairs are all token type 0
        types = ((np.arange(length)[None, :] >= lengths[:, None] // 2) & (mask == 1)).astype(
            np.int64)
    return ids, mask, types


def torch_inputs(model, ids, mask, types) -> dict:
    """The keyword inputs of a transformers model (DistilBERT takes no token types)."""
    import torch

    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if model.config.model_type not in ("distilbert", "modernbert"):  # no token types
        inputs["token_type_ids"] = torch.tensor(types)
    return inputs


def torch_forward(model, ids, mask, types):
    """(logits, last_hidden_state) of a PyTorch *ForSequenceClassification model."""
    import torch

    with torch.no_grad():
        out = model(**torch_inputs(model, ids, mask, types), output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


def jax_forward(pre, ids, mask, types):
    """(logits, last_hidden_state) of a jaxpeft model, as numpy."""
    logits, hidden = pre.model.apply({"params": pre.params}, ids, mask, types,
                                     deterministic=True, output_hidden_states=True)
    return np.asarray(logits), np.asarray(hidden)


def run_config(tiny_model, glue_dir, tmp_path, **kw):
    """A short real-SST-2 LoRA run of the tiny model into `tmp_path/run` (`kw` overrides)."""
    from jaxpeft.config import RunConfig

    base = dict(task="sst2", model=str(tiny_model), method="lora", data_dir=str(glue_dir),
                max_train_samples=96, batch_size=16, eval_batch_size=128, num_epochs=2,
                log_every=4, eval_every=5, checkpoint_every=4, max_seq_length=64,
                learning_rate=1e-3, cache_dir="", output_dir=str(tmp_path / "run"),
                progress=False)
    base.update(kw)
    return RunConfig(**base)


def metric_rows(out):
    """Every row of a run's metrics.jsonl, as written."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def comparable_rows(out):
    """The metric rows without their timing (which differs between identical runs)."""
    return [{k: v for k, v in r.items() if k != "train_examples_per_s"}
            for r in metric_rows(out)]


def sst2_with_test(glue_dir, root):
    """A GLUE folder with the real SST-2 train/dev (linked) and a two-row test.tsv."""
    (root / "SST-2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        os.symlink(glue_dir / "SST-2" / name, root / "SST-2" / name)
    (root / "SST-2" / "test.tsv").write_text("index\tsentence\n0\tfine\n1\tdull\n")
    return root


def random_encoded(model_type, n=13, pairs=False, vocab=120, seed=0, max_len=40):
    """Random examples of varied length, with [CLS]/[SEP]-like structure and pair types."""
    from jaxpeft.data.batching import Encoded

    rs = np.random.default_rng(seed)
    lengths = rs.integers(3, max_len, n)
    ids, types = [], []
    for n_tok in lengths:
        ids.append(rs.integers(3, vocab, n_tok))
        t = np.zeros(n_tok, np.int8)
        if pairs and model_type in ("bert", "electra"):
            t[n_tok // 2:] = 1
        types.append(t)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Encoded("x", "y", np.concatenate(ids).astype(np.int32), np.concatenate(types),
                   offsets, rs.integers(0, 2, n).astype(np.int32), np.arange(n))


def save_tiny_bert(out: Path, minilm_dir: Path, **sizes) -> Path:
    """A random 2-layer, 4-head BERT of `sizes` (hidden_size, intermediate_size) with the real
    MiniLM uncased tokenizer, saved HF-style in `out` (seed 0)."""
    import torch
    import transformers

    cfg = transformers.BertConfig(vocab_size=30522, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=128, **sizes)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(out)
    return out


def moved_off_start(pre, peft, scale=0.05, seed=1):
    """`(peft, model, params)`: `peft` on the loaded base `pre` with every trainable leaf
    moved off its initial value (a seeded normal draw per leaf), so that no parity test
    passes on zeros."""
    import jax
    from flax import traverse_util

    model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    flat, mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(peft.mask(params))
    key = jax.random.key(seed)
    for i, path in enumerate(sorted(flat)):
        if mask[path]:
            flat[path] = flat[path] + scale * jax.random.normal(jax.random.fold_in(key, i),
                                                                flat[path].shape)
    return peft, model, traverse_util.unflatten_dict(flat)


def stsb_batch(pre, glue_dir, n=16):
    """`((ids, mask, types), scores)` of the first `n` real STS-B training pairs."""
    rows = [l.split("\t") for l in
            (glue_dir / "STS-B" / "train.tsv").read_text().splitlines()[1:n + 1]]
    enc = pre.tokenizer([r[7] for r in rows], [r[8] for r in rows], padding=True,
                        return_tensors="np")
    args = tuple(enc[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
    return args, np.array([float(r[9]) for r in rows], np.float32)


def loss_and_grads(model, params, peft, args, y, penalty=False):
    """`(loss, gradients)` of the mean regression loss (plus the method's penalty if asked)
    with respect to `peft`'s trainable leaves; the gradients as a full tree (frozen places
    hold the frozen values), as the peft export's naming reads it."""
    import jax

    from jaxpeft.peft import combine, partition
    from jaxpeft.train import per_example_loss

    trainable, frozen = partition(params, peft.mask(params))

    def loss_fn(t):
        logits = model.apply({"params": combine(t, frozen)}, *args, deterministic=True)
        loss = per_example_loss(logits, y, True).mean()
        return loss + peft.penalty(t) if penalty else loss

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    return loss, combine(grads, frozen)
