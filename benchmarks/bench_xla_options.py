"""A/B of XLA CPU compile options on the train step, interleaved in one process.

  python -m benchmarks.bench_xla_options --methods=full,lora --variants=default,individual_dot

Each variant compiles its own train step (per-jit `compiler_options`, so no process-wide
XLA_FLAGS); then the variants' steps run in turn, round after round, so a change in machine
load hits every variant alike. Prints the median step time of each variant per method, its
ratio to the first variant, and whether the losses stayed identical (an option that changes
numerics beyond float reassociation shows here). Variants name values of
`xla_cpu_experimental_ynn_fusion_type`, the option that chooses which ops XLA hands to
YNNPACK: `default` (this jaxlib's choice), `none` (XLA's own kernels), or '+'-joined
LIBRARY_FUSION_TYPE_ suffixes such as `individual_dot` or `dot+eltwise`; any other XLA
option joins with `&`: `dot+reduce&xla_cpu_enable_concurrency_optimized_scheduler=false`
(`true`/`false` and integers are passed as such, the rest as strings).

The `slow rounds` column counts a variant's steps over 1.25x its median (why there are such
steps: `benchmarks.bench_train.interleave`); where it is not zero, confirm a close call with
one process per variant (`bench_train --notorch`).
"""

import numpy as np
from absl import app, flags

# bench_train's flags (--model, --methods, --dtype, --random_weights, ...) apply here too.
from benchmarks.bench_train import (  # noqa: E402
    _random_batch, _train_setup, interleave, start_variant)
from jaxpeft import hostmem  # noqa: E402

flags.DEFINE_list("variants", ["default", "individual_dot"], "ynn fusion variants")
flags.DEFINE_string("shape", "32x128", "batch x sequence")
flags.DEFINE_integer("rounds", 10, "timed rounds (one step of every variant per round)")


def _option_value(text: str):
    """An option value from its text: a bool, an int, or the string itself."""
    if text in ("true", "false"):
        return text == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def compiler_options(variant: str):
    """The per-jit compile options of a variant name (None for XLA's defaults)."""
    from jaxpeft.train import YNN_FUSION_OPTION, ynn_fusion_types

    fusion, *others = variant.split("&")
    options = {name: _option_value(value) for name, value in (o.split("=", 1) for o in others)}
    if fusion == "none":
        options[YNN_FUSION_OPTION] = ""
    elif fusion != "default":
        options[YNN_FUSION_OPTION] = ynn_fusion_types(*fusion.split("+"))
    return options or None


def bench_method(f, method, batch, seq):
    """Median step seconds per variant for one method, steps interleaved across variants."""
    import jax

    from jaxpeft.train import StepCompile, create_train_state, make_train_step

    model, params, mask, tx, cfg, _ = _train_setup(f, method)
    data = jax.device_put(_random_batch(batch, seq, cfg.vocab_size))
    rng = jax.random.key(0)
    runs = {}
    for v in f.variants:
        state, frozen = create_train_state(params, mask, tx)
        step = make_train_step(model, tx, StepCompile(compiler_options(v)))
        runs[v] = start_variant(step, state, frozen, data, rng)
    return interleave(runs, data, rng, f.rounds)


def main(_):
    f = flags.FLAGS
    batch, seq = map(int, f.shape.split("x"))
    base = f.variants[0]
    print(f"malloc: {hostmem.use_tuned_malloc(f.tuned_malloc)}")
    print(f"{'method':>10} {'variant':>16} {'step ms':>9} {'vs ' + base:>12} {'compile s':>9} "
          f"{'max |loss diff|':>16} {'slow rounds':>11}")
    for method in f.methods:
        res = bench_method(f, method, batch, seq)
        ref = res[base]
        for v, r in res.items():
            diff = float(np.max(np.abs(np.subtract(r["losses"], ref["losses"]))))
            print(f"{method:>10} {v:>16} {r['step_s'] * 1e3:9.1f} "
                  f"{r['step_s'] / ref['step_s']:12.3f} {r['compile_s']:9.1f} {diff:16.2e} "
                  f"{r['slow_steps']:11d}")


if __name__ == "__main__":
    app.run(main)
