"""Dropout mask cost: the hashed keep-mask against random-bit masks, on one activation.

  python -m benchmarks.bench_dropout --shape=32x12x128x128

Times a jitted inverted-dropout multiply (`where(keep, x / p, 0)`) on the given shape (the
default is MiniLM's attention probabilities at batch 32 x 128 tokens) with the mask from:
`jax.random.bernoulli` (threefry), threefry 32-bit words split into two 16-bit draws (what
jaxpeft used before), and `jaxpeft.models.encoder.keep_mask` (a hash of each position under
two keys), next to the multiply alone. Median of `--repeats` calls after one warm-up.
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxpeft.models.encoder import keep_mask

flags.DEFINE_string("shape", "32x12x128x128", "activation shape, x-separated")
flags.DEFINE_float("rate", 0.1, "dropout rate")
flags.DEFINE_integer("repeats", 15, "timed calls (median reported)")


def bernoulli_mask(rng, shape, rate):
    """JAX's own: one threefry draw per element."""
    return jax.random.bernoulli(rng, 1.0 - rate, shape), 1.0 - rate


def threefry16_mask(rng, shape, rate):
    """The previous jaxpeft mask: threefry words split into two 16-bit draws."""
    threshold = round(rate * 65536)
    size = math.prod(shape)
    words = jax.random.bits(rng, ((size + 1) // 2,), jnp.uint32)
    halves = jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(-1)[:size]
    return (halves >= threshold).reshape(shape), (65536 - threshold) / 65536


def _time(fn, x, repeats):
    fn(x, jax.random.key(0)).block_until_ready()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(x, jax.random.key(i + 1)).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(_):
    f = flags.FLAGS
    shape = tuple(int(d) for d in f.shape.split("x"))
    x = jnp.ones(shape, jnp.float32)
    print(f"shape {shape} ({math.prod(shape):,} elements), rate {f.rate}, device "
          f"{jax.devices()[0].device_kind}")
    for name, mask in (("bernoulli (threefry)", bernoulli_mask),
                       ("threefry, 16-bit halves (before)", threefry16_mask),
                       ("hashed positions (keep_mask, now)", keep_mask)):
        def apply(x, rng, mask=mask):
            keep, p = mask(rng, x.shape, f.rate)
            return jnp.where(keep, x * (1.0 / p), 0.0)
        print(f"{name:>34}: {_time(jax.jit(apply), x, f.repeats) * 1e3:7.1f} ms")
    print(f"{'multiply only':>34}: "
          f"{_time(jax.jit(lambda x, rng: x * 1.1), x, f.repeats) * 1e3:7.1f} ms")


if __name__ == "__main__":
    app.run(main)
