"""Several adapters over one base in mixed batches (`jaxpeft.mixed`): each row's logits equal
its adapter's alone, for every stacked method, heads of different widths, a regression map;
the command line and its errors."""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

import jaxpeft
from jaxpeft.data import get_task
from jaxpeft.errors import JaxpeftError
from jaxpeft.mixed import AdapterSet, predict_mixed_file
from jaxpeft.peft import LoraConfig, load_adapter, make_peft
from jaxpeft.peft.adapters import save_adapter
from jaxpeft.peft.vera import VeraConfig
from jaxpeft.predict import predict_file

# (method, options): each trains its own leaves; VeRA's frozen projections are shared.
METHODS = {"lora": LoraConfig(rank=4, alpha=8), "dora": LoraConfig(rank=4, alpha=8),
           "ia3": None, "vera": VeraConfig(rank=16), "prompt": None}
# task, its head width, a regression map where it has one
TASKS = (("sst2", None), ("stsb", (2.5, 1.5)), ("mnli", None), ("sst2", None))


def _adapter(tiny_model, folder, method, task, target, seed):
    """A saved adapter of `method` for `task` with every trainable leaf moved off its start."""
    spec = get_task(task)
    pre = jaxpeft.load_pretrained(tiny_model, num_labels=spec.num_labels, tokenizer=False)
    peft = make_peft(method, METHODS[method])
    _, params = peft.init(pre.model, pre.params, jax.random.key(0))
    flat, mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(peft.mask(params))
    key = jax.random.key(seed)
    for i, path in enumerate(sorted(flat)):
        if mask[path]:
            flat[path] = flat[path] + 0.3 * jax.random.normal(jax.random.fold_in(key, i),
                                                              flat[path].shape)
    save_adapter(folder, peft, traverse_util.unflatten_dict(flat), base_model=str(tiny_model),
                 config=pre.config, target=target, run={"task": task, "max_seq_length": 48})
    return folder


@pytest.fixture(scope="module")
def rows(glue_dir):
    """Mixed input rows: SST-2 sentences, STS-B and MNLI-shaped pairs from real text."""
    sst = [l.split("\t")[0] for l in
           (glue_dir / "SST-2" / "dev.tsv").read_text().splitlines()[1:40]]
    sts = [l.split("\t") for l in
           (glue_dir / "STS-B" / "dev.tsv").read_text().splitlines()[1:40]]
    return sst, [(r[7], r[8]) for r in sts]


def _mixed_rows(names, sst, pairs):
    out = []
    for i in range(36):
        name = names[i % len(names)]
        if name.startswith(("sst2",)):
            out.append({"adapter": name, "sentence": sst[i]})
        elif name.startswith("stsb"):
            out.append({"adapter": name, "sentence1": pairs[i][0], "sentence2": pairs[i][1]})
        else:
            out.append({"adapter": name, "premise": pairs[i][0], "hypothesis": pairs[i][1]})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_mixed_batches_equal_each_adapter_alone(tiny_model, rows, tmp_path, method):
    """Four adapters of one method (two SST-2 heads, an STS-B head with its output map, a
    3-class MNLI head) in shuffled mixed batches: every row's logits equal its adapter's
    own forward."""
    folders = {f"{task}_{i}": _adapter(tiny_model, tmp_path / f"{task}_{i}", method, task,
                                      target, seed=i)
               for i, (task, target) in enumerate(TASKS)}
    aset = AdapterSet.load(folders)
    assert len(aset.groups) == 1  # one method and options: one forward for every mix
    sst, pairs = rows
    mixed = _mixed_rows(list(folders), sst, pairs)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    table = predict_mixed_file(folders, str(source), batch_size=8)
    assert len(table) == len(mixed) + 1 and table[0][:3] == ["index", "adapter", "label"]
    # Each adapter alone, on its own rows, through the single-adapter predict.
    for name, folder in folders.items():
        mine = [r for r in mixed if r["adapter"] == name]
        alone = tmp_path / f"alone-{name}.jsonl"
        alone.write_text("".join(json.dumps(r) + "\n" for r in mine))
        single = predict_file(folder, str(alone))
        got = [row for row in table[1:] if row[1] == name]
        assert len(got) == len(mine) == len(single) - 1
        header = single[0]
        for ours, theirs in zip(got, single[1:]):
            assert ours[2] == theirs[1]  # the label (STS-B: the score to 4 decimals)
            for column, value in zip(header[2:], theirs[2:]):
                k = table[0].index(column)
                assert abs(float(ours[k]) - float(value)) <= 2e-6, (name, column)


