"""Dev-set evaluation: length buckets (before) against packed rows (after), real GLUE dev sets.

  python -m benchmarks.bench_eval --data_dir=../shared/glue_data --model=minilm \
      --tasks=sst2,stsb,mrpc

For each task: the Evaluator over the whole dev split, bucketed (the layout evaluation used
before packing reached it; `--nopacking` runs still use it) and packed (the default now), at
run_glue's eval batch size. Times the first pass (compilations included) and the median of
`--repeats` later passes, the tokens actually computed (padding included) and the real-token
share, the number of distinct shapes, and checks that both layouts give the same metrics.
"""

import time

import jax
import numpy as np
from absl import app, flags

import jaxpeft
from jaxpeft.data import get_task, load_split
from jaxpeft.data.batching import EvalPacking, Packing, bucket_lengths, tokenize
from jaxpeft.distributed import Sharder
from jaxpeft.evaluation import Evaluator
from jaxpeft.metrics import compute_metrics
from jaxpeft.peft import make_peft
from jaxpeft.train import make_eval_step

flags.DEFINE_string("data_dir", "../shared/glue_data", "GLUE folder")
flags.DEFINE_string("model", "minilm", "model name or folder")
flags.DEFINE_list("tasks", ["sst2", "stsb", "mrpc"], "GLUE tasks (their dev splits)")
flags.DEFINE_integer("max_seq_length", 128, "truncation length")
flags.DEFINE_integer("eval_batch_size", 128, "examples per evaluation batch (run_glue's default)")
flags.DEFINE_integer("repeats", 3, "warm passes (median reported)")


def _time_pass(evaluator, params, enc):
    t0 = time.perf_counter()
    preds, loss = evaluator.score(params, enc)
    return time.perf_counter() - t0, preds, loss


def main(_):
    f = flags.FLAGS
    print(f"model {f.model}, device {jax.devices()[0].device_kind}, eval batch "
          f"{f.eval_batch_size}, max length {f.max_seq_length}")
    print(f"{'task':>5} {'layout':>9} {'examples':>8} {'shapes':>6} {'tokens':>8} "
          f"{'real %':>6} {'first s':>8} {'warm s':>7}  metrics")
    for name in f.tasks:
        task = get_task(name)
        pre = jaxpeft.load_pretrained(f.model, num_labels=task.num_labels)
        model, params = make_peft("lora").init(pre.model, pre.params, jax.random.key(0))
        enc = tokenize(load_split(task, task.eval_splits[0], f.data_dir), pre.tokenizer,
                       f.max_seq_length)
        packing = Packing(f.max_seq_length, pre.config.position_offset,
                          row_multiple=max(2, jax.device_count()))
        common = (task, f.eval_batch_size, bucket_lengths(f.max_seq_length),
                  pre.tokenizer.pad_token_id, Sharder())
        results = {}
        # A fresh jitted step per layout, so each first pass pays its own compilations.
        for layout, pack in (("bucketed", None), ("packed", packing)):
            ev = Evaluator(make_eval_step(model), *common, packing=pack)
            batches = list(ev.batches(enc)[0])
            shapes = {b["input_ids"].shape for b in batches}
            tokens = sum(b["input_ids"].size for b in batches)
            first, preds, loss = _time_pass(ev, params, enc)
            warm = float(np.median([_time_pass(ev, params, enc)[0] for _ in range(f.repeats)]))
            metrics = compute_metrics(task, preds, enc.labels)
            results[layout] = (preds, loss)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"{name:>5} {layout:>9} {len(enc):>8} {len(shapes):>6} {tokens:>8} "
                  f"{100 * enc.lengths.sum() / tokens:6.1f} {first:8.2f} {warm:7.2f}  {shown}")
        (p1, l1), (p2, l2) = results["bucketed"], results["packed"]
        same = (np.allclose(p1, p2, atol=1e-4) if task.is_regression
                else bool((p1 == p2).all()))
        print(f"{name:>5} same predictions: {same}; max |loss difference| "
              f"{float(np.abs(l1 - l2).max()):.2e}")
        if name == f.tasks[-1]:
            shape = EvalPacking.for_split(enc, packing, f.eval_batch_size)
            print(f"(packed shape for {name}: {shape.rows} rows x {packing.row_length}, up to "
                  f"{shape.max_examples} examples per batch)")


if __name__ == "__main__":
    app.run(main)
