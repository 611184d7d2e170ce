"""Prefix tuning (Li & Liang, 2021; for classification, P-tuning v2, Liu et al., 2022):
learned keys and values that every attention layer attends to before the input's own.

The tree gets one leaf at its root, `prefix_embeddings`: `--num_virtual_tokens` rows of
`layers × 2 × hidden` (peft's `PrefixEncoder` table, in its layout: row p holds, layer by
layer, the key then the value of virtual token p), initialised standard normal as peft's
`nn.Embedding` is. Layer l's attention projects the input's keys and values as usual and
prepends the prefix's, with its mask opened for them; the queries, and so the sequence
length, the positions, the head and packing, stay those of the input (packed rows: every
example attends to the prefix and to its own tokens, exactly as unpacked).

`--prefix_projection=N` trains instead a reparameterisation (Li & Liang's MLP, peft's
`prefix_projection`): a `num_virtual_tokens × hidden` embedding through `Linear(hidden, N)
→ tanh → Linear(N, layers × 2 × hidden)` gives the table. It only shapes training: the
export writes the table it computes, as peft saves such an adapter.

Positions: the input keeps its own (0, 1, ... for BERT; RoBERTa's from `pad + 1`). peft runs
prefix tuning through transformers' key-value cache, whose length shifted every position by
the prefix length in transformers 4; with transformers 5, peft's sequence-classification
forward refuses these models (it looks for a `past_key_values` argument that is now
`cache`). The export loads in `PeftModel` with exactly peft's keys; the tests compare our
logits and gradients with transformers' own attention over peft's cache of the exported
table, at unshifted positions.

Families whose attention computes positions from the keys (DeBERTa's relative terms,
ModernBERT's rotary embedding) are refused. A prefix changes attention, not the weights, so
there is nothing to merge.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import AttentionHook
from jaxpeft.models.registry import family_of_params
from jaxpeft.peft.codec import PeftCodec
from jaxpeft.peft.method import MethodOptions, Peft, PeftMethod, flag, shared_flag

LEAF = "prefix_embeddings"
ENCODER = "prefix_encoder"  # the reparameterisation: embedding, dense_in, dense_out


@dataclasses.dataclass(frozen=True)
class PrefixConfig(MethodOptions):
    """Prefix-tuning options: the number of virtual tokens, the reparameterisation's width
    (0: none), and the model's depth and width the table is made for (set by `augment`)."""

    num_virtual_tokens: int = shared_flag("num_virtual_tokens", 20)
    projection: int = flag("prefix_projection", 0, "With --method=prefix: train the prefix "
                           "through an MLP of this hidden width (Li & Liang's "
                           "reparameterisation; 0: train the keys and values directly).")
    label: ClassVar[str] = "prefix"

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise JaxpeftError("--num_virtual_tokens must be a positive integer, got "
                               f"{self.num_virtual_tokens!r}")
        if not isinstance(self.projection, int) or self.projection < 0:
            raise JaxpeftError("--prefix_projection must be 0 (none) or a positive width, got "
                               f"{self.projection!r}")


def _shape(params) -> tuple[int, int]:
    """`(layers, hidden)` of a tree's encoder: its layer modules and their keys' width."""
    family = family_of_params(params)
    flat = traverse_util.flatten_dict(params, sep="/")
    key = re.compile(family.target_regex("key") + "/kernel")
    widths = [v.shape[1] for p, v in flat.items() if key.fullmatch(p)]
    return len(widths), widths[0]


def prefix_table(root: dict) -> jax.Array:
    """The `[virtual tokens, layers × 2 × hidden]` table of a tree's root leaves: the trained
    table, or the reparameterisation's output."""
    if LEAF in root:
        return root[LEAF]
    enc = root[ENCODER]
    h = jnp.tanh(enc["embedding"] @ enc["dense_in"]["kernel"] + enc["dense_in"]["bias"])
    return h @ enc["dense_out"]["kernel"] + enc["dense_out"]["bias"]


