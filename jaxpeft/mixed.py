"""Several adapters over one base model, scored together: rows that name different adapters
share a batch and one jitted forward pass.

`AdapterSet.load({name: folder})` puts each adapter (a run folder or an adapter folder, as
`predict` takes) on one base model. Adapters of the same method and options form a group.
Within a group, the leaves that differ between adapters (the method's, the head's; a
narrower head padded with zero columns to the widest) are stacked along a new leading axis,
and the rest, the frozen base, is held once. A batch is scored by gathering each row's
adapter slice (`stacked[adapter of the row]`) and mapping the model over the rows with
`jax.vmap`: the frozen products stay one matmul over every row, the adapter's own products
become per-row batched matmuls. So one compiled forward serves any mix of adapters, and
each row's logits equal its adapter's alone (tested within 1e-5 for LoRA, DoRA, IA3, VeRA
and prompt tuning). A regression adapter's output map (`--standardize_targets`) is applied
per row after the forward.

`predict_mixed_file` is `predict_file` for such a set: each input row names its adapter in
a column (`adapter` by default) and carries that adapter's task's text columns; the output
has `index`, `adapter`, `label` and a probability column for every class of every
classification task in the set (empty where the row's task has no such class).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxpeft.cli import run_command
from jaxpeft.data import get_task
from jaxpeft.data.batching import Encoded, bucket_lengths, make_batch, tokenize
from jaxpeft.errors import JaxpeftError
from jaxpeft.models import load_pretrained
from jaxpeft.peft import load_adapter
from jaxpeft.peft.adapters import find_adapter
from jaxpeft.predict import (check_output_file, predict_file, prediction, read_rows,
                             row_ids, rows_to_split, text_columns, write_table)
from jaxpeft.train import forward


@dataclasses.dataclass
class Group:
    """Adapters of one method and options: the model with the method's hooks and the widest
    head, the leaves all share (flat paths), each differing leaf stacked `[adapters, ...]`,
    and the members' indices in the set."""

    model: Any
    shared: dict
    stacked: dict
    members: list

    def __post_init__(self):
        self._forward = jax.jit(functools.partial(_mixed_forward, self.model))

    def logits(self, batch: dict, which: np.ndarray) -> jax.Array:
        """Logits `[rows, widest head]` of a padded batch whose row i uses member
        `which[i]` (an index into `members`)."""
        return self._forward(self.shared, self.stacked, jnp.asarray(which, jnp.int32),
                             batch["input_ids"], batch["attention_mask"],
                             batch["token_type_ids"])


def _mixed_forward(model, shared, stacked, which, ids, mask, types):
    """Each row's logits with its own adapter's leaves: a per-row gather of the stacked
    leaves, then the model mapped over the rows (the shared leaves broadcast)."""
    rows = jax.tree.map(lambda v: v[which], stacked)

    def one(leaves, ids, mask, types):
        params = traverse_util.unflatten_dict({**shared, **leaves})
        batch = {"input_ids": ids[None], "attention_mask": mask[None],
                 "token_type_ids": types[None]}
        return forward(model, params, batch, deterministic=True)[0]

    return jax.vmap(one)(rows, ids, mask, types)


def _pad_to(value: np.ndarray, shape: tuple, where: str) -> np.ndarray:
    """`value` padded with zeros at the end of its last axis to `shape` (a narrower head)."""
    if value.shape == shape:
        return value
    if value.shape[:-1] != shape[:-1] or value.shape[-1] > shape[-1]:
        raise JaxpeftError(f"{where}: shape {value.shape} cannot share a batch with "
                           f"{shape}")
    return np.pad(value, [(0, 0)] * (value.ndim - 1) + [(0, shape[-1] - value.shape[-1])])


