"""Throughput of several adapters over one base: mixed batches against one run per adapter.

  python -m benchmarks.bench_mixed --adapters=4 --rows=512 --method=lora

Makes `--adapters` adapters of `--method` on MiniLM (random adapter weights, a 2-label head
each), saved as adapter folders, and scores `--rows` real SST-2 dev sentences, row i with
adapter i mod N, two ways: `jaxpeft.mixed.AdapterSet` (every batch mixes the adapters, one
compiled forward) and N separate passes (each adapter loaded on its own and scoring its own
rows, as N `predict --run` calls would, without their start-up). Both use length-bucketed
batches of `--batch_size`; each pass is timed after a warm-up pass that compiles it. Prints
rows per second for both and checks that they agree.
"""

import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from flax import traverse_util

from benchmarks import machine

flags.DEFINE_integer("adapters", 4, "number of adapters")
flags.DEFINE_integer("rows", 512, "SST-2 dev sentences to score")
flags.DEFINE_string("method", "lora", "the adapters' method")
flags.DEFINE_integer("batch_size", 64, "rows per forward pass")
flags.DEFINE_integer("max_seq_length", 128, "the adapters' sequence length")
flags.DEFINE_string("data_dir", "../shared/glue_data", "GLUE folder (SST-2/dev.tsv)")


def _make_adapters(f, root: Path) -> dict:
    import jaxpeft
    from jaxpeft.peft import make_peft
    from jaxpeft.peft.adapters import save_adapter

    pre = jaxpeft.load_pretrained("minilm", num_labels=2, tokenizer=False)
    folders = {}
    for a in range(f.adapters):
        peft = make_peft(f.method)
        _, params = peft.init(pre.model, pre.params, jax.random.key(a))
        flat = traverse_util.flatten_dict(params)
        mask = traverse_util.flatten_dict(peft.mask(params))
        for i, path in enumerate(sorted(flat)):
            if mask[path]:
                flat[path] = flat[path] + 0.05 * jax.random.normal(
                    jax.random.key(1000 * a + i), flat[path].shape)
        folders[f"a{a}"] = save_adapter(
            root / f"a{a}", peft, traverse_util.unflatten_dict(flat), base_model="minilm",
            config=pre.config, run={"task": "sst2", "max_seq_length": f.max_seq_length})
    return folders


def _timed(fn):
    fn()  # compiles every bucket shape
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(_):
    f = flags.FLAGS
    from jaxpeft.data.batching import bucket_lengths, make_batch, tokenize
    from jaxpeft.data.glue import Split
    from jaxpeft.mixed import AdapterSet
    from jaxpeft.models import load_pretrained
    from jaxpeft.peft import load_adapter
    from jaxpeft.train import forward

    print(machine.line())
    lines = (Path(f.data_dir) / "SST-2" / "dev.tsv").read_text().splitlines()[1:f.rows + 1]
    sentences = [line.split("\t")[0] for line in lines]
    with tempfile.TemporaryDirectory() as tmp:
        folders = _make_adapters(f, Path(tmp))
        names = list(folders)
        mine = {n: [s for i, s in enumerate(sentences) if i % len(names) == a]
                for a, n in enumerate(names)}
        splits = {n: Split("sst2", "predict", mine[n], None, np.full(len(mine[n]), -1),
                           np.arange(len(mine[n])), "sst2") for n in names}
        aset = AdapterSet.load(folders)
        enc, which = aset.encode(splits)
        mixed_s, mixed = _timed(lambda: aset.logits(enc, which, f.batch_size))

        pre = load_pretrained("minilm", num_labels=2)
        buckets = bucket_lengths(f.max_seq_length)
        pad = pre.tokenizer.pad_token_id
        runs = []
        for n in names:
            model, params, _ = load_adapter(folders[n], pre)
            e = tokenize(splits[n], pre.tokenizer, f.max_seq_length)
            step = jax.jit(lambda p, b, model=model: forward(model, p, b, deterministic=True))
            runs.append((params, e, step))

        def separate():
            out = []
            for params, e, step in runs:
                rows = np.argsort(-e.lengths, kind="stable")
                got = np.zeros((len(e), 2), np.float32)
                for s in range(0, len(rows), f.batch_size):
                    chunk = rows[s:s + f.batch_size]
                    b = make_batch(e, chunk, f.batch_size, buckets, pad)
                    got[chunk] = np.asarray(step(params, {k: b[k] for k in (
                        "input_ids", "attention_mask", "token_type_ids")}))[:len(chunk)]
                out.append(got)
            return out

        separate_s, alone = _timed(separate)
    ours = np.concatenate([np.stack([mixed[i] for i in range(len(enc)) if which[i] == a])
                           for a in range(len(names))])
    diff = float(np.abs(ours - np.concatenate(alone)).max())
    n = len(sentences)
    print(f"{f.adapters} {f.method} adapters, {n} rows (row i -> adapter i mod "
          f"{f.adapters}), batch {f.batch_size}, length <= {f.max_seq_length}")
    print(f"  mixed batches (one forward) : {mixed_s:7.2f} s  {n / mixed_s:7.1f} rows/s")
    print(f"  one pass per adapter        : {separate_s:7.2f} s  {n / separate_s:7.1f} rows/s")
    print(f"  mixed / separate throughput : {separate_s / mixed_s:.2f}x; largest logit "
          f"difference {diff:.1e}")


if __name__ == "__main__":
    app.run(main)
