"""Tokenization and batching: fast batched tokenization, length buckets, packing, exact
evaluation.

Sequences are padded to the smallest of a few bucket lengths (powers of two from 16 up to
`max_seq_length`) that fits the batch's longest member, so most GLUE batches are short and
the number of distinct shapes — and so of XLA compilations — is `len(buckets)` at most.
Batches always have `batch_size` rows; rows beyond the data are padding with weight 0, so
evaluation scores every example exactly once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from jaxpeft.data.glue import Split
from jaxpeft.errors import JaxpeftError
from jaxpeft.fileio import atomic_write_bytes

CACHE_VERSION = "1"
_CHUNK = 8192  # examples per tokenizer call: bounds memory, keeps Rust's batch parallelism


@dataclasses.dataclass
class Encoded:
    """A tokenized split: ragged token sequences stored flat, with `offsets[i]:offsets[i+1]`
    delimiting example `i`."""

    task: str
    split: str
    ids: np.ndarray  # int32, all examples concatenated
    type_ids: np.ndarray  # int8 token types, same layout
    offsets: np.ndarray  # int64 [n + 1]
    labels: np.ndarray
    idx: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example (special tokens included)."""
        return np.diff(self.offsets)


def _tokenizer_fingerprint(tokenizer) -> bytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation and padding are per-call settings the last call left behind, not part
        # of what the tokenizer is.
        state.pop("truncation", None)
        state.pop("padding", None)
        return json.dumps(state, sort_keys=True).encode()
    return f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{len(tokenizer)}".encode()


def _cache_key(split: Split, tokenizer, max_seq_length: int) -> str:
    h = hashlib.sha256()
    for part in (CACHE_VERSION, split.task, split.name, str(max_seq_length)):
        h.update(part.encode() + b"\0")
    h.update(_tokenizer_fingerprint(tokenizer))
    for texts in (split.text_a, split.text_b or []):
        h.update("\x1e".join(texts).encode() + b"\0")
    h.update(split.labels.tobytes() + split.idx.tobytes())
    return h.hexdigest()[:20]


def tokenize(split: Split, tokenizer, max_seq_length: int,
             cache_dir: Union[str, os.PathLike, None] = None) -> Encoded:
    """Tokenizes a split (pairs as pairs), truncating to `max_seq_length`.

    With `cache_dir`, the result is stored under a key made of the texts, the tokenizer and
    the length, so a second run loads it instead of tokenizing again.
    """
    if max_seq_length < 8:
        raise JaxpeftError(f"max_seq_length must be >= 8, got {max_seq_length}")
    cache_file = None
    if cache_dir:
        key = _cache_key(split, tokenizer, max_seq_length)
        cache_file = Path(cache_dir) / f"{split.task}-{split.name}-{key}.npz"
        if cache_file.is_file():
            with np.load(cache_file) as z:
                return Encoded(split.task, split.name, z["ids"], z["type_ids"], z["offsets"],
                               split.labels, split.idx)
    ids, types, lengths = [], [], []
    for start in range(0, len(split), _CHUNK):
        a = split.text_a[start:start + _CHUNK]
        b = None if split.text_b is None else split.text_b[start:start + _CHUNK]
        enc = tokenizer(a, b, truncation=True, max_length=max_seq_length, padding=False,
                        return_attention_mask=False, return_token_type_ids=True)
        for seq, tt in zip(enc["input_ids"], enc["token_type_ids"]):
            ids.append(seq)
            types.append(tt)
            lengths.append(len(seq))
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat_ids = np.fromiter((t for seq in ids for t in seq), np.int32, count=int(offsets[-1]))
    flat_types = np.fromiter((t for seq in types for t in seq), np.int8, count=int(offsets[-1]))
    encoded = Encoded(split.task, split.name, flat_ids, flat_types, offsets, split.labels,
                      split.idx)
    if cache_file is not None:
        buf = io.BytesIO()
        np.savez(buf, ids=flat_ids, type_ids=flat_types, offsets=offsets)
        atomic_write_bytes(cache_file, buf.getvalue())
    return encoded