def _group(loaded: list, members: list) -> Group:
    """The `Group` of `members` (indices into `loaded`: `(model, params, peft, task)`)."""
    widest = max(members, key=lambda i: loaded[i][3].num_labels)
    model = loaded[widest][0]
    # The regression map is applied per row after the forward (adapters differ in it).
    model = model.clone(runtime=dataclasses.replace(model.runtime, target_mean=0.0,
                                                    target_std=1.0))
    flats = [traverse_util.flatten_dict(loaded[i][1]) for i in members]
    reference = traverse_util.flatten_dict(loaded[widest][1])
    shared, stacked = {}, {}
    for path, ref in reference.items():
        values = [f[path] for f in flats]
        if all(v is ref for v in values) or all(
                v.shape == ref.shape and np.array_equal(np.asarray(v), np.asarray(ref))
                for v in values):
            shared[path] = ref
        else:
            where = "/".join(path)
            stacked[path] = jnp.asarray(np.stack(
                [_pad_to(np.asarray(v), ref.shape, where) for v in values]))
    return Group(model, shared, stacked, list(members))


class AdapterSet:
    """Named adapters over one base model (see the module docstring)."""

    def __init__(self, names: list, tasks: list, lengths: list, groups: list, tokenizer,
                 targets: list):
        self.names, self.tasks, self.lengths = names, tasks, lengths
        self.groups, self.tokenizer, self.targets = groups, tokenizer, targets
        self.group_of = {m: (g, k) for g, group in enumerate(groups)
                         for k, m in enumerate(group.members)}

    @classmethod
    def load(cls, adapters: Mapping[str, Any], model: Optional[str] = None) -> "AdapterSet":
        """Loads `{name: run or adapter folder}` over one base (`model`, default: the base
        the adapters were trained on, which must be the same for all)."""
        if not adapters:
            raise JaxpeftError("no adapters given")
        found = {name: find_adapter(folder) for name, folder in adapters.items()}
        bases = {settings["model"] for _, settings in found.values()}
        if model is None and len(bases) > 1:
            raise JaxpeftError(f"the adapters were trained on different base models "
                               f"({', '.join(sorted(bases))}); they cannot share one")
        base = model or bases.pop()
        tasks = [get_task(settings["task"]) for _, settings in found.values()]
        pres: dict = {}  # one base per head size; their shared weights are held once
        loaded, signatures = [], {}
        for (name, (folder, settings)), task in zip(found.items(), tasks):
            pre = pres.get(task.num_labels)
            if pre is None:
                pre = pres[task.num_labels] = load_pretrained(
                    base, num_labels=task.num_labels, warn_fresh=False)
            net, params, peft = load_adapter(folder, pre, check_base_name=model is None)
            loaded.append((net, params, peft, task))
            key = repr(peft.to_dict())
            signatures.setdefault(key, []).append(len(loaded) - 1)
        groups = [_group(loaded, members) for members in signatures.values()]
        targets = [(net.runtime.target_mean, net.runtime.target_std) if task.is_regression
                   else (0.0, 1.0) for net, _, _, task in loaded]
        lengths = [int(s.get("max_seq_length", 128)) for _, s in found.values()]
        tokenizer = next(iter(pres.values())).tokenizer
        return cls(list(adapters), tasks, lengths, groups, tokenizer, targets)

    def encode(self, texts: Mapping[str, Any]) -> tuple[Encoded, np.ndarray]:
        """`(encoded examples, adapter index of each)` of `{adapter name: Split}`, each
        tokenized at its adapter's length."""
        parts, which = [], []
        for name, split in texts.items():
            a = self.names.index(name)
            parts.append(tokenize(split, self.tokenizer, self.lengths[a]))
            which.append(np.full(len(parts[-1]), a))
        lengths = np.concatenate([p.lengths for p in parts])
        enc = Encoded("mixed", "predict", np.concatenate([p.ids for p in parts]),
                      np.concatenate([p.type_ids for p in parts]),
                      np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                      np.zeros(len(lengths), np.float32), np.arange(len(lengths)))
        return enc, np.concatenate(which)

    def logits(self, enc: Encoded, which: np.ndarray, batch_size: int = 64) -> list:
        """Each example's logits (its own task's width, regression map applied), for
        examples `enc` whose adapters are `which` (indices into `names`). Examples of one
        group share batches in any mix, longest first so the buckets stay full."""
        out: list = [None] * len(enc)
        pad = self.tokenizer.pad_token_id
        buckets = bucket_lengths(int(max(enc.lengths.max(), 8)))
        for g, group in enumerate(self.groups):
            rows = np.array([i for i in range(len(enc)) if self.group_of[which[i]][0] == g],
                            np.int64)
            rows = rows[np.argsort(-enc.lengths[rows], kind="stable")]
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                batch = make_batch(enc, chunk, batch_size, buckets, pad)
                member = np.zeros(batch_size, np.int32)
                member[:len(chunk)] = [self.group_of[which[i]][1] for i in chunk]
                values = np.asarray(group.logits(batch, member))
                for r, i in enumerate(chunk):
                    a = int(which[i])
                    mean, std = self.targets[a]
                    row = values[r, :self.tasks[a].num_labels]
                    out[i] = row * np.float32(std) + np.float32(mean) \
                        if self.tasks[a].is_regression else row
        return out


