"""Memory and step time of the train step on data-parallel against fsdp meshes.

  python -m benchmarks.bench_shard --random_weights \
      --config_json=benchmarks/configs/bert-large/config.json \
      --devices=8 --meshes="data:8;fsdp:8;data:2,fsdp:4" --methods=full,lora --shapes=8x128

With `--devices=N` the mesh runs on N host devices of this CPU
(`--xla_force_host_platform_device_count`): they share its cores and memory, so the step
times show the cost of the sharded program's gathers and reductions, not a speed-up; the
per-device bytes are what each accelerator of a real mesh (a TPU slice, a multi-GPU host)
would hold. Per mesh and method: bytes one device holds of parameters and of optimizer state
(as a run reports them in config.json), computed from the shardings before anything is
allocated; then, where the whole mesh fits in this host's memory, the median step time and
the process's peak memory, each in its own process.
"""

import json
import os
import re
import subprocess
import sys

from absl import app, flags

from benchmarks import machine
from benchmarks.bench_train import (  # noqa: F401 - and its flags
    _peak_memory_bytes, _random_batch, _train_setup, interleave, start_variant)

flags.DEFINE_integer("devices", 0, "host devices to force (0: the devices there are)")
flags.DEFINE_string("meshes", "data:8;fsdp:8;data:2,fsdp:4", "--mesh values, ';'-separated")
flags.DEFINE_bool("plan_only", False, "only the per-device bytes (no steps)")
flags.DEFINE_float("host_fraction", 0.8, "skip the steps of a mesh whose estimated total "
                   "(every device's parameters, gradients and optimizer state) exceeds this "
                   "fraction of the host's available memory")
flags.DEFINE_string("_shard_worker", "", "internal: 'plan|steps;method;mesh;BxS'")


def _available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def plan(f, method: str, mesh: str) -> dict:
    """Bytes per device of the state and frozen weights, from shapes and shardings only."""
    import jax
    import numpy as np

    from jaxpeft.distributed import Sharder
    from jaxpeft.train import create_train_state

    model, params, mask, tx, cfg, peft = _train_setup(f, method)
    sharder = Sharder(mesh)
    state, frozen = jax.eval_shape(lambda p: create_train_state(p, mask, tx), params)

    def held(tree):
        return int(sum(np.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                       for x, s in zip(jax.tree.leaves(tree),
                                       jax.tree.leaves(sharder.shardings(tree)))))
    return {"mesh": sharder.describe(), "method": method,
            "trainable": peft.count(params).trainable,
            "params_bytes": held((state.trainable, frozen)),
            "trainable_bytes": held(state.trainable),
            "optimizer_state_bytes": held(state.opt_state)}


def steps(f, method: str, mesh: str, batch: int, seq: int) -> dict:
    """Median step seconds on the mesh, and the bytes the placed arrays hold per device."""
    import jax

    from jaxpeft.distributed import Sharder, bytes_per_device
    from jaxpeft.train import create_train_state, make_train_step

    model, params, mask, tx, cfg, peft = _train_setup(f, method)
    sharder = Sharder(mesh)
    state, frozen = create_train_state(sharder.place(params), mask, tx, sharder.shardings)
    del params
    step = make_train_step(model, tx, None, sharder.shardings(state), peft.penalty)
    data = sharder.batch(_random_batch(batch, seq, cfg.vocab_size))
    run = start_variant(step, state, frozen, data, jax.random.key(0))
    timed = interleave({method: run}, data, jax.random.key(0), f.steps)[method]
    state = run["state"]
    return {"step_s": timed["step_s"], "compile_s": timed["compile_s"],
            "losses": timed["losses"],
            "placed_params_bytes": bytes_per_device((state.trainable, frozen)),
            "placed_optimizer_state_bytes": bytes_per_device(state.opt_state),
            "peak_host_bytes": _peak_memory_bytes(jax.devices()[0])}


def _worker(f, spec):
    kind, method, mesh, shape = spec.split(";")
    if kind == "plan":
        return plan(f, method, mesh)
    batch, seq = map(int, shape.split("x"))
    return steps(f, method, mesh, batch, seq)


def _run(f, spec) -> dict:
    env = dict(os.environ)
    if f.devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_"
                            f"count={f.devices}").strip()
        env.setdefault("JAX_PLATFORMS", "cpu")
    args = [a for a in sys.argv[1:] if not a.startswith("--_shard_worker")]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_shard", *args,
                           f"--_shard_worker={spec}"], capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        # The last line that is not one of XLA's log lines; a SIGKILL is most often the
        # kernel's out-of-memory killer.
        said = [l for l in proc.stderr.strip().splitlines() if not re.match(r"[IWE]\d{4} ", l)]
        why = ("killed by SIGKILL (out of memory?)" if proc.returncode == -9
               else (said[-1:] or ["no output"])[0])
        return {"failed": [f"exit {proc.returncode}: {why}"]}
    return json.loads(lines[-1][len("RESULT "):])


def main(_):
    f = flags.FLAGS
    if f._shard_worker:
        print("RESULT " + json.dumps(_worker(f, f._shard_worker)))
        return
    meshes = [m for m in f.meshes.split(";") if m.strip()]
    devices = f.devices or None
    print(machine.line())
    print(f"model {f.config_json or f.model}, dtype {f.dtype}, "
          f"{devices or 'all'} devices{' (host devices of this CPU)' if f.devices else ''}")
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    print("| method | mesh | shape | params MiB/device | optimizer MiB/device | "
          "step s | compile s | peak host MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for shape in f.shapes:
        for method in f.methods:
            for mesh in meshes:
                p = _run(f, f"plan;{method};{mesh};{shape}")
                if "failed" in p:
                    print(f"| {method} | {mesh} | {shape} | failed: {p['failed'][0]} |")
                    continue
                n = f.devices or 1
                total = n * (p["params_bytes"] + p["trainable_bytes"]
                             + p["optimizer_state_bytes"])
                s = {}
                if f.plan_only:
                    note = "not run (--plan_only)"
                elif total > f.host_fraction * _available_bytes():
                    note = (f"not run: {n} devices x (parameters, gradients, optimizer state) "
                            f"is {total / 2**30:.1f} GiB, over {f.host_fraction:.0%} of this "
                            "host's available memory")
                else:
                    s = _run(f, f"steps;{method};{mesh};{shape}")
                    note = f"failed: {s['failed'][0]}" if "failed" in s else ""
                timing = (f"{s['step_s']:.2f} | {s['compile_s']:.1f} | "
                          f"{mib(s['peak_host_bytes'])}") if "step_s" in s else f"{note} | | "
                print(f"| {method} | {p['mesh']} | {shape} | {mib(p['params_bytes'])} | "
                      f"{mib(p['optimizer_state_bytes'])} | {timing} |", flush=True)
                rows.append({**p, **s, "shape": shape, "note": note})
    if f.out:
        with open(f.out, "w") as fh:
            json.dump({"machine": machine.describe(), "config": f.config_json or f.model,
                       "devices": devices, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    app.run(main)
