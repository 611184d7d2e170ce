"""A/B of the encoder's formulations in the train step, interleaved in one process.

  python -m benchmarks.bench_model_variants --methods=lora --shape=16x128:2 \
      --variants=before,gelu_erf,head_major,now

Sections 5h and 5l of benchmarks/RESULTS.md replaced formulations in `jaxpeft.models.encoder`
(and the PEFT hooks); this script keeps the replaced ones so the comparisons can be rerun:
GELU through `jax.nn.gelu(approximate=False)` (an `erfc` form) against `gelu_erf`, the
training attention's token-major einsums against `dropout_attention`'s heads-first
products, and token-wise products on `[batch, length, in]` against `token_matmul`'s
flattened ones. Each
variant traces and compiles its own train step with its formulations patched in, then the
variants' steps alternate round by round (a change in machine load hits all alike). Prints
the median step time per variant, its ratio to the first, and the largest loss difference.

Variants: `before` (erfc GELU, token-major attention), `gelu_erf` (only the GELU changed),
`head_major` (only the attention changed), `batched_products` (5h's formulations: both
changes, products on 3-d arrays), `now` (the library as it is; the first four use 3-d
products). `--shape=RxL`
times random unpacked rows; `RxL:K` packs K equal examples into each row with run_glue's
packer (block-diagonal attention), 32 examples in all.

The `slow rounds` column counts a variant's steps over 1.25x its median (why there are such
steps: `benchmarks.bench_train.interleave`); where it is not zero, confirm a close call with
one process per variant (`bench_train --notorch`).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

# bench_train's flags (--model, --methods, --dtype, --random_weights, ...) apply here too.
from benchmarks.bench_train import (  # noqa: E402
    _random_batch, _train_setup, interleave, start_variant)
from jaxpeft import hostmem
from jaxpeft.models import encoder
from jaxpeft.peft import registry  # noqa: F401 - imports every method's module

# Every module that calls `token_matmul`: a variant's product is patched into all of them.
PRODUCT_USERS = tuple(m for name, m in sorted(sys.modules.items()) if name.startswith("jaxpeft")
                      and getattr(m, "token_matmul", None) is encoder.token_matmul)

flags.DEFINE_list("variants", ["before", "now"],
                  "before, gelu_erf, head_major, batched_products, now")
flags.DEFINE_string("shape", "16x128:2", "rows x length, optionally ':examples per row'")
flags.DEFINE_integer("rounds", 10, "timed rounds (one step of every variant per round)")

EXAMPLES = 32


def _erfc_gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _token_major_attention(q, k, v, mask, dropout):
    """The training attention before section 5h: einsums over `[batch, length, heads, dim]`."""
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(logits, axis=-1).astype(q.dtype), deterministic=False)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


def _batched_matmul(x, w):
    """Token-wise products before section 5l: `x @ w` on `[batch, length, in]`."""
    return x @ w


VARIANTS = {  # variant -> (gelu, training attention, token-wise product)
    "before": (_erfc_gelu, _token_major_attention, _batched_matmul),
    "gelu_erf": (encoder.gelu_erf, _token_major_attention, _batched_matmul),
    "head_major": (_erfc_gelu, encoder.dropout_attention, _batched_matmul),
    "batched_products": (encoder.gelu_erf, encoder.dropout_attention, _batched_matmul),
    "now": (encoder.gelu_erf, encoder.dropout_attention, encoder.token_matmul),
}


def _use(gelu, attention, product) -> None:
    """Patches a variant's formulations in; a step traced afterwards uses them."""
    encoder.ACTIVATIONS["gelu"], encoder.dropout_attention = gelu, attention
    for module in PRODUCT_USERS:
        module.token_matmul = product


def packed_batch(rows: int, length: int, per_row: int) -> dict:
    """A batch of `EXAMPLES` slots packed by run_glue's packer (`make_packed_batch`): random
    examples of one length, sized so that exactly `per_row` fit a row and fill about 85 %
    of it, as many as `rows` rows hold (the other slots are padding examples)."""
    from jaxpeft.data.batching import Encoded, make_packed_batch

    rs = np.random.default_rng(0)
    n = min(EXAMPLES, rows * per_row)
    size = max(int(length * 0.85) // per_row, length // (per_row + 1) + 1)
    enc = Encoded(task="bench", split="train",
                  ids=rs.integers(1000, 20000, n * size).astype(np.int32),
                  type_ids=np.zeros(n * size, np.int8),
                  offsets=np.arange(n + 1, dtype=np.int64) * size,
                  labels=rs.integers(0, 2, n).astype(np.int32), idx=np.arange(n))
    return make_packed_batch(enc, np.arange(n), EXAMPLES, length, pad_id=0)


def bench_method(f, method: str) -> dict:
    """Median step seconds and losses per variant for one method, steps interleaved."""
    from jaxpeft.train import create_train_state, make_train_step, step_compile

    model, params, mask, tx, cfg, peft = _train_setup(f, method)
    shape, _, per_row = f.shape.partition(":")
    rows, length = map(int, shape.split("x"))
    data = jax.device_put(packed_batch(rows, length, int(per_row)) if per_row
                          else _random_batch(rows, length, cfg.vocab_size))
    rng = jax.random.key(0)
    runs = {}
    try:
        for v in f.variants:
            # the step traces (at its first call, in start_variant) with these formulations
            _use(*VARIANTS[v])
            state, frozen = create_train_state(params, mask, tx)
            step = make_train_step(model, tx, step_compile("auto", peft.cpu_dot_fusion))
            runs[v] = start_variant(step, state, frozen, data, rng)
    finally:
        _use(*VARIANTS["now"])
    return interleave(runs, data, rng, f.rounds)


def main(_):
    f = flags.FLAGS
    unknown = sorted(set(f.variants) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    print(f"malloc: {hostmem.use_tuned_malloc(f.tuned_malloc)}")
    print(f"{'method':>10} {'shape':>10} {'variant':>11} {'step ms':>9} "
          f"{'vs ' + f.variants[0]:>10} {'max |loss diff|':>16} {'slow rounds':>11}")
    for method in f.methods:
        res = bench_method(f, method)
        ref = res[f.variants[0]]
        for v, r in res.items():
            diff = float(np.max(np.abs(np.subtract(r["losses"], ref["losses"]))))
            print(f"{method:>10} {f.shape:>10} {v:>11} {r['step_s'] * 1e3:9.1f} "
                  f"{r['step_s'] / ref['step_s']:10.3f} {diff:16.2e} {r['slow_steps']:11d}",
                  flush=True)


if __name__ == "__main__":
    app.run(main)