def add_virtual_slots(enc: Encoded, n: int) -> Encoded:
    """`enc` with `n` virtual-token slots before every example (ids `-1, ..., -n`, token
    type 0), for methods that prepend learned vectors (soft prompts).

    Slots are ordinary tokens to bucketing and packing (they attend and are attended to,
    take positions 0..n-1 and restart with each packed example), so every batch layout
    handles them; the model's `EmbeddingHook` fills them in.
    """
    if n <= 0:
        return enc
    count = len(enc)
    offsets = enc.offsets + n * np.arange(count + 1)
    ids = np.empty(int(offsets[-1]), np.int32)
    types = np.zeros(int(offsets[-1]), np.int8)
    # Example i's tokens move past the n slots of examples 0..i.
    example = np.repeat(np.arange(count), enc.lengths)
    real = np.arange(len(enc.ids)) + n * (example + 1)
    ids[real], types[real] = enc.ids, enc.type_ids
    slots = (offsets[:-1, None] + np.arange(n)).reshape(-1)
    ids[slots] = np.tile(-1 - np.arange(n, dtype=np.int32), count)
    return dataclasses.replace(enc, ids=ids, type_ids=types, offsets=offsets)


def bucket_lengths(max_seq_length: int, min_length: int = 16) -> tuple:
    """Powers of two from `min_length` below `max_seq_length`, then `max_seq_length`."""
    buckets, b = [], min_length
    while b < max_seq_length:
        buckets.append(b)
        b *= 2
    return tuple(buckets) + (max_seq_length,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def make_batch(enc: Encoded, rows: np.ndarray, batch_size: int, buckets: Sequence[int],
               pad_id: int) -> dict:
    """A padded batch of the examples `rows` (at most `batch_size`; the rest is padding).

    Keys: input_ids, attention_mask, token_type_ids (int32 `[batch_size, bucket]`), labels,
    weights (1 real, 0 padding) and index (row in the split, -1 for padding).
    """
    lengths = enc.lengths[rows]
    length = bucket_for(int(lengths.max()) if len(rows) else 1, buckets)
    ids = np.full((batch_size, length), pad_id, np.int32)
    types = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for r, (i, n) in enumerate(zip(rows, lengths)):
        s = enc.offsets[i]
        ids[r, :n] = enc.ids[s:s + n]
        types[r, :n] = enc.type_ids[s:s + n]
        mask[r, :n] = 1
    # Padding rows attend to one token, so no softmax runs over an empty set.
    mask[len(rows):, 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            **_example_columns(enc, rows, batch_size)}


def _example_columns(enc: Encoded, rows: np.ndarray, batch_size: int) -> dict:
    """Per-example `labels`, `weights` (1 real, 0 padding) and `index` (-1 for padding)."""
    labels = np.zeros(batch_size, enc.labels.dtype)
    labels[:len(rows)] = enc.labels[rows]
    if labels.dtype.kind == "f":
        labels = np.nan_to_num(labels)  # unlabeled test rows: a finite placeholder
    else:
        labels = np.maximum(labels, 0)
    weights = np.zeros(batch_size, np.float32)
    weights[:len(rows)] = 1.0
    index = np.full(batch_size, -1, np.int64)
    index[:len(rows)] = rows
    return {"labels": labels, "weights": weights, "index": index}


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch: same (seed, epoch) -> same order."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def num_train_batches(n: int, batch_size: int) -> int:
    """Batches per epoch (the last one may be partly padding)."""
    return -(-n // batch_size)


@dataclasses.dataclass(frozen=True)
class Packing:
    """Packing settings: rows of `row_length` tokens, positions restarting at
    `position_offset`, row count a multiple of `row_multiple`."""

    row_length: int
    position_offset: int = 0
    row_multiple: int = 2


def _batch(enc, rows, batch_size, buckets, pad_id, packing: Optional[Packing]):
    if packing is None:
        return make_batch(enc, rows, batch_size, buckets, pad_id)
    return make_packed_batch(enc, rows, batch_size, packing.row_length, pad_id,
                             packing.position_offset, packing.row_multiple)


def train_batches(enc: Encoded, batch_size: int, buckets: Sequence[int], pad_id: int,
                  seed: int, epoch: int, start: int = 0,
                  packing: Optional[Packing] = None) -> Iterator[dict]:
    """One epoch of shuffled batches, from batch number `start` on (for resuming).

    Each batch holds `batch_size` examples, padded to a bucket length or, with `packing`,
    packed into rows.
    """
    order = epoch_order(len(enc), seed, epoch)
    for b in range(start, num_train_batches(len(enc), batch_size)):
        yield _batch(enc, order[b * batch_size:(b + 1) * batch_size], batch_size, buckets,
                     pad_id, packing)


def eval_batches(enc: Encoded, batch_size: int, buckets: Sequence[int],
                 pad_id: int) -> Iterator[dict]:
    """Every example exactly once, grouped by length (less padding); order is restored by
    each batch's `index`."""
    order = np.argsort(enc.lengths, kind="stable")
    for start in range(0, len(enc), batch_size):
        yield make_batch(enc, order[start:start + batch_size], batch_size, buckets, pad_id)


def padding_stats(enc: Encoded, batch_size: int, buckets: Sequence[int], seed: int = 0,
                  packing: Optional[Packing] = None) -> dict:
    """Real-token fraction of one epoch of train batches (bucketed, or packed if `packing`)
    against padding to the maximum, and the distinct batch shapes."""
    real = padded = 0
    shapes = set()
    for batch in train_batches(enc, batch_size, buckets, 0, seed, 0, packing=packing):
        shapes.add(batch["input_ids"].shape)
        real += int(enc.lengths[batch["index"][batch["index"] >= 0]].sum())
        padded += batch["input_ids"].size
    full = num_train_batches(len(enc), batch_size) * batch_size * buckets[-1]
    return {"real_fraction": real / padded, "real_fraction_max_length": real / full,
            "distinct_shapes": len(shapes), "shapes": sorted(shapes)}


# ---- sequence packing -----------------------------------------------------------------------

def pack_rows(lengths: np.ndarray, row_length: int) -> list:
    """First-fit-decreasing packing: lists of example positions (into `lengths`) per row."""
    rows, space = [], []
    for i in sorted(range(len(lengths)), key=lambda j: -int(lengths[j])):
        n = int(lengths[i])
        for r, free in enumerate(space):
            if n <= free:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(row_length - n)
    return rows


def make_packed_batch(enc: Encoded, rows: np.ndarray, batch_size: int, row_length: int,
                      pad_id: int, position_offset: int = 0, row_multiple: int = 2) -> dict:
    """Packs the examples `rows` (at most `batch_size`) into rows of `row_length` tokens.

    Each example keeps its own positions (restarting at `position_offset`: 0 for BERT,
    `pad_token_id + 1` for RoBERTa), token types and a segment id (1, 2, ... within its
    row; 0 is padding), from which the model builds a block-diagonal attention mask. The
    head reads example `e` at `(example_row[e], example_pos[e])`, its first token. The row
    count is rounded up to a multiple of `row_multiple`, so few distinct shapes occur.
    Per-example keys (labels, weights, index) keep `batch_size` entries, as unpacked batches.
    """
    packing = pack_rows(enc.lengths[rows], row_length)
    n_rows = max(row_multiple, -(-len(packing) // row_multiple) * row_multiple)
    return _packed_arrays(enc, rows, packing, n_rows, batch_size, row_length, pad_id,
                          position_offset)


def _packed_arrays(enc: Encoded, rows: np.ndarray, packing: list, n_rows: int,
                   batch_size: int, row_length: int, pad_id: int, position_offset: int) -> dict:
    """The packed batch of `rows` laid out as `packing` (positions into `rows`, per row)."""
    lengths = enc.lengths[rows]
    ids = np.full((n_rows, row_length), pad_id, np.int32)
    types = np.zeros((n_rows, row_length), np.int32)
    positions = np.full((n_rows, row_length), position_offset, np.int32)
    segments = np.zeros((n_rows, row_length), np.int32)
    example_row = np.zeros(batch_size, np.int32)
    example_pos = np.zeros(batch_size, np.int32)
    for r, members in enumerate(packing):
        cursor = 0
        for seg, e in enumerate(members, start=1):
            i, n = rows[e], int(lengths[e])
            s = enc.offsets[i]
            ids[r, cursor:cursor + n] = enc.ids[s:s + n]
            types[r, cursor:cursor + n] = enc.type_ids[s:s + n]
            positions[r, cursor:cursor + n] = np.arange(n) + position_offset
            segments[r, cursor:cursor + n] = seg
            example_row[e], example_pos[e] = r, cursor
            cursor += n
    return {"input_ids": ids, "token_type_ids": types, "position_ids": positions,
            "segment_ids": segments, "example_row": example_row, "example_pos": example_pos,
            **_example_columns(enc, rows, batch_size)}


@dataclasses.dataclass(frozen=True)
class EvalPacking:
    """The one packed shape of a split's evaluation batches: `rows` rows of
    `packing.row_length` tokens holding at most `max_examples` examples."""

    packing: Packing
    rows: int
    max_examples: int

    @classmethod
    def for_split(cls, enc: Encoded, packing: Packing, batch_size: int) -> "EvalPacking":
        """Rows enough for `batch_size` examples of the split's mean length (so a batch
        costs about what `batch_size` unpacked examples would without their padding), and
        room for four times as many short ones."""
        tokens = batch_size * float(enc.lengths.mean()) if len(enc) else packing.row_length
        rows = -(-int(np.ceil(tokens / packing.row_length)) // packing.row_multiple)
        return cls(packing, max(1, rows) * packing.row_multiple, 4 * batch_size)


def packed_eval_batches(enc: Encoded, shape: EvalPacking, pad_id: int) -> Iterator[dict]:
    """Every example exactly once, packed into batches of one shape (one compilation).

    Examples go longest first into the first row with room (first-fit decreasing within
    each batch); a batch is closed when the next example fits no row or it holds
    `max_examples`. Order is restored by each batch's `index` (-1: an unused slot).
    """
    length = shape.packing.row_length
    if len(enc) and int(enc.lengths.max()) > length:
        raise ValueError(f"an example of {int(enc.lengths.max())} tokens exceeds rows of "
                         f"{length}")
    members, space, taken = [], [], []  # per row: positions into `taken`; free tokens

    def emit():
        return _packed_arrays(enc, np.asarray(taken, np.int64), members, shape.rows,
                              shape.max_examples, length, pad_id, shape.packing.position_offset)

    for i in np.argsort(-enc.lengths, kind="stable"):
        n = int(enc.lengths[i])
        row = next((r for r in range(len(space)) if space[r] >= n), None)
        if row is None and len(space) < shape.rows:
            row = len(space)
            members.append([])
            space.append(length)
        if row is None or len(taken) == shape.max_examples:
            yield emit()
            members, space, taken, row = [[]], [length], [], 0
        members[row].append(len(taken))
        space[row] -= n
        taken.append(i)
    if taken:
        yield emit()


def packed_split_batches(enc: Encoded, packing: Packing, batch_size: int, pad_id: int,
                         virtual_tokens: int = 0) -> Iterator[dict]:
    """A whole split's evaluation or prediction batches, packed: soft-prompt slots reserved
    before each example, one shape for the split (`EvalPacking.for_split`)."""
    enc = add_virtual_slots(enc, virtual_tokens)
    return packed_eval_batches(enc, EvalPacking.for_split(enc, packing, batch_size), pad_id)
