"""The GLUE task registry: text fields, labels, metrics, splits, files and submission names.

Label ids follow the Hugging Face `nyu-mll/glue` dataset, so the hub and a local GLUE folder
give the same ids. Each task's TSV layout is that of the original GLUE distribution (what
`download_glue_data.py` writes).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from jaxpeft.errors import JaxpeftError


@dataclasses.dataclass(frozen=True)
class TsvLayout:
    """Where the fields sit in one kind of GLUE TSV file.

    Columns are header names, or 0-based indices when the file has no header (CoLA). `index`
    is the example id column (`None`: the row number is the id).
    """

    texts: tuple
    label: Optional[object] = None
    index: Optional[object] = None
    header: bool = True
    num_columns: Optional[int] = None  # exact column count for header-less files


@dataclasses.dataclass(frozen=True)
class Task:
    """One GLUE task.

    `label_names` is `None` for regression (STS-B). `metrics` are computed on every eval;
    `main_metric` picks the best checkpoint. `eval_splits` / `test_splits` name the splits
    (MNLI has matched and mismatched); `files` maps split -> TSV file inside `glue_dir`;
    `submission` maps test split -> the file name the GLUE server expects.
    """

    name: str
    glue_dir: str
    hub_fields: tuple
    label_names: Optional[tuple]
    metrics: tuple
    main_metric: str
    eval_splits: tuple
    test_splits: tuple
    files: dict
    labeled: TsvLayout
    unlabeled: TsvLayout
    submission: dict
    skip_malformed: bool = False  # QQP's train file has a few broken rows, skipped and counted
    has_train: bool = True
    also_predicts: tuple = ()  # test-only tasks predicted with this task's model (MNLI: AX)

    @property
    def num_labels(self) -> int:
        """Head size: 1 for regression, else the number of classes."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        """True for STS-B."""
        return self.label_names is None

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks."""
        return len(self.hub_fields) == 2

    def prediction_files(self) -> list:
        """`(task, test split, submission file name)` for every file a model trained on this
        task predicts (its own test splits, then the tasks in `also_predicts`)."""
        tasks = [self] + [TASKS[name] for name in self.also_predicts]
        return [(t, split, name) for t in tasks for split, name in t.submission.items()]

    @property
    def splits(self) -> tuple:
        """Every split this task has."""
        return (("train",) if self.has_train else ()) + self.eval_splits + self.test_splits


_STD_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
_PAIR = TsvLayout(texts=("sentence1", "sentence2"), label="label", index="index")
_PAIR_TEST = TsvLayout(texts=("sentence1", "sentence2"), index="index")
_NLI2 = ("entailment", "not_entailment")
_BIN = ("0", "1")


def _task(name, glue_dir, hub_fields, label_names, metrics, labeled, unlabeled, submission,
          eval_splits=("validation",), test_splits=("test",), files=None, **kw):
    return Task(name=name, glue_dir=glue_dir, hub_fields=hub_fields, label_names=label_names,
                metrics=metrics, main_metric=metrics[0], eval_splits=eval_splits,
                test_splits=test_splits, files=files or _STD_FILES, labeled=labeled,
                unlabeled=unlabeled, submission=submission, **kw)


TASKS = {t.name: t for t in [
    _task("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews",),
          TsvLayout(texts=(3,), label=1, header=False, num_columns=4),
          TsvLayout(texts=("sentence",), index="index"), {"test": "CoLA.tsv"}),
    _task("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",),
          TsvLayout(texts=("sentence",), label="label"),
          TsvLayout(texts=("sentence",), index="index"), {"test": "SST-2.tsv"}),
    _task("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
          ("f1", "accuracy"),
          TsvLayout(texts=("#1 String", "#2 String"), label="Quality"),
          TsvLayout(texts=("#1 String", "#2 String"), index="index"), {"test": "MRPC.tsv"}),
    _task("stsb", "STS-B", ("sentence1", "sentence2"), None, ("pearson", "spearman"),
          TsvLayout(texts=("sentence1", "sentence2"), label="score", index="index"),
          _PAIR_TEST, {"test": "STS-B.tsv"}),
    _task("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"),
          ("f1", "accuracy"),
          TsvLayout(texts=("question1", "question2"), label="is_duplicate", index="id"),
          TsvLayout(texts=("question1", "question2"), index="id"), {"test": "QQP.tsv"},
          skip_malformed=True),
    _task("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
          ("accuracy",),
          TsvLayout(texts=("sentence1", "sentence2"), label="gold_label", index="index"),
          _PAIR_TEST, {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"},
          eval_splits=("validation_matched", "validation_mismatched"),
          test_splits=("test_matched", "test_mismatched"),
          files={"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                 "validation_mismatched": "dev_mismatched.tsv",
                 "test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv"},
          also_predicts=("ax",)),
    _task("qnli", "QNLI", ("question", "sentence"), _NLI2, ("accuracy",),
          TsvLayout(texts=("question", "sentence"), label="label", index="index"),
          TsvLayout(texts=("question", "sentence"), index="index"), {"test": "QNLI.tsv"}),
    _task("rte", "RTE", ("sentence1", "sentence2"), _NLI2, ("accuracy",), _PAIR, _PAIR_TEST,
          {"test": "RTE.tsv"}),
    _task("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"),
          ("accuracy",), _PAIR, _PAIR_TEST, {"test": "WNLI.tsv"}),
    # The diagnostic set: test-only, predicted with an MNLI model.
    _task("ax", "diagnostic", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
          ("accuracy",), _PAIR, _PAIR_TEST, {"test": "AX.tsv"}, eval_splits=(),
          files={"test": "diagnostic.tsv"}, has_train=False),
]}

# TSV label strings -> ids, where the file does not store the id itself.
TSV_LABELS = {"cola": _BIN, "sst2": _BIN, "mrpc": _BIN, "qqp": _BIN, "wnli": _BIN}


def get_task(name: str) -> Task:
    """The task called `name` (case-insensitive; `sst-2`, `sts-b` also accepted)."""
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise JaxpeftError(f"unknown task {name!r}; GLUE tasks: {', '.join(TASKS)}")
    return TASKS[key]
