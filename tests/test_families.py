"""Every PEFT method on the encoder families beyond BERT and RoBERTa (XLM-R, ELECTRA,
DistilBERT), against transformers + peft on tiny random models: trainable counts, the peft
export (exactly peft's keys, the same logits) and its import, the merged export as a plain
transformers model, and each method training through the unchanged train step."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxpeft
from jaxpeft.errors import JaxpeftError
from jaxpeft.models.registry import get_family
from jaxpeft.peft import (METHODS, LoraConfig, export_merged, export_peft, import_peft,
                          make_peft)
from jaxpeft.peft.boft import BoftConfig
from jaxpeft.peft.fourierft import FourierftConfig
from jaxpeft.peft.ia3 import Ia3Config
from jaxpeft.peft.adalora import AdaloraConfig
from jaxpeft.peft.loha import LohaConfig
from jaxpeft.peft.lokr import LokrConfig
from jaxpeft.peft.oft import OftConfig
from jaxpeft.peft.prompt import PromptConfig
from jaxpeft.peft.vera import VeraConfig
from tests.helpers import random_batch, tiny_torch_model, torch_inputs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

# End-to-end runs of several seconds each: left out of the fast core (pytest -m "not slow").
pytestmark = pytest.mark.slow

FAMILIES = ("xlm-roberta", "electra", "distilbert", "deberta-v2", "modernbert")
ALL_TARGETS = ("query", "key", "value", "attention_output", "intermediate", "output")
# Options small enough for hidden 32; `lora_all` takes the regex form of target_modules.
OPTIONS = {
    "lora": ("lora", LoraConfig(rank=4, alpha=8)),
    "lora_all": ("lora", LoraConfig(rank=4, alpha=8, targets=ALL_TARGETS)),
    "dora": ("dora", LoraConfig(rank=4, alpha=8)),
    "ia3": ("ia3", Ia3Config(("key", "value", "output", "attention_output"))),
    "vera": ("vera", VeraConfig(rank=16)),
    "ln_tuning": ("ln_tuning", None),
    "prompt": ("prompt", PromptConfig(num_virtual_tokens=4, head="virtual")),
    "loha": ("loha", LohaConfig(rank=4, alpha=8)),
    "lokr": ("lokr", LokrConfig(rank=2, alpha=4)),
    "oft": ("oft", OftConfig(block_size=8)),
    "adalora": ("adalora", AdaloraConfig(init_r=4, target_r=2)),
    "fourierft": ("fourierft", FourierftConfig(n_frequency=64, scaling=300.0)),
    "boft": ("boft", BoftConfig(block_size=4)),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """`(model_type, folder, loaded model)` of a tiny random model of one family, without
    dropout so that PyTorch and Flax compute the same function."""
    folder = tmp_path_factory.mktemp(request.param)
    tiny_torch_model(request.param, folder, hidden_dropout_prob=0.0, classifier_dropout=0.0,
                     attention_probs_dropout_prob=0.0)
    return request.param, folder, jaxpeft.load_pretrained(folder, tokenizer=False)


def _batch(model_type):
    return random_batch(model_type, pairs=True, length=16)


def _for_family(method, options, model_type):
    """The options with query/key/value read as the fused `qkv` where the family has it."""
    own = get_family(model_type).targets
    if options is None or not hasattr(options, "targets") or "qkv" not in own:
        return options
    targets = tuple(dict.fromkeys(t if t in own else "qkv" for t in options.targets))
    return dataclasses.replace(options, targets=targets)


def _trained(pre, case, scale=0.05):
    """`(peft, model, params)` with every trainable leaf moved off its initial value."""
    method, options = OPTIONS.get(case, (case, None))
    peft = make_peft(method, _for_family(method, options, pre.config.model_type))
    model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    flat, mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(peft.mask(params))
    key = jax.random.key(1)
    for i, path in enumerate(sorted(flat)):
        if mask[path]:
            flat[path] = flat[path] + scale * jax.random.normal(jax.random.fold_in(key, i),
                                                                flat[path].shape)
    return peft, model, traverse_util.unflatten_dict(flat)


def _torch_logits(model, args):
    with torch.no_grad():
        return model(**torch_inputs(model, *args)).logits.numpy()


def _torch_model(folder):
    return transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()


@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_peft_export_and_import(family, case, tmp_path):
    """The export loads into `PeftModel` on the family's transformers model with exactly the
    keys peft saves, the same trainable count and the same logits; importing it back gives
    our logits again (VeRA has no import: its projections come from torch's generator)."""
    from safetensors.numpy import load_file

    model_type, folder, pre = family
    peft, model, params = _trained(pre, case)
    args = _batch(model_type)
    export_peft(tmp_path, peft, params, base_model=str(folder), config=pre.config)
    config = hf_peft.PeftConfig.from_pretrained(tmp_path)
    config.inference_mode = False  # the export is for inference; count as peft trains
    fresh = hf_peft.get_peft_model(_torch_model(folder), config)
    assert fresh.get_nb_trainable_parameters()[0] == peft.count(params).trainable
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == set(
        hf_peft.get_peft_model_state_dict(fresh))
    ours = np.asarray(model.apply({"params": params}, *args, deterministic=True))
    base = np.asarray(pre.model.apply({"params": pre.params}, *args, deterministic=True))
    assert np.abs(ours - base).max() > 1e-3  # the adapter really changes the output
    theirs = _torch_logits(hf_peft.PeftModel.from_pretrained(_torch_model(folder),
                                                             tmp_path).eval(), args)
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    if OPTIONS[case][0] == "vera":
        return
    model2, params2, peft2 = import_peft(tmp_path, pre)
    assert peft2.name == peft.name and peft2.count(params2) == peft.count(params)
    np.testing.assert_allclose(model2.apply({"params": params2}, *args, deterministic=True),
                               ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["lora", "dora", "ia3", "vera", "ln_tuning", "loha", "lokr",
                                  "oft", "adalora", "fourierft", "boft"])
def test_merged_export_is_a_plain_transformers_model(family, case, tmp_path):
    model_type, folder, pre = family
    peft, model, params = _trained(pre, case)
    args = _batch(model_type)
    export_merged(tmp_path, peft, params, base_dir=folder, tokenizer=None)
    loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(loaded).__name__ == get_family(model_type).hf_class
    ours = np.asarray(model.apply({"params": params}, *args, deterministic=True))
    np.testing.assert_allclose(_torch_logits(loaded.eval(), args), ours, atol=1e-4, rtol=0)


def test_bitfit_and_full_counts_equal_transformers(family):
    """BitFit trains every bias and the head; full fine-tuning every parameter (counted on
    the transformers model itself)."""
    model_type, folder, pre = family
    head = get_family(model_type).head
    named = dict(_torch_model(folder).named_parameters())
    biases = sum(p.numel() for n, p in named.items()
                 if n.endswith(".bias") or n.split(".")[0] in head)
    for method, expected in (("bitfit", biases), ("full", sum(p.numel() for p in named.values()))):
        if method == "bitfit" and not get_family(model_type).biases:
            continue  # refused (test_every_method_trains_on_the_family)
        peft = make_peft(method)
        _, params = peft.init(pre.model, pre.params, jax.random.key(0))
        assert peft.count(params).trainable == expected, method


# The methods peft has run forward on every family in the export test above; their train
# step is the one LoRA's is. These take one step each (and BitFit's refusal on ModernBERT,
# prefix tuning's and LoReFT's on DeBERTa and ModernBERT).
TRAINED = ["full", "bitfit", "lora", "adapter_houlsby", "adapter_pfeiffer", "prefix", "loreft"]


def test_every_registered_method_runs_on_the_families():
    """Each registered method is in the export test or the train-step test below."""
    assert set(METHODS) <= set(TRAINED) | {method for method, _ in OPTIONS.values()}


@pytest.mark.parametrize("method", TRAINED)
def test_every_method_trains_on_the_family(family, method):
    """One train step: finite loss, the trainable leaves move. Run eagerly: the step's
    compiled form on every family is the resume test's below (and every method's on BERT,
    tests/test_method_interface.py); compiling 35 tiny steps cost more than running them."""
    from jaxpeft.optim import OptimConfig, make_optimizer
    from jaxpeft.train import create_train_state, make_train_step

    model_type, _, pre = family
    default = {"vera": VeraConfig(rank=16)}.get(method) or make_peft(method).options
    peft = make_peft(method, _for_family(method, default, model_type))
    if method == "bitfit" and not get_family(model_type).biases:
        with pytest.raises(JaxpeftError, match="bitfit needs biases, which modernbert"):
            peft.init(pre.model, pre.params, jax.random.key(0))
        return
    if method == "prefix" and not get_family(model_type).attention_prefix:
        with pytest.raises(JaxpeftError, match="prefix needs attention that takes extra keys"):
            peft.init(pre.model, pre.params, jax.random.key(0))
        return
    if method == "loreft" and not get_family(model_type).layer_hooks:
        with pytest.raises(JaxpeftError, match="loreft acts between the layers"):
            peft.init(pre.model, pre.params, jax.random.key(0))
        return
    model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    mask = peft.mask(params)
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, total_steps=10, warmup_steps=0), mask)
    state, frozen = create_train_state(params, mask, tx)
    ids, attention, types = _batch(model_type)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(attention),
             "token_type_ids": jnp.asarray(types), "labels": jnp.asarray([0, 1, 0, 1]),
             "weights": jnp.ones(4)}
    before = jax.tree.map(np.asarray, state.trainable)
    with jax.disable_jit():
        state, metrics = make_train_step(model, tx)(state, batch, jax.random.key(2), frozen)
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))),
                                         before, state.trainable))
    assert moved and any(moved)


