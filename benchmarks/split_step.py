"""Where full fine-tuning's step time goes, jaxpeft beside the PyTorch peer: forward, input
gradients, weight gradients, embedding-table gradients, optimizer update.

  python -m benchmarks.split_step --model=minilm --shapes=32x128 --steps=8

Each part is the difference between two programs timed alike (median of `--steps` calls
after a compiling and a warm one, each side in its own process, dropout on):
  forward            the loss
  input gradients    + the gradient of the embeddings' LayerNorm (the bottom of the network:
                     the backward pass through every layer, no dense weight gradient)
  weight gradients   + the gradients of every leaf but the three embedding tables
  embedding grads    + the gradients of the embedding tables (word, position, token type)
  optimizer          the whole train step (clipping, AdamW, the new parameters) less the
                     gradients of every leaf
The peer is the same split in transformers: `torch.no_grad` forward, then `requires_grad`
on the same leaves, then `clip_grad_norm_` and `AdamW.step`. Per-op profiles say which
kernels run; this says which part of the step costs what, on both sides alike.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from benchmarks import machine
from benchmarks.bench_train import (  # noqa: F401 - and its flags
    _random_batch, _train_setup, torch_peer_model)

flags.DEFINE_string("_split_worker", "", "internal: 'jax|torch:BxS'")

PARTS = ("forward", "input gradients", "weight gradients", "embedding gradients", "optimizer")
_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def _median_s(fn, steps):
    fn()
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def jax_stages(f, batch: int, seq: int) -> dict:
    """Seconds of each cumulative program on the jaxpeft side."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from jaxpeft.peft import combine, partition
    from jaxpeft.train import create_train_state, forward, make_train_step, per_example_loss

    model, params, mask, tx, cfg, _ = _train_setup(f, "full")
    data = jax.device_put(_random_batch(batch, seq, cfg.vocab_size))
    rng = jax.random.key(0)
    flat = traverse_util.flatten_dict(params)
    bottom = {p: "embeddings" in p and "LayerNorm" in p for p in flat}
    dense = {p: not any(t in p for t in _TABLES) for p in flat}

    def loss(p):
        logits = forward(model, p, data, False, {"dropout": rng})
        return jnp.mean(per_example_loss(logits, data["labels"], False))

    def grads_of(which):
        train, frozen = partition(params, traverse_util.unflatten_dict(which))
        fn = jax.jit(lambda t, fz: jax.value_and_grad(lambda t: loss(combine(t, fz)))(t))
        return lambda: jax.block_until_ready(fn(train, frozen))

    out = {"loss": _median_s(lambda: jax.block_until_ready(jax.jit(loss)(params)), f.steps)}
    for name, which in (("bottom", bottom), ("dense", dense),
                        ("all", {p: True for p in flat})):
        out[name] = _median_s(grads_of(which), f.steps)
    state, frozen = create_train_state(params, mask, tx)
    step = make_train_step(model, tx)
    holder = {"state": state}

    def one():
        holder["state"], m = step(holder["state"], data, rng, frozen)
        jax.block_until_ready(m)
    out["step"] = _median_s(one, f.steps)
    return out


def torch_stages(f, batch: int, seq: int) -> dict:
    """The same cumulative programs in transformers."""
    import torch

    torch.set_num_threads(f.threads or os.cpu_count())
    model = torch_peer_model(f, "full").train()
    b = _random_batch(batch, seq, model.config.vocab_size)
    inputs = {k: torch.tensor(b[k], dtype=torch.long)
              for k in ("input_ids", "token_type_ids", "attention_mask")}
    labels = torch.tensor(b["labels"], dtype=torch.long)
    named = dict(model.named_parameters())

    def backward_of(pred):
        for n, p in named.items():
            p.requires_grad_(pred(n))

        def one():
            model(**inputs, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)
        return one

    def forward():
        with torch.no_grad():
            model(**inputs, labels=labels)

    out = {"loss": _median_s(forward, f.steps)}
    out["bottom"] = _median_s(backward_of(lambda n: "embeddings.LayerNorm" in n), f.steps)
    out["dense"] = _median_s(backward_of(lambda n: not any(t in n for t in _TABLES)), f.steps)
    out["all"] = _median_s(backward_of(lambda n: True), f.steps)
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(**inputs, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["step"] = _median_s(step, f.steps)
    return out


def parts(stages: dict) -> dict:
    """The five parts (ms) from the cumulative programs' seconds."""
    order = ("loss", "bottom", "dense", "all", "step")
    cumulative = [stages[k] for k in order]
    return {name: 1e3 * (b - a) for name, a, b in zip(PARTS, [0.0] + cumulative, cumulative)}


def main(_):
    f = flags.FLAGS
    if f._split_worker:
        impl, shape = f._split_worker.split(":")
        batch, seq = map(int, shape.split("x"))
        fn = jax_stages if impl == "jax" else torch_stages
        print("RESULT " + json.dumps(fn(f, batch, seq)))
        return
    print(machine.line())
    print(f"model {f.config_json or f.model}, full fine-tuning, float32, dropout on; "
          f"ms per step, median of {f.steps}")
    rows = {}
    for shape in f.shapes:
        for impl in ("jax", "torch"):
            args = [a for a in sys.argv[1:] if not a.startswith("--_split_worker")]
            proc = subprocess.run([sys.executable, "-m", "benchmarks.split_step", *args,
                                   f"--_split_worker={impl}:{shape}"],
                                  capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{impl} {shape} failed:\n{proc.stderr[-2000:]}")
                continue
            rows[(impl, shape)] = json.loads(lines[-1][len("RESULT "):])
        print(f"\n{shape}:\n| part | jaxpeft ms | peer ms | jaxpeft / peer |\n|---|---:|---:|---:|")
        if ("jax", shape) not in rows or ("torch", shape) not in rows:
            continue
        mine, peer = parts(rows[("jax", shape)]), parts(rows[("torch", shape)])
        for name in PARTS:
            print(f"| {name} | {mine[name]:.1f} | {peer[name]:.1f} | "
                  f"{mine[name] / peer[name] if peer[name] > 0 else float('nan'):.2f} |")
        total = (rows[("jax", shape)]["step"], rows[("torch", shape)]["step"])
        print(f"| **step** | {1e3 * total[0]:.1f} | {1e3 * total[1]:.1f} | "
              f"{total[0] / total[1]:.2f} |")
    if f.out:
        with open(f.out, "w") as fh:
            json.dump({"machine": machine.describe(),
                       "stages_s": {f"{i}:{s}": v for (i, s), v in rows.items()}}, fh, indent=2)


if __name__ == "__main__":
    app.run(main)