@dataclasses.dataclass(frozen=True)
class PrefixHook(AttentionHook):
    """Prepends layer l's rows of the prefix table to the keys and values, and opens the mask
    for them."""

    num_virtual_tokens: int
    root_leaves: tuple = (LEAF,)

    def __call__(self, attention, layer, k, v, mask):
        root = attention.scope.root
        table = prefix_table({n: root.get_variable("params", n) for n in self.root_leaves})
        n, hidden = self.num_virtual_tokens, k.shape[-1]
        rows = table.reshape(n, -1, 2, hidden)[:, layer].astype(k.dtype)
        batch = k.shape[0]
        k = jnp.concatenate([jnp.broadcast_to(rows[:, 0], (batch, n, hidden)), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(rows[:, 1], (batch, n, hidden)), v], axis=1)
        mask = jnp.concatenate([jnp.ones((*mask.shape[:-1], n), bool), mask], axis=-1)
        return k, v, mask


def _linear(key, fan_in, fan_out):
    """torch's `nn.Linear` initialisation (uniform within 1/sqrt(fan_in)), kernel `(in, out)`."""
    bound = 1.0 / math.sqrt(fan_in)
    k1, k2 = jax.random.split(key)
    return {"kernel": jax.random.uniform(k1, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k2, (fan_out,), jnp.float32, -bound, bound)}


class PrefixCodec(PeftCodec):
    """peft's PREFIX_TUNING: the table as `prompt_embeddings`, the head one level higher."""

    peft_type = "PREFIX_TUNING"
    prefix = "base_model."  # peft keys prompt-learning models' head one level higher

    def portable(self, peft, params):
        # peft saves a reparameterised prefix as the table it computes (and loads it so).
        if not peft.options.projection:
            return peft, params
        table = prefix_table({ENCODER: params[ENCODER]})
        params = {**{k: v for k, v in params.items() if k != ENCODER}, LEAF: table}
        return Peft(peft.method, dataclasses.replace(peft.options, projection=0),
                    peft.train_pooler), params

    def model_fields(self, config):
        return {"token_dim": config.hidden_size, "num_layers": config.num_hidden_layers,
                "num_attention_heads": config.num_attention_heads}

    def config(self, options, family):
        return {"num_virtual_tokens": options.num_virtual_tokens,
                "num_transformer_submodules": 1, "prefix_projection": False}

    def options_from(self, config, modules):
        # Whatever trained it, the file holds the table itself.
        return PrefixConfig(num_virtual_tokens=int(config["num_virtual_tokens"]))

    def leaf(self, path, value):
        return ("prompt_embeddings", value) if path == (LEAF,) else None


class Prefix(PeftMethod):
    """Learned keys and values before every layer's own; the prefix and the head train."""

    name = "prefix"
    summary = ("prefix tuning / P-tuning v2: --num_virtual_tokens learned keys and values in "
               "every attention layer (Li & Liang, 2021)")
    Options = PrefixConfig
    default_learning_rate = 1e-2
    codec = PrefixCodec()
    mergeable = False

    def requires(self, options):
        return ("attention_prefix",)

    def augment(self, params, options, rng):
        layers, hidden = _shape(params)
        n, width = options.num_virtual_tokens, layers * 2 * hidden
        if not options.projection:
            return {**params, LEAF: jax.random.normal(rng, (n, width), jnp.float32)}
        k0, k1, k2 = jax.random.split(rng, 3)
        return {**params, ENCODER: {
            "embedding": jax.random.normal(k0, (n, hidden), jnp.float32),
            "dense_in": _linear(k1, hidden, options.projection),
            "dense_out": _linear(k2, options.projection, width)}}

    def rules(self, options):
        return [(f"(?:{LEAF}|{ENCODER}/.*)", True), (".*", False)]

    def hooks(self, options):
        return (PrefixHook(options.num_virtual_tokens,
                           root_leaves=(ENCODER,) if options.projection else (LEAF,)),)

    def merge(self, params, options):
        raise JaxpeftError("prefix: a prefix adds keys and values to attention; there are no "
                           "weights to merge it into")