def test_targets_by_the_familys_own_names(family):
    """peft's module names of the family work as --lora_targets (DistilBERT's q_lin, ...)."""
    model_type, _, pre = family
    own = get_family(model_type).targets
    first = "qkv" if "qkv" in own else "query"
    peft = make_peft("lora", LoraConfig(targets=(own[first].rsplit(".", 1)[-1], own["output"])))
    assert peft.options.targets == (first, "output")
    _, params = peft.init(pre.model, pre.params, jax.random.key(0))
    lora = [p for p in traverse_util.flatten_dict(params) if p[-1] == "lora_a"]
    assert len(lora) == 2 * pre.config.num_hidden_layers
    with pytest.raises(JaxpeftError, match="unknown LoRA target"):
        make_peft("lora", LoraConfig(targets=("nonsense",)))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_runs_resume_bfloat16_and_devices(family_models, glue_dir, tmp_path, model_type):
    """A short real SST-2 run of each family (its own tokenizer, packed batches, dropout on):
    killed and resumed it ends exactly as uninterrupted; four devices give one device's
    losses (DeBERTa and ModernBERT, whose layers differ most from BERT's: splitting the
    batch is the same code for every family, and BERT's meshes are tests/test_sharding.py's);
    bfloat16 compute gives the float32 logits to bfloat16 precision."""
    from jaxpeft.config import RunConfig
    from jaxpeft.run import train_and_evaluate
    from tests.helpers import comparable_rows, run_config

    folder = family_models[model_type]
    small = dict(max_train_samples=48, max_eval_samples=48, log_every=2, eval_every=3,
                 checkpoint_every=2, lora_dropout=0.1,
                 lora_targets=("qkv",) if model_type == "modernbert" else ("query", "value"))

    def cfg(name, **kw):
        return run_config(folder, glue_dir, tmp_path / name, **small, **kw)

    full = train_and_evaluate(cfg("a"))
    assert full["train"]["steps"] == 6 and np.isfinite(full["best"]["eval_loss"])

    class Kill(Exception):
        pass

    def kill_at_4(step):
        if step == 4:
            raise Kill()

    with pytest.raises(Kill):
        train_and_evaluate(cfg("b"), on_step=kill_at_4)
    resumed = train_and_evaluate(RunConfig(**{**cfg("b").__dict__, "resume": True}))
    assert resumed["final"] == full["final"] and resumed["best"] == full["best"]
    assert comparable_rows(tmp_path / "b" / "run") == comparable_rows(tmp_path / "a" / "run")

    if model_type in ("deberta-v2", "modernbert"):
        _four_devices_give_one_devices_losses(cfg("d4"), small, tmp_path / "a" / "run")

    exact = jaxpeft.load_pretrained(folder, num_labels=2)
    half = jaxpeft.load_pretrained(folder, num_labels=2, dtype="bfloat16")
    enc = exact.tokenizer(["a gripping, funny film", "dull"], ["yes", "no"], padding=True,
                          return_tensors="np")
    args = (enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
    logits = [np.asarray(p.model.apply({"params": p.params}, *args)) for p in (exact, half)]
    assert logits[1].dtype == np.float32
    np.testing.assert_allclose(logits[1], logits[0], atol=3e-2, rtol=0)


def _four_devices_give_one_devices_losses(config, small, one_device_run):
    """The CLI on four host devices logs the losses of `one_device_run` (same settings)."""
    import json
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    flags = [f"--{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in
             {**config.to_dict(), **small}.items()
             if k in {"model", "data_dir", "task", "method", "batch_size", "num_epochs",
                      "max_seq_length", "learning_rate", "output_dir", *small}]
    proc = subprocess.run([sys.executable, "-m", "experiments.run_glue", *flags,
                           "--cache_dir=", "--progress=false"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = Path(config.output_dir)
    assert json.loads((out / "config.json").read_text())["devices"]["count"] == 4
    losses = [[r["train_loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text()
                                             .splitlines()) if "train_loss" in r]
              for d in (out, one_device_run)]
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[0], losses[1], atol=1e-5, rtol=0)


def test_a_method_the_family_cannot_host_is_refused_before_loading(family_models, tmp_path):
    """LoRA's default query/value and BitFit on ModernBERT (fused qkv, no biases): one line
    from the options check, before any weight is read; the family's own targets pass."""
    from jaxpeft.config import RunConfig, validate

    folder = family_models["modernbert"]
    for method, message in (("lora", "lora needs query, value, which modernbert does not "
                                     "have .*qkv, attention_output"),
                            ("bitfit", "bitfit needs biases")):
        with pytest.raises(JaxpeftError, match=message):
            validate(RunConfig(task="sst2", model=str(folder), method=method))
    validate(RunConfig(task="sst2", model=str(folder), method="lora", lora_targets=("Wqkv",)))
