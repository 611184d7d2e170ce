"""Real-data training speed: jaxpeft's run_glue against the PyTorch peer, back to back.

  python -m benchmarks.bench_real --data_dir=../shared/glue_data --model=minilm \
      --tasks=sst2,stsb,mrpc --method=lora --out=/tmp/bench-real.json

For each task, in this order and one at a time: `experiments.run_glue` (packed batches, its
defaults, 300 steps x 32, compilation included: the persistent compilation cache is off and
the tokenized-data cache is a fresh folder) and `benchmarks.torch_run_glue` (transformers + peft,
dynamic padding, the same optimizer, learning rate and steps). Prints each side's training
wall time (the training loop with compilation, without evaluation), examples/s and the dev
metric after the last step, and the speed ratio.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from benchmarks import machine
from jaxpeft import cli as _cli  # noqa: F401 - defines --host_malloc, passed to run_glue
from jaxpeft.data import get_task
from jaxpeft.peft import METHODS

flags.DEFINE_string("data_dir", "../shared/glue_data", "GLUE folder")
flags.DEFINE_string("model", "minilm", "model name or folder")
flags.DEFINE_list("tasks", ["sst2", "stsb", "mrpc"], "GLUE tasks")
flags.DEFINE_string("method", "lora", "method (one both sides have)")
flags.DEFINE_float("learning_rate", 5e-4, "peak learning rate, both sides")
flags.DEFINE_integer("max_steps", 300, "optimizer steps")
flags.DEFINE_integer("seed", 0, "seed, both sides")
flags.DEFINE_string("out", "", "write the rows as JSON here")


def _run(args):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:1])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main(_):
    f = flags.FLAGS
    if f.method not in METHODS:
        raise SystemExit(f"unknown method {f.method!r}")
    print(machine.line())
    print(f"malloc: jaxpeft --host_malloc={f.host_malloc}, the peer glibc's defaults "
          f"(GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} for both)")
    rows = []
    print(f"{'task':>5} {'impl':>10} {'train s':>8} {'ex/s':>7} {'dev metric (final)':>24}")
    for name in f.tasks:
        task = get_task(name)
        key = f"eval_{task.main_metric}"
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            _run(["experiments.run_glue", f"--task={name}", f"--method={f.method}",
                  f"--model={f.model}", f"--data_dir={f.data_dir}",
                  f"--learning_rate={f.learning_rate}", f"--max_steps={f.max_steps}",
                  "--eval_every=0", f"--seed={f.seed}", f"--output_dir={out}",
                  f"--cache_dir={Path(tmp) / 'cache'}", "--nocompilation_cache",
                  "--progress=false", "--checkpoint_every=0",
                  f"--host_malloc={f.host_malloc}"])
            ours = json.loads((out / "results.json").read_text())
            malloc = json.loads((out / "config.json").read_text())["devices"]["malloc"]
            _run(["benchmarks.torch_run_glue", f"--task={name}", f"--method={f.method}",
                  f"--model={f.model}", f"--data_dir={f.data_dir}",
                  f"--learning_rate={f.learning_rate}", f"--max_steps={f.max_steps}",
                  f"--seed={f.seed}", f"--out={Path(tmp) / 'peer.json'}"])
            peer = json.loads((Path(tmp) / "peer.json").read_text())
        pair = {"task": name, "method": f.method, "metric": key,
                "malloc": malloc,
                "jaxpeft": {"train_s": ours["train"]["wall_s"],
                            "examples_per_s": ours["train"]["examples_per_s"],
                            "compilations": ours["train"]["compilations"],
                            "dev": ours["final"][key]},
                "peer": {"train_s": peer["train_wall_s"],
                         "examples_per_s": peer["examples_per_s"], "dev": peer[key],
                         "threads": peer["threads"], "attention": peer.get("attention")}}
        rows.append(pair)
        for impl in ("jaxpeft", "peer"):
            r = pair[impl]
            print(f"{name:>5} {impl:>10} {r['train_s']:8.1f} {r['examples_per_s']:7.1f} "
                  f"{task.main_metric:>14} {r['dev']:.4f}")
        print(f"{name:>5} jaxpeft / peer speed: "
              f"{pair['peer']['train_s'] / pair['jaxpeft']['train_s']:.2f}x")
    if f.out:
        Path(f.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    app.run(main)
