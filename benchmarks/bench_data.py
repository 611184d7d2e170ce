"""Tokenization speed and padding efficiency on real SST-2 train.

  python -m benchmarks.bench_data --data_dir=../shared/glue_data --model=minilm

Prints the time to tokenize every sentence, and for one epoch of shuffled batches the share
of real (non-pad) tokens when padding to length buckets versus to `max_seq_length`, with the
number of distinct batch shapes.
"""

import time

from absl import app, flags

from jaxpeft.data import load_split
from jaxpeft.data.batching import bucket_lengths, padding_stats, tokenize
from jaxpeft.models import load_tokenizer

flags.DEFINE_string("data_dir", "../shared/glue_data", "GLUE folder")
flags.DEFINE_string("model", "minilm", "tokenizer source")
flags.DEFINE_string("task", "sst2", "GLUE task")
flags.DEFINE_integer("max_seq_length", 128, "truncation length")
flags.DEFINE_integer("batch_size", 32, "examples per batch")


def main(_):
    f = flags.FLAGS
    tok = load_tokenizer(f.model)
    split = load_split(f.task, "train", f.data_dir)
    t0 = time.perf_counter()
    enc = tokenize(split, tok, f.max_seq_length)
    dt = time.perf_counter() - t0
    lengths = enc.lengths
    print(f"{f.task} train: {len(enc):,} examples tokenized in {dt:.2f} s "
          f"({len(enc) / dt:,.0f}/s); tokens per example mean {lengths.mean():.1f}, "
          f"median {int(sorted(lengths)[len(lengths) // 2])}, max {lengths.max()}")
    for name, buckets in [("powers of two", bucket_lengths(f.max_seq_length)),
                          ("multiples of 16", tuple(range(16, f.max_seq_length + 1, 16)))]:
        s = padding_stats(enc, f.batch_size, buckets)
        print(f"batch {f.batch_size}, buckets {name} {buckets}: real tokens "
              f"{100 * s['real_fraction_bucketed']:.1f} % bucketed vs "
              f"{100 * s['real_fraction_max_length']:.1f} % padded to {f.max_seq_length}; "
              f"{s['distinct_shapes']} distinct shapes {s['bucket_lengths']}")


if __name__ == "__main__":
    app.run(main)
