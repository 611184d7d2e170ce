"""Flax (linen) BERT / RoBERTa encoder, written to match transformers' PyTorch modules.

Module and parameter names mirror Hugging Face's (`encoder/layer_0/attention/self/query/
kernel` for `encoder.layer.0.attention.self.query.weight`), so checkpoint conversion, LoRA
target names and peft export each need a single naming rule.

Every projection is a `Dense` whose output PEFT methods may change through `Runtime.hooks`
(`DenseHook`), reading extra leaves they put beside its kernel (LoRA's `lora_a`/`lora_b`);
the token embeddings may be changed the same way (`EmbeddingHook`: soft prompts fill the
virtual-token slots, marked by negative input ids), the keys and values each attention
layer attends to (`AttentionHook`: prefix tuning prepends its own), and the hidden states
between layers (`LayerHook`: ReFT's interventions). Methods are added by augmenting the tree
and installing hooks (see `jaxpeft.peft`), never by swapping modules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.config import EncoderConfig


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU, `x * (1 + erf(x / sqrt 2)) / 2`, the formula of PyTorch's `gelu`.

    `jax.nn.gelu(approximate=False)` computes the same function through `erfc`, whose
    piecewise exponential form XLA's CPU backend runs as several unfused passes; `erf` is
    one rational polynomial: MiniLM train steps 1.4-6 % faster for it (measured with the A/B
    script of commit d93b942), losses equal to float rounding. In the far negative tail, where erf's sum
    cancels, it rounds as PyTorch's formula does.
    """
    return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


