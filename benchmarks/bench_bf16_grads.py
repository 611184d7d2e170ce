"""How far a bfloat16 step's gradients are from float32 ones, per kind of trainable leaf.

  python -m benchmarks.bench_bf16_grads --model=minilm --methods=full,ia3 --shapes=32x128

bench_train's flags choose the model (`--random_weights --config_json=...` for one from its
config), methods and shapes. For each method and shape: one batch of random tokens
(sentence pairs: token types 0 and 1), every trainable leaf moved slightly off its initial
value (so that none has a zero gradient by construction), and the gradient of the mean
log-probability of class 0 in float32 and in bfloat16 compute; per kind of leaf (bias,
kernel, LayerNorm scale, each embedding table, each method's own leaves) the largest and
median relative difference, `|g_bf16 - g_f32| / |g_f32|`. Leaves whose float32 gradient is
essentially zero (BERT's key biases: softmax ignores them) are counted apart, since a
relative difference means nothing there.

With torch and peft installed, the same for the PyTorch peer (transformers + peft, the
method built as `bench_train` builds it, from the same weights, `torch.autocast(bfloat16)`
against float32), per kind of its parameters: how precise the reference's own bfloat16
gradients are.
"""

import collections

import numpy as np
from absl import app, flags

from benchmarks.bench_train import (  # noqa: F401 - and its flags
    _load, _peft, each_measurement, peer_available, torch_peer_model)


def leaf_kind(path: tuple) -> str:
    """`bias`, `kernel`, `LayerNorm/scale`, `word_embeddings`, `ia3_out`, ..."""
    if path[-1] == "embedding" and len(path) > 1:
        return path[-2]
    if len(path) > 1 and path[-2] == "LayerNorm":
        return "LayerNorm/" + path[-1]
    return path[-1]


def _pairs(batch: int, seq: int):
    """Random token ids and token types (the second half of each row is sentence 1)."""
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, seq))
    types = np.repeat((np.arange(seq) >= seq // 2)[None].astype(np.int64), batch, 0)
    return ids, types


def _compare(grads: dict):
    """`({name: relative difference}, names left out)` of the float32 and bfloat16 gradients
    in `grads`; left out: those whose float32 gradient is essentially zero."""
    exact, half = grads["float32"], grads["bfloat16"]
    largest = max(np.linalg.norm(g) for g in exact.values())
    zero = [k for k, g in exact.items() if np.linalg.norm(g) <= 1e-6 * largest]
    return {k: np.linalg.norm(half[k] - g) / np.linalg.norm(g)
            for k, g in exact.items() if k not in zero}, zero


def relative_errors(f, method: str, batch: int, seq: int):
    """`_compare` of one method's trainable leaves (by path)."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    ids, types = (jnp.asarray(a, jnp.int32) for a in _pairs(batch, seq))
    peft = _peft(method)
    grads = {}
    for dtype in ("float32", "bfloat16"):
        model, params, _ = _load(f, dtype)
        model, params = peft.init(model, params, jax.random.key(0))
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        params = jax.tree.unflatten(tree, [v + 0.02 * jax.random.normal(k, v.shape)
                                           for v, k in zip(leaves, keys)])
        mask = traverse_util.flatten_dict(peft.mask(params))

        def loss(p):
            logits = model.apply({"params": p}, ids, jnp.ones_like(ids), types)
            return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[:, 0])

        flat = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params))
        grads[dtype] = {k: np.asarray(v, np.float64) for k, v in flat.items() if mask[k]}
    return _compare(grads)


def torch_kind(name: str) -> str:
    """Our kind of a transformers / peft parameter name (`...attention.self.query.bias` ->
    `bias`, `...lora_A.default.weight` -> `lora_A`)."""
    parts = name.split(".")
    for part in parts:
        if part.endswith("_embeddings"):
            return part
        if part == "LayerNorm":
            return "LayerNorm/" + {"weight": "scale"}.get(parts[-1], parts[-1])
        if part.startswith(("lora_", "ia3_", "vera_")):
            return part
        if part == "prompt_encoder":
            return "prompt_embeddings"
    return {"weight": "kernel"}.get(parts[-1], parts[-1])


def torch_relative_errors(f, method: str, batch: int, seq: int):
    """`_compare` for the PyTorch peer's trainable parameters (by name), or None where peft
    has no such method."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # the new head's load report
    transformers.utils.logging.disable_progress_bar()
    ids, types = (torch.tensor(a) for a in _pairs(batch, seq))
    try:
        model = torch_peer_model(f, method)
    except NotImplementedError:
        return None
    model.eval()  # no dropout: the two passes must see the same function
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.02 * torch.randn_like(p))
    grads = {}
    for dtype in ("float32", "bfloat16"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(input_ids=ids, token_type_ids=types,
                           attention_mask=torch.ones_like(ids)).logits
        torch.log_softmax(logits.float(), -1)[:, 0].mean().backward()
        grads[dtype] = {n: p.grad.double().numpy().copy() for n, p in trainable.items()}
    return _compare(grads)


def _print_kinds(title: str, rel: dict, zero: list, kind_of) -> None:
    kinds = collections.defaultdict(list)
    for name, r in rel.items():
        kinds[kind_of(name)].append(r)
    print(f"\n{title} ({len(zero)} leaves with a zero float32 gradient left out)")
    print(f"  {'leaf kind':<24} {'leaves':>6} {'largest':>8} {'median':>8}")
    for kind, values in sorted(kinds.items()):
        print(f"  {kind:<24} {len(values):6d} {max(values):8.4f} {np.median(values):8.4f}")


def main(_):
    f = flags.FLAGS
    print(f"model {f.model}: |g_bf16 - g_f32| / |g_f32| per kind of trainable leaf")
    have_torch = peer_available(f)
    for method, batch, seq in each_measurement(f):
        _print_kinds(f"{method} {batch}x{seq}, jaxpeft", *relative_errors(f, method, batch, seq),
                     leaf_kind)
        peer = have_torch and torch_relative_errors(f, method, batch, seq)
        if peer:
            _print_kinds(f"{method} {batch}x{seq}, torch+peft (autocast)", *peer, torch_kind)


if __name__ == "__main__":
    app.run(main)
