r"""What JAX's persistent compilation cache saves on the second run of a sweep.

  python -m benchmarks.bench_compile_cache --model=minilm --data_dir=../shared/glue_data

Runs the same short run_glue configuration three times, each in a fresh process: without
the cache, then twice with an empty cache folder (the first fills it, the second reuses it).
Prints each run's wall time (process start to exit) and its `train.wall_s` (the training loop,
compilation included), so the compile time saved is the difference between runs 2 and 3.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

flags.DEFINE_string("model", "minilm", "model name or folder")
flags.DEFINE_string("data_dir", "../shared/glue_data", "GLUE folder")
flags.DEFINE_string("task", "sst2", "task")
flags.DEFINE_integer("max_steps", 20, "steps per run")


def _run(args: list, out: Path) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "experiments.run_glue", *args,
                    f"--output_dir={out}"], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    results = json.loads((out / "results.json").read_text())
    return {"process_s": wall, "train_wall_s": results["train"]["wall_s"],
            "compilations": results["train"]["compilations"]}


def main(_):
    f = flags.FLAGS
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = [f"--task={f.task}", f"--model={f.model}", f"--data_dir={f.data_dir}",
                f"--max_steps={f.max_steps}", f"--eval_every={f.max_steps}", "--progress=false",
                "--tensorboard=false"]
        rows = [("no cache", _run(base + ["--compilation_cache=false"], tmp / "a"))]
        cache = [f"--cache_dir={tmp / 'cache'}"]
        rows.append(("cache, empty", _run(base + cache, tmp / "b")))
        rows.append(("cache, filled", _run(base + cache, tmp / "c")))
    print(f"{'run':>14} {'process s':>10} {'train loop s':>13} {'compilations':>13}")
    for name, r in rows:
        print(f"{name:>14} {r['process_s']:10.1f} {r['train_wall_s']:13.1f} "
              f"{r['compilations']:13d}")
    saved = rows[1][1]["process_s"] - rows[2][1]["process_s"]
    print(f"second run with the cache: {saved:.1f} s less wall time")


if __name__ == "__main__":
    app.run(main)