@pytest.mark.slow
def test_mixed_logits_equal_the_adapters_forward(tiny_model, rows, tmp_path):
    """The Python API: logits (not rounded) equal each adapter's own model within 1e-5,
    across two method groups (LoRA and IA3) in one set."""
    folders = {"a": _adapter(tiny_model, tmp_path / "a", "lora", "sst2", None, 1),
               "b": _adapter(tiny_model, tmp_path / "b", "ia3", "stsb", (1.0, 2.0), 2),
               "c": _adapter(tiny_model, tmp_path / "c", "lora", "mnli", None, 3)}
    aset = AdapterSet.load(folders)
    assert len(aset.groups) == 2
    sst, pairs = rows
    from jaxpeft.data.glue import Split
    n = 10
    splits = {
        "a": Split("sst2", "predict", sst[:n], None, np.full(n, -1), np.arange(n), "x"),
        "b": Split("stsb", "predict", [p[0] for p in pairs[:n]], [p[1] for p in pairs[:n]],
                   np.full(n, np.nan, np.float32), np.arange(n), "x"),
        "c": Split("mnli", "predict", [p[1] for p in pairs[:n]], [p[0] for p in pairs[:n]],
                   np.full(n, -1), np.arange(n), "x")}
    enc, which = aset.encode(splits)
    got = aset.logits(enc, which, batch_size=7)
    for a, name in enumerate(aset.names):
        task = aset.tasks[a]
        pre = jaxpeft.load_pretrained(tiny_model, num_labels=task.num_labels)
        model, params, _ = load_adapter(folders[name], pre)
        e = pre.tokenizer(splits[name].text_a, splits[name].text_b, truncation=True,
                          max_length=48, padding=True, return_tensors="np")
        alone = np.asarray(model.apply({"params": params}, e["input_ids"], e["attention_mask"],
                                       e["token_type_ids"], deterministic=True))
        ours = np.stack([got[i] for i in range(len(enc)) if which[i] == a])
        np.testing.assert_allclose(ours, alone, atol=1e-5, rtol=0, err_msg=name)


def test_mixed_input_errors(tiny_model, tmp_path):
    folders = {"s": _adapter(tiny_model, tmp_path / "s", "lora", "sst2", None, 1)}
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"adapter": "s", "sentence": "fine"}) + "\n"
                      + json.dumps({"adapter": "t", "sentence": "fine"}) + "\n")
    with pytest.raises(JaxpeftError, match=r"row 2: 'adapter' is 't', not one of the "
                                           r"adapters \(s\)"):
        predict_mixed_file(folders, str(source))
    from jaxpeft.mixed import parse_adapters
    with pytest.raises(JaxpeftError, match="is not name=folder"):
        parse_adapters(["runs/a"])
    with pytest.raises(JaxpeftError, match="given twice"):
        parse_adapters(["a=x", "a=y"])


def test_predict_command_takes_one_adapter_or_several(tiny_model, tmp_path, capsys):
    """experiments/predict.py's function: --run or --adapter, not both; --text_columns only
    with --run; user errors are one `error:` line and exit code 1."""
    from jaxpeft.mixed import predict_cli

    folder = _adapter(tiny_model, tmp_path / "s", "lora", "sst2", None, 1)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"adapter": "s", "sentence": "a fine film"}) + "\n")
    out = tmp_path / "out.tsv"
    assert predict_cli(None, [f"s={folder}"], str(source), str(out), None, None, "adapter",
                       8) == 0
    assert out.read_text().splitlines()[0].startswith("index\tadapter\tlabel\tp_negative")
    for args, message in (((str(folder), [f"s={folder}"], None), "give --run"),
                          ((None, [f"s={folder}"], ("sentence",)), "--text_columns applies")):
        run, adapters, columns = args
        capsys.readouterr()
        assert predict_cli(run, adapters, str(source), None, None, columns, "adapter", 8) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
