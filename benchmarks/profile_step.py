"""Where a train step's time goes on an accelerator: a `jax.profiler` trace of a few steps,
the device's kernels summed by name.

  python -m benchmarks.profile_step --random_weights --dtype=bfloat16 \
      --config_json=benchmarks/configs/bert-base/config.json --methods=full,lora \
      --shapes=32x128 --steps=3 --trace_out=/tmp/traces

bench_train's flags choose the model, methods, shapes and dtype. Per method and shape: the
untraced step (median of `--steps` steps), the device's busy time per traced step (kernel
intervals merged, so the gap between the two is launch and host time), and the kernels
taking most of it (ms per step, share of the busy time, launches per step, and for XLA's
fusions their output and ops), also summed by kind (the kernel name without its numbering). Kernels come from the trace's GPU stream
tracks; the trace's other device tracks (XLA's module and op lines) repeat the same time
and are listed once with their totals. On CPU there are no device tracks (the trace's host
threads hold XLA:CPU's work).
"""

import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks import machine
from benchmarks.bench_train import (  # noqa: F401 - and its flags
    _random_batch, _train_setup, each_measurement, interleave, start_variant)

flags.DEFINE_integer("top", 20, "kernels listed per method and shape")
flags.DEFINE_string("trace_out", "", "copy each perfetto_trace.json.gz here (for Perfetto), "
                    "with the step's optimized XLA program (.hlo.txt.gz)")


def device_kernels(trace: dict) -> tuple[dict, dict, float]:
    """From a perfetto trace's events: `{kernel name: (total us, launches)}` on the GPU
    stream tracks, `{track name: total us}` of every device track, and the busy time (us)
    of the stream tracks with overlapping kernels counted once."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e["tid"])] = e["args"]["name"]
    device = {pid for pid, name in process.items() if name.startswith("/device:")}
    tracks = collections.Counter()
    kernels = collections.defaultdict(lambda: [0.0, 0])
    intervals = []
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device:
            continue
        track = thread.get((e["pid"], e.get("tid")), str(e.get("tid")))
        tracks[f"{process[e['pid']]} {track}"] += e.get("dur", 0.0)
        if "stream" in track.lower():
            kernels[e["name"]][0] += e.get("dur", 0.0)
            kernels[e["name"]][1] += 1
            intervals.append((e["ts"], e["ts"] + e.get("dur", 0.0)))
    busy, end = 0.0, -np.inf
    for start, stop in sorted(intervals):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return {k: tuple(v) for k, v in kernels.items()}, dict(tracks), busy


_COMPUTATION = re.compile(r"^%?([\w.\-]+) \(.*\{$")
_FUSION = re.compile(r"%([\w.\-]+) = (\S+) fusion\(.*?kind=(\w+), calls=%([\w.\-]+)")
_OPCODE = re.compile(r"= \S+ ([a-z][\w\-]*)\(")
_PLUMBING = {"parameter", "constant", "bitcast", "broadcast", "tuple", "get-tuple-element",
             "copy", "reshape", "iota"}


def fusion_ops(hlo: str) -> dict:
    """`{kernel name: "shape kind: ops"}` from an optimized XLA program's text: what each
    fusion computes, under the name its kernel has in a GPU trace (the instruction's name
    with '.' and '-' as '_'); ops in order of first use, without data movement."""
    bodies, current = {}, None
    for line in hlo.splitlines():
        start = _COMPUTATION.match(line)
        if start and not line.startswith("ENTRY"):
            current = bodies.setdefault(start.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            op = _OPCODE.search(line)
            if op and op.group(1) not in _PLUMBING and op.group(1) not in current:
                current.append(op.group(1))
    described = {}
    for name, shape, fusion_kind, body in _FUSION.findall(hlo):
        ops = " ".join(bodies.get(body, [])[:8])
        described[re.sub(r"[.\-]", "_", name)] = f"{shape.split('{')[0]} {fusion_kind}: {ops}"
    return described


def kind(name: str) -> str:
    """A kernel's name without XLA's numbering (`loop_add_fusion_12` -> `loop_add_fusion`)."""
    return re.sub(r"([._]\d+)+$", "", name.split("(")[0])


def profile(f, method: str, batch: int, seq: int) -> None:
    """Times, traces and prints one method and shape."""
    import jax

    from jaxpeft.config import parse_xla_options
    from jaxpeft.train import create_train_state, make_train_step

    model, params, mask, tx, cfg, peft = _train_setup(f, method)
    state, frozen = create_train_state(params, mask, tx)
    del params
    step = make_train_step(model, tx, parse_xla_options(f.train_step_xla_options),
                           penalty=peft.penalty)
    data = jax.device_put(_random_batch(batch, seq, cfg.vocab_size))
    rng = jax.random.key(0)
    name = f"{method.split(':')[0]}_{batch}x{seq}"
    if f.trace_out:
        os.makedirs(f.trace_out, exist_ok=True)
    # Compile once and keep the step's optimized program: it names the trace's kernels.
    t0 = time.perf_counter()
    step = step.lower(state, data, rng, frozen).compile()
    lower_s = time.perf_counter() - t0
    hlo = step.as_text()
    described = fusion_ops(hlo)
    if f.trace_out:
        with gzip.open(os.path.join(f.trace_out, f"{name}.hlo.txt.gz"), "wt") as fh:
            fh.write(hlo)
    run = start_variant(step, state, frozen, data, rng)
    timed = interleave({name: run}, data, rng, f.steps)[name]
    state = run["state"]
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for i in range(f.steps):
                with jax.profiler.StepTraceAnnotation("train", step_num=i):
                    state, m = step(state, data, rng, frozen)
                    jax.block_until_ready(m)
        path = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        if f.trace_out:
            shutil.copyfile(path, os.path.join(f.trace_out, f"{name}.json.gz"))
        with gzip.open(path) as fh:
            kernels, tracks, busy = device_kernels(json.load(fh))
    print(f"\n{method} {batch}x{seq}: step {timed['step_s'] * 1e3:.2f} ms untraced (compile "
          f"{lower_s + timed['compile_s']:.1f} s), device busy {busy / f.steps / 1e3:.2f} ms "
          "a traced step")
    report(kernels, tracks, busy, described, f.steps, f.top)


def report(kernels: dict, tracks: dict, busy: float, described: dict, steps: int,
           top: int) -> None:
    """Prints `device_kernels`' figures per step: each device track's total, then the `top`
    kernels and kinds of kernel by time, with what `fusion_ops` says each fusion computes."""
    for track, us in sorted(tracks.items()):
        print(f"  track {track}: {us / steps / 1e3:.2f} ms a step")
    if not kernels:
        print("  no kernels on GPU stream tracks (a CPU run?)")
        return
    by_kind = collections.defaultdict(lambda: [0.0, 0])
    for name, (us, count) in kernels.items():
        by_kind[kind(name)][0] += us
        by_kind[kind(name)][1] += count
    for title, table in (("kernels", kernels), ("kinds", by_kind)):
        print(f"  {'ms/step':>8} {'share':>6} {'launches':>8}  {title}")
        for name, (us, count) in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"  {us / steps / 1e3:8.3f} {100 * us / busy:5.1f}% {count / steps:8.0f}  "
                  f"{name[:110]}")
            if name in described:
                print(f"{'':28}{described[name][:100]}")


def main(_):
    f = flags.FLAGS
    import jax

    print(machine.line())
    print(f"device {jax.devices()[0].device_kind}, dtype {f.dtype}, model {f.model}")
    for method, batch, seq in each_measurement(f):
        profile(f, method, batch, seq)


if __name__ == "__main__":
    app.run(main)