def predict_mixed_file(adapters: Mapping[str, Any], source: str, output: Optional[str] = None,
                       *, model: Optional[str] = None, column: str = "adapter",
                       batch_size: int = 64) -> list[list]:
    """Predicts every row of `source` with the adapter its `column` names; writes the TSV
    to `output` (stdout if None) and returns its rows (header first)."""
    if output:
        check_output_file(output)
    if batch_size <= 0:
        raise JaxpeftError(f"--batch_size must be > 0, got {batch_size}")
    rows = read_rows(source)
    for number, row in enumerate(rows, start=1):
        name = row.get(column)
        if name not in adapters:
            raise JaxpeftError(f"{source}: row {number}: {column!r} is {name!r}, not one of the "
                               f"adapters ({', '.join(adapters)})")
    ids = row_ids(rows, source)
    aset = AdapterSet.load(adapters, model)
    splits, order = {}, []
    for a, name in enumerate(aset.names):
        mine = [i for i, row in enumerate(rows) if row[column] == name]
        if not mine:
            continue
        subset = [rows[i] for i in mine]
        task = aset.tasks[a]
        columns = text_columns(task, subset, None, f"{source} (rows of {name})")
        splits[name] = rows_to_split(task, subset, columns, source)
        order.extend(mine)
    enc, which = aset.encode(splits)
    values = aset.logits(enc, which, batch_size)
    classes = list(dict.fromkeys(n for t in aset.tasks if not t.is_regression
                                 for n in t.label_names))
    table = [["index", "adapter", "label"] + [f"p_{n}" for n in classes]]
    by_row = dict(zip(order, range(len(order))))
    for i in range(len(rows)):
        a = int(which[by_row[i]])
        label, probs = prediction(aset.tasks[a], values[by_row[i]])
        table.append([ids[i], aset.names[a], label]
                     + [f"{probs[n]:.6f}" if n in probs else "" for n in classes])
    return write_table(table, output)


def parse_adapters(items: list) -> dict:
    """`{name: folder}` from `name=folder` items (the repeated `--adapter` flag)."""
    out = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise JaxpeftError(f"--adapter: {item!r} is not name=folder")
        if name in out:
            raise JaxpeftError(f"--adapter: the name {name!r} is given twice")
        out[name] = Path(folder)
    return out


def predict_cli(run: Optional[str], adapters: list, source: str, output: Optional[str],
                model: Optional[str], columns: Optional[tuple], column: str,
                batch_size: int) -> int:
    """experiments/predict.py: one adapter (`run`, `predict_file`) or several (`adapters`,
    the `name=folder` items of `--adapter`, `predict_mixed_file`); user errors are one
    `error:` line."""
    def work():
        if bool(run) == bool(adapters):
            raise JaxpeftError("give --run (one adapter) or --adapter name=folder (repeated, "
                               "several), not both and not neither")
        if run:
            return predict_file(run, source, output, model=model, columns=columns,
                                batch_size=batch_size)
        if columns:
            raise JaxpeftError("--text_columns applies to --run; with --adapter each "
                               "adapter's rows are read by its task's column names")
        return predict_mixed_file(parse_adapters(adapters), source, output, model=model,
                                  column=column, batch_size=batch_size)

    return run_command(work)
