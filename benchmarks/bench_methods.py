"""Times one jitted train step per PEFT method (after compilation) and prints the ratios.

  python -m benchmarks.bench_methods --model=minilm --batch_size=32 --seq_len=128

Random token ids of the full length (no padding), AdamW, LoRA r=8 on query/value.
"""

import time

import jax
import numpy as np
from absl import app, flags

import jaxpeft
from jaxpeft.optim import OptimConfig, make_optimizer
from jaxpeft.peft import LoraConfig, add_lora, count_params, lora_model, trainable_mask
from jaxpeft.train import create_train_state, make_train_step

flags.DEFINE_string("model", "minilm", "model name or folder")
flags.DEFINE_integer("batch_size", 32, "examples per step")
flags.DEFINE_integer("seq_len", 128, "tokens per example")
flags.DEFINE_integer("steps", 10, "timed steps per method")
flags.DEFINE_list("methods", ["full", "lora", "bitfit"], "methods to time")


def time_method(pre, method, batch, steps):
    """Returns (compile seconds, median step seconds, trainable count)."""
    model, params = pre.model, pre.params
    if method == "lora":
        cfg = LoraConfig(rank=8, alpha=16)
        params, model = add_lora(params, cfg, jax.random.key(0)), lora_model(model, cfg)
    mask = trainable_mask(params, method)
    tx = make_optimizer(OptimConfig(learning_rate=1e-4, total_steps=1000), params, mask)
    state = create_train_state(params, mask, tx)
    step = make_train_step(model, tx)
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    state, m = step(state, batch, rng)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch, rng)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times)), count_params(params, mask).trainable


def main(_):
    f = flags.FLAGS
    pre = jaxpeft.load_pretrained(f.model, num_labels=2, tokenizer=False)
    rs = np.random.default_rng(0)
    b, s = f.batch_size, f.seq_len
    batch = {"input_ids": rs.integers(1000, 20000, (b, s)), "attention_mask": np.ones((b, s), int),
             "token_type_ids": np.zeros((b, s), int), "labels": rs.integers(0, 2, b),
             "weights": np.ones(b, np.float32)}
    print(f"{f.model}, batch {b} x seq {s}, {jax.device_count()} x {jax.devices()[0].device_kind}")
    results = {}
    for method in f.methods:
        compile_s, step_s, trainable = time_method(pre, method, batch, f.steps)
        results[method] = step_s
        print(f"{method:7s} trainable {trainable:>11,}  compile {compile_s:6.1f} s  "
              f"step {step_s * 1000:7.1f} ms  {b / step_s:6.1f} examples/s")
    if "full" in results:
        for m in results:
            if m != "full":
                print(f"{m}/full step-time ratio: {results[m] / results['full']:.3f}")


if __name__ == "__main__":
    app.run(main)
