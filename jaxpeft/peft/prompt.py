"""Soft prompt tuning (Lester et al., 2021): learned vectors prepended to every input.

The tree gets one leaf at its root, `prompt_embeddings` (`--num_virtual_tokens` × hidden),
initialised to the word embeddings of tokens drawn at random from the vocabulary (peft's
`SAMPLE_VOCAB`; Lester et al. found vocabulary initialisation better than random vectors).
Only the prompt and the head train (peft: 20 tokens on MiniLM with 2 labels, 8,450).

The model prepends the virtual tokens' slots to every unpacked row (input stays plain
tokenizer output, as for every other method); packed rows reserve them before each example
(`add_virtual_slots`). Either way they take positions 0..n-1 and token type 0, attend and are
attended to, exactly as peft concatenates the prompt before the word embeddings (the
embedding LayerNorm and dropout see them too).

Where the head reads (`--prompt_head`):
- `real` (default): the example's own first token ([CLS] / <s>), as if the prompt were not
  there; the head keeps the pretrained meaning of its input.
- `virtual`: the first virtual token, which is what peft's `PeftModelForSequenceClassification`
  does (its model sees `inputs_embeds` that start with the prompt). Only this layout has a peft
  export: the folder loads with `PeftModel.from_pretrained` and gives our predictions.

A prompt changes the input sequence, not the weights, so there is nothing to merge.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import EmbeddingHook
from jaxpeft.models.registry import family_of_params
from jaxpeft.peft.codec import PeftCodec
from jaxpeft.peft.method import MethodOptions, PeftMethod, flag

LEAF = "prompt_embeddings"
HEADS = ("real", "virtual")


@dataclasses.dataclass(frozen=True)
class PromptConfig(MethodOptions):
    """Prompt-tuning options: the number of virtual tokens and where the head reads."""

    num_virtual_tokens: int = flag("num_virtual_tokens", 20, "Soft-prompt length of "
                                   "--method=prompt (slots before each example, beyond "
                                   "--max_seq_length).")
    head: str = flag("prompt_head", "real", "Where the head reads with --method=prompt: real "
                     "(the example's own first token) or virtual (the first prompt token, as "
                     "peft does; needed for --export_peft).", choices=lambda: HEADS)
    label: ClassVar[str] = "prompt"

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise JaxpeftError("--num_virtual_tokens must be a positive integer, got "
                               f"{self.num_virtual_tokens!r}")
        if self.head not in HEADS:
            raise JaxpeftError(f"--prompt_head={self.head!r} is not one of: {', '.join(HEADS)}")


@dataclasses.dataclass(frozen=True)
class PromptHook(EmbeddingHook):
    """Fills virtual slot k (input id `-1 - k`) with row k of the root `prompt_embeddings`."""

    virtual_tokens: int
    first_token_offset: int = 0
    root_leaves: tuple = (LEAF,)

    def __call__(self, embeddings, input_ids, x):
        prompt = embeddings.scope.root.get_variable("params", LEAF).astype(x.dtype)
        slot = jnp.clip(-1 - input_ids, 0, self.virtual_tokens - 1)
        return jnp.where((input_ids < 0)[..., None], prompt[slot], x)


def _word_embeddings(params) -> jax.Array:
    family = family_of_params(params)
    table = params[family.prefix]
    for name in family.word_embeddings.split("."):
        table = table[name]
    return table["embedding"]


class PromptCodec(PeftCodec):
    """peft's PROMPT_TUNING: `prompt_embeddings` at the top, the head one level higher."""

    peft_type = "PROMPT_TUNING"
    prefix = "base_model."  # peft keys prompt-learning models' head one level higher

    def unsupported(self, options) -> Optional[str]:
        if options.head == "real":
            return ("peft's prompt tuning reads the head from the first virtual token; train "
                    "with --prompt_head=virtual to export to peft")
        return None

    def model_fields(self, config):
        # peft reads these from transformers' config as `hidden_size`, `num_hidden_layers`
        # and `num_attention_heads`, which DistilBERT's names otherwise (`dim`, ...), and
        # ELECTRA's embeddings may be narrower than its hidden size.
        return {"token_dim": config.embedding_width, "num_layers": config.num_hidden_layers,
                "num_attention_heads": config.num_attention_heads}

    def config(self, options, family):
        return {"num_virtual_tokens": options.num_virtual_tokens, "num_transformer_submodules": 1,
                "prompt_tuning_init": "SAMPLE_VOCAB"}

    def options_from(self, config, modules):
        # peft's classifier reads the first virtual token.
        return PromptConfig(num_virtual_tokens=int(config["num_virtual_tokens"]), head="virtual")

    def leaf(self, path, value):
        return (LEAF, value) if path == (LEAF,) else None


class Prompt(PeftMethod):
    """A soft prompt before every example; the prompt and the head train."""

    name = "prompt"
    summary = ("soft prompt tuning: --num_virtual_tokens learned vectors before the input "
               "(Lester et al., 2021)")
    Options = PromptConfig
    default_learning_rate = 3e-2
    codec = PromptCodec()
    mergeable = False

    def virtual_tokens(self, options) -> int:
        return options.num_virtual_tokens

    def augment(self, params, options, rng):
        words = _word_embeddings(params)
        ids = jax.random.randint(rng, (options.num_virtual_tokens,), 0, words.shape[0])
        return {**params, LEAF: jnp.asarray(words[ids], jnp.float32)}

    def rules(self, options):
        return [(LEAF, True), (".*", False)]

    def hooks(self, options):
        offset = options.num_virtual_tokens if options.head == "real" else 0
        return (PromptHook(options.num_virtual_tokens, first_token_offset=offset),)

    def merge(self, params, options):
        raise JaxpeftError("prompt: a soft prompt lengthens the input; there are no weights "
                           "to merge it into")
