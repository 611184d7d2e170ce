"""Runs for tests/test_sharding.py, in a process of its own: the number of host devices is
fixed when JAX starts, so the test launches this module with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`.

    python -m tests.sharded_runs steps MODEL GLUE_DIR OUT MESH...   # full and LoRA per mesh
    python -m tests.sharded_runs resume MODEL GLUE_DIR OUT KILLED_MESH RESUMED_MESH

Each run writes its folder `OUT/<method>-<mesh>`; the test compares their metrics.
"""

import sys
from pathlib import Path

from jaxpeft.config import RunConfig
from jaxpeft.run import train_and_evaluate
from tests.helpers import run_config

STEPS = 10


class _Kill(Exception):
    pass


def config(model, glue_dir, out, method, mesh, **kw):
    """`STEPS` logged steps of real SST-2 on one mesh (one evaluation, at the end)."""
    name = f"{method}-{mesh.replace(':', '').replace(',', '_') or 'default'}"
    return run_config(Path(model), Path(glue_dir), Path(out) / name, method=method, mesh=mesh,
                      max_train_samples=STEPS * 16, max_steps=STEPS, log_every=1,
                      eval_every=0, max_eval_samples=64, checkpoint_every=5, **kw)


def main(mode, model, glue_dir, out, *meshes):
    if mode == "steps":
        for method in ("full", "lora"):
            for mesh in meshes:
                train_and_evaluate(config(model, glue_dir, out, method, mesh))
    elif mode == "resume":
        killed, resumed = meshes
        cfg = config(model, glue_dir, out, "full", killed)

        def kill_at_7(step):
            if step == 7:
                raise _Kill()

        try:
            train_and_evaluate(cfg, on_step=kill_at_7)
        except _Kill:
            pass
        train_and_evaluate(RunConfig(**{**cfg.__dict__, "resume": True, "mesh": resumed}))


if __name__ == "__main__":
    main(*sys.argv[1:])
