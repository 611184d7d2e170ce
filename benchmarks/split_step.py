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
on the same leaves, then `clip_grad_norm_` and `AdamW.step`.

`--ops` adds a per-op split of the whole train step on each side, by part of the model
(`CATEGORIES`) and direction (forward, backward, optimizer), ms per step over `--steps`
profiled steps: jaxpeft's from a `jax.profiler` trace, each XLA:CPU thunk (fusion, dot,
custom call) placed by the op the compiled program's metadata names for it (the module path
and primitive; `transpose(...)` marks the backward pass); the peer's from `torch.profiler`,
each top-level op of the forward, each autograd node of the backward and everything in the
optimizer placed by its name and operand shapes. A fused kernel counts where its root op
belongs (a matmul with a GELU epilogue is a matmul), so the rows compare the two sides'
kernels, not exactly the same arithmetic.
"""

import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks import machine
from benchmarks.bench_train import (  # noqa: F401 - and its flags
    _random_batch, _train_setup, apply_side_malloc, torch_peer_model)

flags.DEFINE_bool("ops", False, "also split each side's whole step by op (module part and "
                  "direction) from a profiler trace")
flags.DEFINE_string("_split_worker", "", "internal: 'jax|torch:BxS'")

PARTS = ("forward", "input gradients", "weight gradients", "embedding gradients", "optimizer")
_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")
CATEGORIES = ("FFN matmuls", "GELU (and the FFN's bias)", "attention projections",
              "attention core", "LayerNorm (and residual adds)", "dropout (masks, masking)",
              "embeddings", "the rest (pooler, head, loss)", "optimizer (clip, AdamW)")
FFN, GELU, PROJECTIONS, CORE, NORM, DROPOUT, EMBEDDINGS, REST, OPTIMIZER = CATEGORIES
DIRECTIONS = ("forward", "backward", "optimizer")


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
    # Compiled once here: the timing and the per-op trace run the same executable.
    step = make_train_step(model, tx).lower(state, data, rng, frozen).compile()
    holder = {"state": state}

    def one():
        holder["state"], m = step(holder["state"], data, rng, frozen)
        jax.block_until_ready(m)
    out["step"] = _median_s(one, f.steps)
    if f.ops:
        out["ops"] = jax_ops(step, holder["state"], frozen, data, rng, f.steps)
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
    if f.ops:
        out["ops"] = torch_ops(model, inputs, labels, opt, params, f.steps)
    return out


def jax_category(ops: list) -> tuple[str, str]:
    """`(category, direction)` of an XLA:CPU thunk from the `(opcode, op_name)` of what it
    computes (a fusion: its instructions, root first; names as `jit(train_step)/transpose(
    jvp(SequenceClassifier))/bert/encoder/layer_0/...`): a thunk with a matmul counts as that
    matmul, one that draws dropout bits as dropout, any other by its root."""
    dots = [n for op, n in ops if op in ("dot", "convolution")]
    # Dropout's bits: threefry's rounds (xor and shifts), inlined where XLA fuses them.
    opcodes = {op for op, _ in ops}
    bits = ([n for _, n in ops if re.search(r"threefry|random_bits", n)]
            or ([n for _, n in ops] if {"xor", "shift-right-logical"} <= opcodes else []))
    name = (dots or bits or [n for _, n in ops])[0]
    if "transpose(" in name:
        direction = "backward"
    elif "jvp(" in name or bits:
        direction = "forward"  # the dropout masks' bits are drawn outside the jvp's names
    else:
        return OPTIMIZER, "optimizer"
    path = name.lower()
    if (bits and not dots) or "dropout" in path:
        return DROPOUT, direction
    if "layernorm" in path:
        return NORM, direction
    if "embeddings" in path:
        return EMBEDDINGS, direction
    if "/intermediate/" in path or re.search(r"/layer_\d+/output/dense", path):
        return (FFN if dots else GELU), direction
    if re.search(r"attention/self/(query|key|value)|attention/output/dense", path) and dots:
        return PROJECTIONS, direction
    if "attention/self" in path:
        return CORE, direction
    if re.search(r"/layer_\d+/", path):  # the residual adds before each LayerNorm
        return NORM, direction
    return REST, direction


def _thunk_ops(hlo: str) -> dict:
    """`{instruction name: [(opcode, op_name), ...]}` of an optimized program's text: each
    instruction's own, then (for fusions and calls) its computation's, root first."""
    own, bodies, calls, current = {}, {}, {}, None
    for line in hlo.splitlines():
        start = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if start and "=" not in line.split("{")[0]:
            current = bodies.setdefault(start.group(1), [])
            continue
        m = re.match(r"\s*(ROOT )?%([\w.\-]+) = (?:\(.*?\)|\S+) ([\w-]+)\(", line)
        if not m:
            continue
        name = re.search(r'op_name="([^"]+)"', line)
        if name:
            op = (m.group(3), name.group(1))
            own[m.group(2)] = op
            if current is not None:
                current.insert(0, op) if m.group(1) else current.append(op)
        called = re.search(r"calls=%([\w.\-]+)", line)
        if called:
            calls[m.group(2)] = called.group(1)
    return {n: ([own[n]] if n in own else []) + bodies.get(calls.get(n), [])
            for n in set(own) | set(calls)}


def split_overlaps(intervals: list) -> list:
    """Each `(start, end, key)` interval's share of wall time: where k intervals overlap,
    each gets 1/k of that stretch (XLA:CPU runs independent thunks at once), so the shares
    add up to the busy time."""
    edges = sorted({t for s, e, _ in intervals for t in (s, e)})
    starts = sorted(range(len(intervals)), key=lambda i: intervals[i][0])
    share, active, nxt = [0.0] * len(intervals), set(), 0
    for left, right in zip(edges, edges[1:]):
        while nxt < len(starts) and intervals[starts[nxt]][0] <= left:
            active.add(starts[nxt])
            nxt += 1
        active = {i for i in active if intervals[i][1] > left}
        for i in active:
            share[i] += (right - left) / len(active)
    return share


def jax_ops(compiled, state, frozen, data, rng, steps: int) -> dict:
    """`{direction: {category: ms per step}}` of jaxpeft's compiled train step, from a
    `jax.profiler` trace of `steps` steps (overlapping thunks share their wall time)."""
    import jax

    named = _thunk_ops(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                state, m = compiled(state, data, rng, frozen)
                jax.block_until_ready(m)
        path = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as fh:
            trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    # Thunks whose instructions carry no source name (copies XLA inserts, the reduction
    # trees it builds for the gradient norm) are counted apart.
    intervals = [(e["ts"], e["ts"] + e.get("dur", 0.0),
                  jax_category(named[op]) if named.get(op) else ("", "unnamed"))
                 for e in events if e.get("ph") == "X"
                 for op in [e.get("args", {}).get("hlo_op")] if op]
    out = {d: dict.fromkeys(CATEGORIES, 0.0) for d in DIRECTIONS}
    out["unnamed"] = {"": 0.0}
    for (_, _, (category, direction)), us in zip(intervals, split_overlaps(intervals)):
        out[direction][category] += us / 1e3 / steps
    return out


def torch_category(name: str, shapes, intermediate: int, tokens: int) -> str:
    """The category of a top-level forward op or a backward autograd node of the peer, from
    its name and operand shapes."""
    name = name.lower()
    dims = {d for s in shapes or () for d in (s or ())}
    if "layer_norm" in name or "layernorm" in name:
        return NORM
    if "dropout" in name or "bernoulli" in name:
        return DROPOUT
    if "embedding" in name:
        return EMBEDDINGS
    if "gelu" in name:
        return GELU
    if "scaled_dot_product" in name or "softmax" in name or "bmm" in name:
        return CORE
    if any(k in name for k in ("linear", "addmm", "mm", "matmul")) and tokens in dims:
        return FFN if intermediate in dims else PROJECTIONS
    if name.startswith("aten::add") and tokens * intermediate not in dims:
        return NORM  # the residual adds
    return REST


def torch_ops(model, inputs, labels, opt, params, steps: int) -> dict:
    """`{direction: {category: ms per step}}` of the peer's train step from `torch.profiler`."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    def step():
        with record_function("phase:forward"):
            loss = model(**inputs, labels=labels).loss
        with record_function("phase:backward"):
            loss.backward()
        with record_function("phase:optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    intermediate = model.config.intermediate_size
    tokens = int(inputs["input_ids"].numel())
    out = {d: dict.fromkeys(CATEGORIES, 0.0) for d in DIRECTIONS}

    def shapes_below(evt):
        found = list(evt.input_shapes or ())
        for child in evt.cpu_children:
            found += shapes_below(child)
        return found

    def visit(evt, phase):
        if evt.name.startswith("phase:"):
            phase = evt.name[len("phase:"):]
            for child in evt.cpu_children:
                visit(child, phase)
            return
        ms = evt.cpu_time_total / 1e3 / steps  # inclusive: the op with what it calls
        if phase == "optimizer":
            out["optimizer"][OPTIMIZER] += ms
        elif phase == "forward" and evt.name.startswith("aten::"):
            out["forward"][torch_category(evt.name, shapes_below(evt), intermediate,
                                          tokens)] += ms
        elif phase == "backward" and evt.name.startswith("autograd::engine::evaluate"):
            node = evt.name.rsplit(" ", 1)[-1]
            out["backward"][torch_category(node, shapes_below(evt), intermediate,
                                           tokens)] += ms
        elif phase in ("forward", "backward"):  # modules' own ranges, the engine's wrappers
            for child in evt.cpu_children:
                visit(child, phase)

    for evt in prof.events():
        if evt.cpu_parent is None:
            visit(evt, None)
    return out


def print_ops(mine: dict, peer: dict) -> None:
    """The per-op split of both sides as a markdown table."""
    print("| part | jaxpeft forward | peer forward | jaxpeft backward | peer backward |\n"
          "|---|---:|---:|---:|---:|")
    for c in CATEGORIES[:-1]:
        print(f"| {c} | {mine['forward'][c]:.1f} | {peer['forward'][c]:.1f} | "
              f"{mine['backward'][c]:.1f} | {peer['backward'][c]:.1f} |")
    print(f"| {OPTIMIZER} | {mine['optimizer'][OPTIMIZER]:.1f} | "
          f"{peer['optimizer'][OPTIMIZER]:.1f} | | |")
    print(f"| XLA's own ops without a source name (copies, reduction trees) | "
          f"{mine['unnamed']['']:.1f} | — | | |")
    totals = [sum(side[d].values()) for d in ("forward", "backward") for side in (mine, peer)]
    print("| **sum** | " + " | ".join(f"{t:.1f}" for t in totals) + " |")
    whole = [sum(sum(v.values()) for v in side.values()) for side in (mine, peer)]
    print(f"| **all, traced** | {whole[0]:.1f} | {whole[1]:.1f} | | |")


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
        apply_side_malloc(f, impl)
        fn = jax_stages if impl == "jax" else torch_stages
        print("RESULT " + json.dumps(fn(f, batch, seq)))
        return
    print(machine.line())
    print(f"model {f.config_json or f.model}, full fine-tuning, float32, dropout on; "
          f"ms per step, median of {f.steps}; malloc: jaxpeft --host_malloc={f.host_malloc}, "
          f"peer --peer_malloc={f.peer_malloc}")
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
        if f.ops:
            print(f"\n{shape}, per op (ms per step, {f.steps} profiled steps):")
            print_ops(rows[("jax", shape)]["ops"], rows[("torch", shape)]["ops"])
    if f.out:
        with open(f.out, "w") as fh:
            json.dump({"machine": machine.describe(),
                       "stages_s": {f"{i}:{s}": v for (i, s), v in rows.items()}}, fh, indent=2)


if __name__ == "__main__":
    app.run(main)
