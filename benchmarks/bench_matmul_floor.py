"""How fast a full fine-tuning step could be if it were nothing but its own matrix products.

  python -m benchmarks.bench_matmul_floor --model=minilm --shape=32x128

Times every matrix product of one BERT full fine-tuning step (forward, input gradients,
weight gradients, and the four attention products forward and backward), each alone as a
jitted `dot_general` in the operand layout the step's einsums give it, fastest of --calls
calls, and sums them weighted by how often a step runs each. The sum is the step's floor on
this machine with XLA's matmul kernels; its FLOP/s is the most the step's "fraction of the
matmul rate" (bench_train) can reach when everything that is not a product takes no time.
Pooler and classifier products (under 0.1 % of the FLOPs) are left out.
"""

import json

import numpy as np
from absl import app, flags

# bench_train's flags (--model, --config_json, --tuned_malloc) apply here too.
from benchmarks.bench_train import fastest_call_s  # noqa: E402

flags.DEFINE_string("shape", "32x128", "batch x sequence")
flags.DEFINE_integer("calls", 30, "timed calls per product (the fastest counts)")


def products(cfg: dict, batch: int, seq: int) -> list:
    """(name, lhs shape, rhs shape, (lhs, rhs) contracting dims, count per step, FLOPs each);
    leading dims of 4-d operands are batch dims."""
    d, ff, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    t = batch * seq
    rows = []
    # Dense layers: q, k, v, attention output (d -> d); intermediate (d -> ff); output (ff -> d).
    for n_in, n_out, count in ((d, d, 4), (d, ff, 1), (ff, d, 1)):
        flops = 2 * t * n_in * n_out
        c = count * layers
        rows += [(f"forward  x @ W        {n_in}->{n_out}", (t, n_in), (n_in, n_out),
                  ((1,), (0,)), c, flops),
                 (f"backward dy @ W^T     {n_in}->{n_out}", (t, n_out), (n_in, n_out),
                  ((1,), (1,)), c, flops),
                 (f"backward x^T @ dy     {n_in}->{n_out}", (t, n_in), (t, n_out),
                  ((0,), (0,)), c, flops)]
    shape, scores = (batch, heads, seq, d // heads), (batch, heads, seq, seq)
    flops = 2 * batch * heads * seq * seq * (d // heads)
    # Per layer: q k^T and dctx v^T contract the head dim of both; p v and ds k contract the
    # keys; p^T dctx and ds^T q contract the queries.
    rows += [("attention q @ k^T, dctx @ v^T", shape, shape, ((3,), (3,)), 2 * layers, flops),
             ("attention p @ v, ds @ k", scores, shape, ((3,), (2,)), 2 * layers, flops),
             ("attention p^T @ dctx, ds^T @ q", scores, shape, ((2,), (2,)), 2 * layers, flops)]
    return rows


def main(_):
    f = flags.FLAGS
    from jaxpeft import hostmem

    malloc = hostmem.use_tuned_malloc(f.tuned_malloc)
    import jax
    from jax import lax

    from jaxpeft.models.checkpoint import resolve_model_dir

    cfg = json.load(open(f.config_json or resolve_model_dir(f.model) / "config.json"))
    batch, seq = map(int, f.shape.split("x"))
    rs = np.random.default_rng(0)
    print(f"model {f.model}, shape {f.shape}, device {jax.devices()[0].device_kind}, "
          f"malloc {malloc}")
    print(f"{'product':>38} {'x step':>7} {'ms each':>8} {'GFLOP/s':>8} {'ms a step':>10}")
    total_s = total_flops = 0.0
    for name, lhs, rhs, contract, count, flops in products(cfg, batch, seq):
        batch_dims = tuple(range(len(lhs) - 2))
        dims = (contract, (batch_dims, batch_dims))
        fn = jax.jit(lambda a, b, dims=dims: lax.dot_general(a, b, dims))
        a = jax.device_put(rs.standard_normal(lhs, np.float32))
        b = jax.device_put(rs.standard_normal(rhs, np.float32))
        best = fastest_call_s(fn, a, b, calls=f.calls)
        total_s += count * best
        total_flops += count * flops
        print(f"{name:>38} {count:7d} {best * 1e3:8.2f} {flops / best / 1e9:8.1f} "
              f"{count * best * 1e3:10.1f}")
    print(f"sum: {total_s * 1e3:.0f} ms a step for {total_flops / 1e9:.0f} GFLOP "
          f"({total_flops / total_s / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    app.run(main)
