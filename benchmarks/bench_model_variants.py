"""A/B of the encoder's formulations in the train step, interleaved in one process.

  python -m benchmarks.bench_model_variants --methods=lora --shape=16x128:2 \
      --variants=before,gelu_erf,head_major,now

Section 5h of benchmarks/RESULTS.md replaced two formulations in `jaxpeft.models.encoder`;
this script keeps the replaced ones so the comparison can be rerun: GELU through
`jax.nn.gelu(approximate=False)` (an `erfc` form) against `gelu_erf`, and the training
attention's token-major einsums against `dropout_attention`'s heads-first products. Each
variant traces and compiles its own train step with its formulations patched in, then the
variants' steps alternate round by round (a change in machine load hits all alike). Prints
the median step time per variant, its ratio to the first, and the largest loss difference.

Variants: `before` (erfc GELU, token-major attention), `gelu_erf` (only the GELU changed),
`head_major` (only the attention changed), `now` (the library as it is). `--shape=RxL`
times random unpacked rows; `RxL:K` packs K examples into each row (block-diagonal
attention, as run_glue's packed batches), 32 examples in all.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

# bench_train's flags (--model, --methods, --dtype, --random_weights, ...) apply here too.
from benchmarks.bench_train import _load, _peft, _random_batch  # noqa: E402
from jaxpeft.models import encoder

flags.DEFINE_list("variants", ["before", "now"], "before, gelu_erf, head_major, now")
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


VARIANTS = {  # variant -> (gelu, training attention)
    "before": (_erfc_gelu, _token_major_attention),
    "gelu_erf": (encoder.gelu_erf, _token_major_attention),
    "head_major": (_erfc_gelu, encoder.dropout_attention),
    "now": (encoder.gelu_erf, encoder.dropout_attention),
}


def packed_batch(rows: int, length: int, per_row: int) -> dict:
    """`EXAMPLES` equal-length examples, `per_row` to a row filling 85 % of it, in
    run_glue's packed layout (segments, restarting positions, first-token coordinates)."""
    rs = np.random.default_rng(0)
    n = int(length * 0.85) // per_row
    segments = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    example_row = np.zeros(EXAMPLES, np.int32)
    example_pos = np.zeros(EXAMPLES, np.int32)
    placed = min(EXAMPLES, rows * per_row)  # the rest are padding examples (weight 0)
    for e in range(placed):
        r, j = divmod(e, per_row)
        segments[r, j * n:(j + 1) * n] = j + 1
        positions[r, j * n:(j + 1) * n] = np.arange(n)
        example_row[e], example_pos[e] = r, j * n
    ids = rs.integers(1000, 20000, (rows, length)).astype(np.int32)
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids),
            "position_ids": positions, "segment_ids": segments, "example_row": example_row,
            "example_pos": example_pos,
            "labels": rs.integers(0, 2, EXAMPLES).astype(np.int32),
            "weights": (np.arange(EXAMPLES) < placed).astype(np.float32)}


def bench_method(f, method: str) -> dict:
    """Median step seconds and losses per variant for one method, steps interleaved."""
    from jaxpeft.optim import OptimConfig, make_optimizer
    from jaxpeft.train import create_train_state, make_train_step, step_compile

    model, params, cfg = _load(f)
    shape, _, per_row = f.shape.partition(":")
    rows, length = map(int, shape.split("x"))
    data = jax.device_put(packed_batch(rows, length, int(per_row)) if per_row
                          else _random_batch(rows, length, cfg.vocab_size))
    peft = _peft(method)
    model, params = peft.init(model, params, jax.random.key(0))
    mask = peft.mask(params)
    tx = make_optimizer(OptimConfig(learning_rate=1e-4, total_steps=10_000), mask)
    rng = jax.random.key(0)
    kept = encoder.ACTIVATIONS["gelu"], encoder.dropout_attention
    runs = {}
    try:
        for v in f.variants:
            encoder.ACTIVATIONS["gelu"], encoder.dropout_attention = VARIANTS[v]
            state, frozen = create_train_state(params, mask, tx)
            step = make_train_step(model, tx, step_compile("auto", peft.cpu_dot_fusion))
            losses = []
            for _ in range(2):  # compile (traces with this variant's formulations), warm
                state, m = step(state, data, rng, frozen)
                losses.append(float(m["loss"]))
            runs[v] = {"step": step, "state": state, "frozen": frozen, "times": [],
                       "losses": losses}
    finally:
        encoder.ACTIVATIONS["gelu"], encoder.dropout_attention = kept
    for _ in range(f.rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            r["state"], m = r["step"](r["state"], data, rng, r["frozen"])
            jax.block_until_ready(m)
            r["times"].append(time.perf_counter() - t0)
            r["losses"].append(float(m["loss"]))
    return {v: {"step_s": float(np.median(r["times"])), "losses": r["losses"]}
            for v, r in runs.items()}


def main(_):
    f = flags.FLAGS
    unknown = sorted(set(f.variants) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    print(f"{'method':>10} {'shape':>10} {'variant':>11} {'step ms':>9} "
          f"{'vs ' + f.variants[0]:>10} {'max |loss diff|':>16}")
    for method in f.methods:
        res = bench_method(f, method)
        ref = res[f.variants[0]]
        for v, r in res.items():
            diff = float(np.max(np.abs(np.subtract(r["losses"], ref["losses"]))))
            print(f"{method:>10} {f.shape:>10} {v:>11} {r['step_s'] * 1e3:9.1f} "
                  f"{r['step_s'] / ref['step_s']:10.3f} {diff:16.2e}", flush=True)


if __name__ == "__main__":
    app.run(main)