ACTIVATIONS = {
    "gelu": gelu_erf,  # BERT/RoBERTa use the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Settings that change how the model computes, not what its weights are.

    dtype: compute dtype ("float32" or "bfloat16"); parameters always stay float32.
    hooks: `DenseHook`s and `EmbeddingHook`s of the PEFT method in force (installed by
      `jaxpeft.peft.Peft.attach`).
    target_mean, target_std: a regression head outputs `target_std * raw + target_mean`, so
      training starts at the label mean and scale (fixed values, not trained; the
      default is the identity).

    The fields below change only how a step is computed, never its result beyond float
    rounding; they are candidates for a faster step on some hardware, off by default and
    measured side by side by `benchmarks.bench_train` (`--methods=full,full:fused_qkv=true`):
    fused_qkv: one product of the input with the query, key and value kernels side by side
      (`[in, 3 * hidden]`) instead of three; each projection's bias and hooks then apply to
      its slice, and the parameter tree is unchanged. In the attention of BERT, RoBERTa,
      XLM-R, ELECTRA and DistilBERT (ModernBERT's `Wqkv` is one product already; DeBERTa's
      projections also serve its relative embeddings and stay three).
    onehot_small_tables: look up the embedding tables of at most `ONEHOT_ROWS` rows
      (positions, token types) as a one-hot matmul, whose gradient is a matmul too instead
      of a scatter-add.
    sorted_word_grads: the word table's gradient as a sum over the token gradients sorted by
      id (`jax.ops.segment_sum` with sorted indices) instead of an unsorted scatter-add.
    attention_implementation: `jax.nn.dot_product_attention`'s `implementation` ("xla",
      "cudnn") where attention runs fused: at inference, and in training only when the
      config's attention-probability dropout is 0 (the fused kernels take no dropout).
    """

    dtype: str = "float32"
    hooks: tuple = ()
    target_mean: float = 0.0
    target_std: float = 1.0
    fused_qkv: bool = False
    onehot_small_tables: bool = False
    sorted_word_grads: bool = False
    attention_implementation: str | None = None

    @property
    def jnp_dtype(self):
        """The compute dtype as a JAX dtype."""
        return DTYPES[self.dtype]

    def hooks_of(self, kind: type) -> tuple:
        """The installed hooks of one kind (`DenseHook`, `EmbeddingHook`, `AttentionHook`,
        `LayerHook`)."""
        return tuple(h for h in self.hooks if isinstance(h, kind))

    @property
    def root_leaves(self) -> frozenset:
        """Leaves the installed hooks keep at the root of the tree (VeRA's projections)."""
        return frozenset().union(*(h.root_leaves for h in self.hooks))

    @property
    def virtual_tokens(self) -> int:
        """Virtual-token slots the installed hooks need before each example."""
        return sum(h.virtual_tokens for h in self.hooks_of(EmbeddingHook))

    @property
    def first_token_offset(self) -> int:
        """How far after an example's first slot the head reads (past a soft prompt)."""
        return sum(h.first_token_offset for h in self.hooks_of(EmbeddingHook))


def _mix32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer mixer (Wellons' `lowbias32`): every output bit depends on
    every input bit, with a measured bias far below what dropout can notice."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _flat_index(shape: tuple) -> jax.Array:
    """Each element's row-major position as uint32, built from iotas so XLA fuses it."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return index


def keep_mask(rng: jax.Array, shape: tuple, rate: float) -> tuple[jax.Array, float]:
    """A dropout keep-mask and the keep probability it realises (exact to 2^-32).

    Counter-based: each element hashes its own position under two 32-bit keys drawn from
    `rng`. Dropout needs independent, unbiased draws, not cryptographic strength, and a hash
    of the position fuses into the multiply that applies the mask, so no random bits are
    materialised: on the attention-probability shape of MiniLM (32 x 12 x 128 x 128) the
    masked multiply costs 5 ms against 50 ms for threefry bits split into 16-bit draws
    (measured with the benchmarks of commit 82daeaf). Two mixing rounds keyed separately keep masks of
    different keys unrelated (one round would make them index-permuted copies of each
    other); tests check the keep rate, neighbour and cross-key independence.
    """
    size = math.prod(shape)
    if size >= 2 ** 32:  # positions would wrap; never met at BERT sizes, but stay correct
        raise ValueError(f"dropout over {size} elements: more than 2^32 positions")
    threshold = min(round(rate * 2 ** 32), 2 ** 32 - 1)
    keys = jax.random.bits(rng, (2,), jnp.uint32)
    hashed = _mix32(_mix32(_flat_index(shape) ^ keys[0]) + keys[1])
    return hashed >= jnp.uint32(threshold), (2 ** 32 - threshold) / 2 ** 32


class Dropout(nn.Module):
    """Inverted dropout over the `dropout` RNG stream, with `keep_mask`'s hashed draws."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if deterministic or self.rate == 0.0:
            return x
        keep, p_keep = keep_mask(self.make_rng("dropout"), x.shape, self.rate)
        return jnp.where(keep, x * jnp.asarray(1.0 / p_keep, x.dtype), jnp.zeros((), x.dtype))


def _normal(config: EncoderConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


def token_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` for `x: [..., in]` (any leading token axes) and `w: [in, out]`, computed on
    `x` flattened to `[tokens, in]`.

    The same numbers as `x @ w`; the flat form changes the backward pass. Autodiff of the
    3-d product contracts `w`'s gradient over two axes, and XLA's CPU backend then
    transposes the output gradient into `[out, tokens]` before the product, a full copy
    of it for every layer. From the flat product it takes `xᵀ @ dy` with no copy: the
    MiniLM full fine-tuning step at 32x128 is 13 % shorter, LoRA's (whose own products
    use this too) 3 % (measured at commit a7bb8ab). Every token-wise product of
    the encoder and the PEFT hooks goes through here.
    """
    flat = x.reshape(-1, x.shape[-1]) @ w
    return flat.reshape(*x.shape[:-1], w.shape[-1])


def per_token(vector: jax.Array, like: jax.Array) -> jax.Array:
    """A float32 parameter `vector` (a bias, a scale) broadcast to `like`'s shape, then cast
    to `like`'s dtype: the same values as casting first, but its gradient, a sum over every
    token, accumulates in float32. Cast first, a bfloat16 step summed those thousands of
    terms in bfloat16: MiniLM's bias gradients at 32x128 came out up to 32 % (median 12 %)
    off their float32 values, IA3's and DoRA's vectors up to 21 % and 19 %, against 1.5 %
    for kernels (benchmarks/bench_bf16_grads.py; now within 2.1 %). Every parameter
    applied per token goes through here (or through a product, which accumulates in float32
    itself)."""
    return jnp.broadcast_to(vector, like.shape).astype(like.dtype)


class DenseHook:
    """How a PEFT method changes `Dense` layers: subclass as a frozen (hashable) dataclass.

    `leaves` names the parameters the method puts beside a Dense kernel; `__call__` gets the
    layer (to read them with `dense.get_variable("params", name)`, or to create dropout),
    its input `x` and output `y = x @ kernel + bias` (compute dtype; `bias` comes already
    broadcast to `y`'s shape) and returns the new output. It must return `y` unchanged for
    layers without its leaves. XLA drops `y` when a hook recomputes the output from `x`
    instead. Products over the token axes belong in `token_matmul` (faster gradients on
    CPU), parameters applied per token in `per_token` (float32 gradients).
    """

    leaves: tuple = ()
    root_leaves: tuple = ()  # leaves it reads at the tree's root (`dense.scope.root`)

    def __call__(self, dense: "Dense", x, y, kernel, bias, deterministic: bool):
        raise NotImplementedError


class EmbeddingHook:
    """How a PEFT method changes the token embeddings: subclass as a frozen dataclass.

    Input ids below zero mark virtual-token slots (`-1 - k` for virtual token k): the
    `Backbone` prepends `virtual_tokens` of them to every unpacked row, and packed rows hold
    them before each example (`jaxpeft.data.batching.add_virtual_slots`). `__call__` gets
    the `Embeddings` module, the input ids and the word vectors (virtual slots hold word 0)
    and returns the vectors to which positions and token types are added. `root_leaves`
    names the leaves it reads at the tree's root; `first_token_offset` moves where the head
    reads each example (0: its first slot).
    """

    virtual_tokens: int = 0
    root_leaves: tuple = ()
    first_token_offset: int = 0

    def __call__(self, embeddings: "Embeddings", input_ids, x):
        raise NotImplementedError


class AttentionHook:
    """How a PEFT method changes what attention attends to: subclass as a frozen dataclass.

    `__call__` gets the attention module, its layer's index, the projected keys and values
    `[batch, key, hidden]` (compute dtype) and the boolean mask (broadcastable to `[batch,
    heads, query, key]`) and returns all three, lengthened along the key axis. The queries
    and the output length stay those of the input, so nothing after attention changes.
    `root_leaves` names the leaves it reads at the tree's root.
    """

    root_leaves: tuple = ()

    def __call__(self, attention: nn.Module, layer: int, k, v, mask):
        raise NotImplementedError


class LayerHook:
    """How a PEFT method changes the hidden states between layers: subclass as a frozen
    dataclass.

    `__call__` gets the layer stack module, the index of the layer just run, its output
    `x: [rows, length, hidden]` and the attention mask it ran with (`[rows, 1, 1, key]`, or
    block-diagonal `[rows, 1, query, key]` for packed rows), and returns the new hidden
    states. `root_leaves` names the leaves it reads at the tree's root.
    """

    root_leaves: tuple = ()

    def __call__(self, layers: nn.Module, layer: int, x, mask):
        raise NotImplementedError


def token_offsets(mask: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """`(from_start, to_end)`: each token's distance from the first and from the last real
    token of its example, `[rows, length]` int32, from the attention mask a layer runs with
    (a key-padding mask: one example per row; block-diagonal: packed examples)."""
    full = jnp.broadcast_to(mask[:, 0], (mask.shape[0], length, mask.shape[-1]))
    keys = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    first = jnp.min(jnp.where(full, keys, mask.shape[-1]), axis=-1)
    last = jnp.max(jnp.where(full, keys, -1), axis=-1)
    here = jnp.arange(length, dtype=jnp.int32)[None, :]
    return here - first, last - here


def hooked_keys(attention: nn.Module, runtime: "Runtime", k, v, mask):
    """`(k, v, mask)` after the installed `AttentionHook`s, for the attention modules of the
    families that support them (`Family.attention_prefix`)."""
    hooks = runtime.hooks_of(AttentionHook)
    if not hooks:
        return k, v, mask
    # The layer's index is in the module's path (`encoder/layer_3/attention/self`), where
    # every family's layer stack names its layers: hooks keep one table for all layers.
    layer = next(int(m.group(1)) for part in reversed(attention.scope.path)
                 if (m := re.fullmatch(r"layers?_(\d+)", part)))
    for hook in hooks:
        k, v, mask = hook(attention, layer, k, v, mask)
    return k, v, mask


class Dense(nn.Module):
    """A linear layer (`kernel: (in, out)`, `bias: (out,)`; `use_bias=False`: no bias, hooks
    then see a zero one) that PEFT hooks may change.

    Any other parameter found in this module must belong to a hook in `runtime.hooks`: a
    tree with, say, LoRA leaves applied without the LoRA method configured is an error rather
    than a silent base-model forward pass.
    """

    features: int
    config: EncoderConfig
    runtime: Runtime
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, deterministic: bool = True, product=None):
        """`x @ kernel + bias`, then the hooks; `product`: `x @ kernel` where the caller has
        computed it already (`project_qkv`'s fused product)."""
        dtype = self.runtime.jnp_dtype
        kernel = self.param("kernel", _normal(self.config), (x.shape[-1], self.features),
                            jnp.float32).astype(dtype)
        x = x.astype(dtype)
        if product is None:
            product = token_matmul(x, kernel)
        if self.use_bias:
            bias = per_token(self.param("bias", nn.initializers.zeros, (self.features,),
                                        jnp.float32), product)
        else:
            bias = jnp.zeros_like(product)
        y = product + bias
        self._check_leaves()
        for hook in self.runtime.hooks_of(DenseHook):
            y = hook(self, x, y, kernel, bias, deterministic)
        return y

    def _check_leaves(self):
        refuse_foreign_leaves(self, {"kernel", "bias"}.union(
            *(h.leaves for h in self.runtime.hooks_of(DenseHook))), "/".join(self.scope.path))


def refuse_foreign_leaves(module: nn.Module, known: set, where: str) -> None:
    """Raises if `module` holds parameters no installed hook claims: a tree with a method's
    leaves applied without that method is an error, never a silent base-model pass."""
    unknown = sorted(set(module.variables.get("params", {})) - known)
    if unknown:
        raise JaxpeftError(
            f"{where}: parameters {unknown} belong to a PEFT method that is not configured on "
            "this model; apply the tree with its method (Peft.attach, or load_adapter, which "
            "restores it from the adapter files)")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis, in float32 with the
    two-pass variance (PyTorch's `layer_norm`)."""
    return _normalize_fwd(x, scale, bias, eps)[0]


def _normalize_fwd(x, scale, bias, eps):
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    normed = centred * rstd
    return normed * scale + bias, (normed, rstd, scale)


def _normalize_bwd(eps, saved, dy):
    # The closed-form gradient keeps XLA from differentiating the statistics op by op: the
    # forward saves two tensors and the backward is two row reductions and one elementwise
    # pass (autodiff of the same formula left a dozen small kernels per LayerNorm).
    normed, rstd, scale = saved
    rows = tuple(range(dy.ndim - 1))
    d_normed = dy * scale
    dx = rstd * (d_normed - jnp.mean(d_normed, axis=-1, keepdims=True)
                 - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
    return dx, jnp.sum(dy * normed, axis=rows), jnp.sum(dy, axis=rows)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis (`scale`, `bias` leaves, as `flax.linen.LayerNorm`'s),
    statistics in float32, output in `dtype`."""

    epsilon: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        # The cast stays outside the custom gradient, whose cotangents then match in dtype.
        return _normalize(x.astype(jnp.float32), scale, bias, self.epsilon).astype(self.dtype)


def layer_norm(config: EncoderConfig, runtime: Runtime, name: str = "LayerNorm"):
    return LayerNorm(epsilon=config.layer_norm_eps, dtype=runtime.jnp_dtype, name=name)


def expand_attention_mask(attention_mask: jax.Array) -> jax.Array:
    """Boolean attention mask broadcastable to `[batch, heads, query, key]`.

    Accepts a key-padding mask `[batch, key]` (1 = real token) or a full mask
    `[batch, query, key]` (e.g. block-diagonal for packed sequences).
    """
    mask = attention_mask.astype(bool)
    if mask.ndim == 2:
        return mask[:, None, None, :]
    if mask.ndim == 3:
        return mask[:, None, :, :]
    raise ValueError(f"attention_mask must be [batch, key] or [batch, query, key], got "
                     f"shape {attention_mask.shape}")


class SelfAttention(nn.Module):
    """Multi-head self-attention: `query`/`key`/`value` projections and scaled dot products
    (`names`: the projections' names in the family's checkpoints)."""

    config: EncoderConfig
    runtime: Runtime
    names: tuple = ("query", "key", "value")

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        q, k, v = project_qkv(self, x, self.names, deterministic)
        k, v, mask = hooked_keys(self, self.runtime, k, v, mask)
        return attend(q, k, v, mask, self.config, deterministic, self.runtime)


def project_qkv(attention: nn.Module, x, names: tuple, deterministic: bool) -> tuple:
    """The query, key and value projections of `x` by the `Dense` children `names` of
    `attention` (hidden size each): three products, or with `runtime.fused_qkv` one product
    with the three kernels side by side, sliced, each slice then through its own `Dense`
    (bias, hooks), so the parameter tree and every hook stay as they are."""
    cfg, runtime = attention.config, attention.runtime
    products = (None,) * len(names)
    # At initialisation the kernels do not exist yet; the unfused call creates them.
    if runtime.fused_qkv and not attention.is_initializing():
        params = attention.variables["params"]
        kernel = jnp.concatenate([params[n]["kernel"] for n in names], axis=1)
        fused = token_matmul(x.astype(runtime.jnp_dtype), kernel.astype(runtime.jnp_dtype))
        products = jnp.split(fused, len(names), axis=-1)
    return tuple(Dense(cfg.hidden_size, cfg, runtime, name=n)(x, deterministic, product=p)
                 for n, p in zip(names, products))


def attend(q, k, v, mask, config: EncoderConfig, deterministic: bool,
           runtime: Runtime = Runtime()) -> jax.Array:
    """Scaled dot-product attention of projected `q: [batch, length, hidden]` and `k, v:
    [batch, keys, hidden]` over `config.num_attention_heads` heads, with the config's dropout
    on the probabilities when training; returns `[batch, length, hidden]`."""
    batch, length, _ = q.shape
    q, k, v = (t.reshape(*t.shape[:2], config.num_attention_heads, config.head_dim)
               for t in (q, k, v))
    dropout = config.attention_probs_dropout_prob
    if deterministic or dropout == 0.0:
        # The fused path (cuDNN flash attention on GPUs when asked for and shapes allow).
        out = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                           implementation=runtime.attention_implementation)
    elif runtime.attention_implementation not in (None, "xla"):
        raise JaxpeftError(
            f"attention_implementation={runtime.attention_implementation!r} runs attention "
            "fused, which has no dropout on the probabilities: set the config's "
            "attention_probs_dropout_prob to 0 to train with it")
    else:
        # Dropout on attention probabilities, as in BERT, needs the probabilities
        # materialized, which the fused kernel never does.
        out = dropout_attention(q, k, v, mask, Dropout(dropout))
    return out.reshape(batch, length, config.hidden_size)


def dropout_attention(q, k, v, mask, dropout: Dropout) -> jax.Array:
    """Scaled dot-product attention with dropout on the probabilities (training).

    `q, k, v: [batch, length, heads, head_dim]`, `mask` broadcastable to `[batch, heads,
    query, key]`; returns `[batch, length, heads, head_dim]`. The heads are moved in front
    explicitly, so XLA's CPU backend runs both products as plain batched matmuls over
    contiguous `[length, head_dim]` blocks instead of relayouting around token-major
    einsums. With `gelu_erf`, MiniLM train steps are 0-6 % faster for it, never slower
    (measured with the A/B script of commit d93b942).
    """
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    logits = jnp.einsum("bnth,bnsh->bnts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(logits, axis=-1).astype(q.dtype), deterministic=False)
    return jnp.einsum("bnts,bnsh->bnth", probs, v).transpose(0, 2, 1, 3)


def weigh_values(scores, mask, v, dropout: Dropout, deterministic: bool) -> jax.Array:
    """The end of attention for families that build their own float32 `scores: [batch,
    heads, query, key]` (scaled, position terms included): masked softmax, `dropout` on the
    probabilities when training, the weighted sum of `v: [batch, key, heads, head_dim]`.
    Returns `[batch, query, heads * head_dim]`."""
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1).astype(v.dtype), deterministic=deterministic)
    out = jnp.einsum("bhij,bjhd->bihd", probs, v)
    return out.reshape(*out.shape[:2], -1)


class Residual(nn.Module):
    """`dense -> dropout -> LayerNorm(x + residual)`: BERT's `*Output` blocks."""

    config: EncoderConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, residual, deterministic: bool = True):
        x = Dense(self.config.hidden_size, self.config, self.runtime, name="dense")(
            x, deterministic)
        x = Dropout(self.config.hidden_dropout_prob)(x, deterministic=deterministic)
        return layer_norm(self.config, self.runtime)(x + residual)


class Attention(nn.Module):
    """Self-attention followed by its output projection and residual LayerNorm."""

    config: EncoderConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        h = SelfAttention(self.config, self.runtime, name="self")(x, mask, deterministic)
        return Residual(self.config, self.runtime, name="output")(h, x, deterministic)


class Intermediate(nn.Module):
    """The feed-forward expansion `dense -> activation`."""

    config: EncoderConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = Dense(self.config.intermediate_size, self.config, self.runtime, name="dense")(
            x, deterministic)
        return ACTIVATIONS[self.config.hidden_act](x)


class Layer(nn.Module):
    """One transformer block: attention, feed-forward, two residual LayerNorms."""

    config: EncoderConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        x = Attention(self.config, self.runtime, name="attention")(x, mask, deterministic)
        h = Intermediate(self.config, self.runtime, name="intermediate")(x, deterministic)
        return Residual(self.config, self.runtime, name="output")(h, x, deterministic)


# Tables up to this many rows are looked up as one-hot matmuls with `onehot_small_tables`:
# BERT's positions (512, RoBERTa's 514) and token types, never a vocabulary.
ONEHOT_ROWS = 1024


def onehot_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`table[ids]` as `one_hot(ids) @ table`: its gradient is the matmul `one_hotᵀ @ dy`.
    At the highest precision, so the rows come out exact where matmuls default to fewer
    mantissa bits (TF32 on GPUs)."""
    onehot = jax.nn.one_hot(ids.reshape(-1), table.shape[0], dtype=table.dtype)
    rows = jnp.dot(onehot, table, precision=jax.lax.Precision.HIGHEST)
    return rows.reshape(*ids.shape, table.shape[1])


@jax.custom_vjp
def sorted_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`table[ids]`, whose gradient sums the token gradients of each id after sorting them
    by id (a segment sum over sorted indices) rather than by an unsorted scatter-add."""
    return jnp.take(table, ids, axis=0)


def _sorted_lookup_fwd(table, ids):
    # A zero-size array carries the table's row count into the backward pass.
    return jnp.take(table, ids, axis=0), (ids, jnp.zeros((table.shape[0], 0), table.dtype))


def _sorted_lookup_bwd(saved, dy):
    ids, rows = saved
    ids, dy = ids.reshape(-1), dy.reshape(-1, dy.shape[-1])
    order = jnp.argsort(ids)
    grad = jax.ops.segment_sum(dy[order], ids[order], num_segments=rows.shape[0],
                               indices_are_sorted=True)
    return grad, None


sorted_lookup.defvjp(_sorted_lookup_fwd, _sorted_lookup_bwd)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings (summed in float32), LayerNorm (output in the
    compute dtype), dropout. `config.embedding_width` wide (ELECTRA's may be narrower than
    the hidden size); no token-type table when `type_vocab_size` is 0 (DistilBERT, DeBERTa-v3);
    no position table when `config.absolute_positions` is false (DeBERTa's relative
    attention), and DeBERTa's `embed_proj` widens narrow embeddings before the LayerNorm
    (`config.project_in_embeddings`)."""

    config: EncoderConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool = True):
        cfg = self.config

        def embed(num, name):
            # Looked up in float32 whatever the compute dtype: with `dtype=bfloat16`,
            # nn.Embed gathers from a bfloat16 copy of the table, so its gradient is a
            # bfloat16 scatter-add, and the token-type row, which every token hits, came out
            # 31 % off its float32 value (MiniLM at 32x128, benchmarks/bench_bf16_grads.py;
            # now 0.9 %), besides copying the whole table every step.
            return nn.Embed(num, cfg.embedding_width, embedding_init=_normal(cfg),
                            dtype=jnp.float32, param_dtype=jnp.float32, name=name)

        def look_up(num, name, ids):
            table = embed(num, name)
            if self.runtime.onehot_small_tables and num <= ONEHOT_ROWS:
                return onehot_lookup(table.embedding, ids)
            if self.runtime.sorted_word_grads and name == "word_embeddings":
                return sorted_lookup(table.embedding, ids)
            return table(ids)

        hooks = self.runtime.hooks_of(EmbeddingHook)
        # Virtual slots (negative ids) look up word 0; their hook replaces it.
        words = look_up(cfg.vocab_size, "word_embeddings",
                        jnp.maximum(input_ids, 0) if hooks else input_ids)
        for hook in hooks:
            words = hook(self, input_ids, words)
        x = words
        if cfg.absolute_positions:
            x = x + look_up(cfg.max_position_embeddings, "position_embeddings", position_ids)
        if cfg.type_vocab_size:
            x = x + look_up(cfg.type_vocab_size, "token_type_embeddings", token_type_ids)
        if cfg.project_in_embeddings and cfg.embedding_width != cfg.hidden_size:
            x = Dense(cfg.hidden_size, cfg, self.runtime, use_bias=False, name="embed_proj")(
                x, deterministic)
        x = layer_norm(cfg, self.runtime)(x)
        return Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


def default_position_ids(config: EncoderConfig, input_ids: jax.Array) -> jax.Array:
    """Position ids as transformers computes them when none are given.

    BERT counts 0, 1, 2, ...; RoBERTa counts only non-pad tokens and starts at
    `pad_token_id + 1`, leaving pad tokens at `pad_token_id`.
    """
    if config.position_offset:
        not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


class Backbone(nn.Module):
    """`BertModel` / `RobertaModel` / `ElectraModel` / `DistilBertModel`: embeddings (and
    ELECTRA's `embeddings_project` when they are narrower than the hidden size), the layer
    stack (`layers`, named `layers_name`: `encoder/layer_i` by default), and (BERT) the
    pooler.

    Returns `(last_hidden_state, first_tokens, pooled)`: the hidden states
    `[rows, length, hidden]`, each example's first token `[examples, hidden]`, and (BERT)
    the pooler output on those (`None` without a pooler).

    Packed input: `segment_ids` (1, 2, ... per example within a row, 0 for padding) make the
    attention block-diagonal, and example `e` starts at `(example_row[e], example_pos[e])`.
    Without them each row is one example starting at position 0.

    With a soft prompt installed (`Runtime.virtual_tokens` > 0), unpacked rows are plain
    tokenizer output: the prompt's slots are prepended here (attended to, token type 0,
    positions first), as peft does; the hidden states then include them. Packed rows
    already hold the slots before each example.
    """

    config: EncoderConfig
    runtime: Runtime
    add_pooling_layer: bool = True
    layers: type = None  # default: EncoderLayers
    layers_name: str = "encoder"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True, segment_ids=None, example_row=None,
                 example_pos=None):
        cfg = self.config
        input_ids, attention_mask, token_type_ids, position_ids = prepare_inputs(
            cfg, self.runtime, input_ids, attention_mask, token_type_ids, position_ids,
            segment_ids)
        x = Embeddings(cfg, self.runtime, name="embeddings")(
            input_ids, token_type_ids, position_ids, deterministic)
        if x.shape[-1] != cfg.hidden_size:  # ELECTRA widens its embeddings here
            x = Dense(cfg.hidden_size, cfg, self.runtime, name="embeddings_project")(
                x, deterministic)
        mask = expand_attention_mask(attention_mask)
        x = (self.layers or EncoderLayers)(cfg, self.runtime, name=self.layers_name)(
            x, mask, deterministic)
        first = first_tokens(x, self.runtime, example_row, example_pos)
        pooled = None
        if self.add_pooling_layer:
            pooled = Pooler(cfg, self.runtime, name="pooler")(first, deterministic)
        return x, first, pooled


def prepare_inputs(config: EncoderConfig, runtime: Runtime, input_ids, attention_mask,
                   token_type_ids, position_ids, segment_ids):
    """`(input_ids, attention_mask, token_type_ids, position_ids)` as every family's backbone
    uses them: a soft prompt's slots prepended to unpacked rows, default positions, and the
    mask `[rows, key]` (unpacked) or block-diagonal `[rows, query, key]` (packed)."""
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    if runtime.virtual_tokens and segment_ids is None:
        input_ids, attention_mask, token_type_ids, position_ids = _prepend_slots(
            runtime.virtual_tokens, input_ids, attention_mask, token_type_ids, position_ids)
    if position_ids is None:
        position_ids = default_position_ids(config, input_ids)
    if segment_ids is not None:
        # Tokens attend within their own example; padding (0) only to padding, so no
        # softmax runs over an empty set.
        attention_mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    elif attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    return input_ids, attention_mask, token_type_ids, position_ids


def first_tokens(x, runtime: Runtime, example_row=None, example_pos=None):
    """Each example's first token `[examples, hidden]` (past a soft prompt read elsewhere):
    row starts when unpacked, `(example_row, example_pos)` when packed."""
    skip = runtime.first_token_offset
    return x[:, skip] if example_row is None else x[example_row, example_pos + skip]


def _prepend_slots(n, input_ids, attention_mask, token_type_ids, position_ids):
    """Unpacked inputs with `n` virtual-token slots (ids -1, ..., -n) before each row."""
    rows = input_ids.shape[0]
    slots = jnp.broadcast_to(-1 - jnp.arange(n, dtype=jnp.int32), (rows, n))
    input_ids = jnp.concatenate([slots, input_ids], axis=1)
    token_type_ids = jnp.concatenate([jnp.zeros_like(slots), token_type_ids], axis=1)
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise JaxpeftError("a soft prompt needs a [batch, key] attention mask on unpacked "
                               "rows (packed rows: pass segment_ids)")
        attention_mask = jnp.concatenate([jnp.ones_like(slots), attention_mask], axis=1)
    if position_ids is not None:
        # Given positions keep their start (0 for BERT, pad + 1 for RoBERTa) for the slots.
        start = position_ids[:, :1]
        position_ids = jnp.concatenate([start + jnp.arange(n, dtype=jnp.int32),
                                        position_ids + n], axis=1)
    return input_ids, attention_mask, token_type_ids, position_ids


class EncoderLayers(nn.Module):
    """The stack `layer_0 ... layer_{n-1}` (the `encoder` module of transformers) of
    `block` layers; a family with another layer subclasses it with its own `block`."""

    config: EncoderConfig
    runtime: Runtime
    block: ClassVar[type] = Layer

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        hooks = self.runtime.hooks_of(LayerHook)
        for i in range(self.config.num_hidden_layers):
            x = self.block(self.config, self.runtime, name=f"layer_{i}")(x, mask, deterministic)
            for hook in hooks:
                x = hook(self, i, x, mask)
        return x


class Pooler(nn.Module):
    """BERT's pooler: `tanh(dense(first token))`, given the first tokens `[examples, hidden]`."""

    config: EncoderConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, first, deterministic: bool = True):
        h = Dense(self.config.hidden_size, self.config, self.runtime, name="dense")(
            first, deterministic)
        return jnp.tanh(h)
