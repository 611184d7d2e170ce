"""One residual LayerNorm of the encoder, alone: jaxpeft's against PyTorch's, forward and
forward + backward, with and without dropout on the branch (BERT's `*Output` blocks compute
`LayerNorm(dropout(dense) + residual)`).

  taskset -c 1 python -m benchmarks.bench_layernorm --shape=32x128x384

The per-op split of the whole step (`split_step --ops`) charges a fused kernel to its root
op, so its LayerNorm row also holds the residual add and the dropout masking XLA fuses into
the norm, and runs them inside the step (buffers, threads, caches shared with the matmuls).
This measures the same arithmetic in isolation, so the two readings can be told apart.
Median of `--runs` calls after a compiling (or warm) one; both sides in this process, one
after the other.
"""

import timeit

import numpy as np
from absl import app, flags

from benchmarks import machine

flags.DEFINE_string("shape", "32x128x384", "batch x sequence x hidden (MiniLM: hidden 384)")
flags.DEFINE_float("dropout", 0.1, "the branch's dropout rate (BERT's hidden_dropout_prob)")
flags.DEFINE_integer("runs", 30, "timed calls per case")
flags.DEFINE_bool("torch", True, "also time PyTorch's nn.LayerNorm and nn.Dropout")


def _median_ms(fn, runs: int) -> float:
    fn()  # compiles (jax) or warms the allocator (torch)
    return float(np.median(timeit.repeat(fn, number=1, repeat=runs))) * 1e3


def jax_cases(shape: tuple, rate: float, runs: int) -> dict:
    """ms per call of jaxpeft's `LayerNorm(x + residual)` and `LayerNorm(Dropout(x) +
    residual)`, forward and forward + backward (gradients of x, scale and bias)."""
    import jax
    import jax.numpy as jnp

    from jaxpeft.models.encoder import Dropout, LayerNorm

    norm, drop = LayerNorm(epsilon=1e-12), Dropout(rate=rate)
    x, residual = (jax.random.normal(jax.random.PRNGKey(i), shape) for i in (0, 1))
    params = norm.init(jax.random.PRNGKey(2), x)
    key = jax.random.PRNGKey(3)

    def forward(params, x, key, dropout):
        branch = drop.apply({}, x, deterministic=False, rngs={"dropout": key}) if dropout else x
        return norm.apply(params, branch + residual)

    out = {}
    for dropout in (False, True):
        fwd = jax.jit(lambda p, x, k, d=dropout: forward(p, x, k, d))
        grad = jax.jit(jax.grad(lambda p, x, k, d=dropout: (forward(p, x, k, d) * residual).sum(),
                                argnums=(0, 1)))
        name = "with dropout" if dropout else "no dropout"
        out[f"forward, {name}"] = _median_ms(
            lambda: jax.block_until_ready(fwd(params, x, key)), runs)
        out[f"forward + backward, {name}"] = _median_ms(
            lambda: jax.block_until_ready(grad(params, x, key)), runs)
    return out


def torch_cases(shape: tuple, rate: float, runs: int) -> dict:
    """The same cases with `torch.nn.LayerNorm` and `torch.nn.Dropout` (training mode)."""
    import torch

    norm, drop = torch.nn.LayerNorm(shape[-1], eps=1e-12), torch.nn.Dropout(rate)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, requires_grad=True)
    residual = torch.randn(shape, generator=generator)
    out = {}
    for dropout in (False, True):
        def forward(d=dropout):
            return norm((drop(x) if d else x) + residual)

        def backward(d=dropout):
            x.grad = None
            norm.zero_grad()
            (forward(d) * residual).sum().backward()

        name = "with dropout" if dropout else "no dropout"
        with torch.no_grad():
            out[f"forward, {name}"] = _median_ms(forward, runs)
        out[f"forward + backward, {name}"] = _median_ms(backward, runs)
    return out


def main(_):
    f = flags.FLAGS
    try:
        shape = tuple(int(n) for n in f.shape.split("x"))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        raise SystemExit(f"error: --shape={f.shape!r}: expected BxSxH, e.g. 32x128x384")
    print(machine.line())
    ours = jax_cases(shape, f.dropout, f.runs)
    peer = torch_cases(shape, f.dropout, f.runs) if f.torch else {}
    print(f"one residual LayerNorm at {f.shape}, dropout {f.dropout:g}; ms per call, median "
          f"of {f.runs}")
    print(f"{'case':<34} {'jaxpeft':>9} {'peer':>9}")
    for case, ms in ours.items():
        other = f"{peer[case]:9.3f}" if case in peer else f"{'—':>9}"
        print(f"{case:<34} {ms:9.3f} {other}")


if __name__ == "__main__":
    app.run(main)
