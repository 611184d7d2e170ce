"""Tokenization speed and padding efficiency on real SST-2 train.

  python -m benchmarks.bench_data --data_dir=../shared/glue_data --model=minilm

Prints the time to tokenize every sentence, and for one epoch of shuffled batches the share
of real (non-pad) tokens when padding to length buckets versus to `max_seq_length`, with the
number of distinct batch shapes.
"""

import time

import numpy as np

from absl import app, flags

from benchmarks import machine
from jaxpeft.data import load_split
from jaxpeft.data.batching import Packing, bucket_lengths, padding_stats, tokenize
from jaxpeft.models import load_tokenizer

flags.DEFINE_string("data_dir", "../shared/glue_data", "GLUE folder")
flags.DEFINE_string("model", "minilm", "tokenizer source")
flags.DEFINE_string("task", "sst2", "GLUE task")
flags.DEFINE_integer("max_seq_length", 128, "truncation length")
flags.DEFINE_integer("batch_size", 32, "examples per batch")


def main(_):
    f = flags.FLAGS
    print(machine.line())
    tok = load_tokenizer(f.model)
    split = load_split(f.task, "train", f.data_dir)
    t0 = time.perf_counter()
    enc = tokenize(split, tok, f.max_seq_length)
    dt = time.perf_counter() - t0
    lengths = enc.lengths
    print(f"{f.task} train: {len(enc):,} examples tokenized in {dt:.2f} s "
          f"({len(enc) / dt:,.0f}/s); tokens per example mean {lengths.mean():.1f}, "
          f"median {int(sorted(lengths)[len(lengths) // 2])}, max {lengths.max()}")
    cases = [("buckets: powers of two", bucket_lengths(f.max_seq_length), None),
             ("buckets: multiples of 16", tuple(range(16, f.max_seq_length + 1, 16)), None),
             (f"packed into rows of {f.max_seq_length}", bucket_lengths(f.max_seq_length),
              Packing(f.max_seq_length))]
    for name, buckets, packing in cases:
        s = padding_stats(enc, f.batch_size, buckets, packing=packing)
        print(f"batch {f.batch_size}, {name}: real tokens {100 * s['real_fraction']:.1f} % "
              f"(vs {100 * s['real_fraction_max_length']:.1f} % padded to "
              f"{f.max_seq_length}); {s['distinct_shapes']} distinct shapes {s['shapes']}")
    # What a PyTorch loop with per-batch dynamic padding pays (random batches).
    order = np.random.default_rng(0).permutation(len(enc))
    n = len(enc) // f.batch_size * f.batch_size
    per_batch = lengths[order[:n]].reshape(-1, f.batch_size)
    print(f"batch {f.batch_size}, dynamic padding to each batch's longest: real tokens "
          f"{100 * per_batch.sum() / (per_batch.max(1).sum() * f.batch_size):.1f} %")


if __name__ == "__main__":
    app.run(main)
