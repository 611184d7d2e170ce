"""LoRA / BitFit / full through the method registry: masks, exact counts, freezing, adapter
files, peft export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxpeft
from jaxpeft.errors import JaxpeftError
from jaxpeft.models import EncoderConfig, Runtime, SequenceClassifier
from jaxpeft.optim import OptimConfig, make_optimizer
from jaxpeft.peft import (METHODS, LoraConfig, add_lora, combine, export_peft, load_adapter,
                          make_peft, merge_lora, partition, path_str, save_adapter)
from jaxpeft.train import (check_compiler_options, create_train_state, make_train_step,
                           update_stats)
from tests.helpers import random_batch, save_torch_model, tiny_hf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    dirs = {}
    for mt, cls in (("bert", transformers.BertForSequenceClassification),
                    ("roberta", transformers.RobertaForSequenceClassification)):
        d = tmp_path_factory.mktemp(f"tiny_{mt}")
        save_torch_model(cls, tiny_hf_config(mt, hidden_dropout_prob=0.0,
                                             attention_probs_dropout_prob=0.0), d)
        dirs[mt] = d
    return dirs


def _perturb_lora(params, scale=0.05, seed=1):
    flat = traverse_util.flatten_dict(params)
    key = jax.random.key(seed)
    for i, p in enumerate(sorted(flat)):
        if p[-1] == "lora_b" or p[0] == "classifier":
            flat[p] = flat[p] + scale * jax.random.normal(jax.random.fold_in(key, i), flat[p].shape)
    return traverse_util.unflatten_dict(flat)


def _logits(model, params, args):
    return np.asarray(model.apply({"params": params}, *args, deterministic=True))


# ---- LoRA math ------------------------------------------------------------------------------

def test_lora_equals_base_at_init_and_merged_after_perturbation(minilm, sst2_batch):
    cfg = LoraConfig(rank=8, alpha=16, targets=("query", "key", "value", "attention_output",
                                                "intermediate", "output"))
    peft = make_peft("lora", cfg)
    model, params = peft.init(minilm.model, minilm.params, jax.random.key(0))
    base = _logits(minilm.model, minilm.params, sst2_batch)
    np.testing.assert_array_equal(_logits(model, params, sst2_batch), base)  # B = 0: exact

    params = _perturb_lora(params)
    unmerged = _logits(model, params, sst2_batch)
    plain_model, merged_params = peft.merge(model, params)
    assert not any(p[-1].startswith("lora") for p in traverse_util.flatten_dict(merged_params))
    merged = _logits(plain_model, merged_params, sst2_batch)
    np.testing.assert_array_equal(
        _logits(minilm.model, merge_lora(params, cfg), sst2_batch), merged)
    assert np.abs(unmerged - base).max() > 1e-3  # the perturbation really changed the output
    np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)


def test_lora_shapes_and_init():
    cfg = LoraConfig(rank=4)
    model = SequenceClassifier(EncoderConfig("bert", 50, 32, 2, 4, 48))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    lp = add_lora(params, cfg, jax.random.key(1))
    q = lp["bert"]["encoder"]["layer_1"]["attention"]["self"]["query"]
    assert q["lora_a"].shape == (32, 4) and q["lora_b"].shape == (4, 32)
    assert float(jnp.abs(q["lora_b"]).max()) == 0.0
    assert 0 < float(jnp.abs(q["lora_a"]).max()) <= 1 / np.sqrt(32)
    assert "lora_a" not in lp["bert"]["encoder"]["layer_1"]["attention"]["self"]["key"]
    assert LoraConfig(rank=4, alpha=8).scale == 2.0
    assert LoraConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0


# ---- exact counts ---------------------------------------------------------------------------

def test_counts_match_peft_on_minilm(minilm):
    got = {}
    for method in METHODS:
        peft = make_peft(method)
        _, params = peft.init(minilm.model, minilm.params, jax.random.key(0))
        got[method] = peft.count(params).trainable
    # lora, dora, vera, ln_tuning, prompt, loha, lokr, oft, fourierft, boft and (with peft's
    # target set) ia3 are checked against peft itself in test_peft_family.py, prefix and
    # adalora in their own files; loreft and the adapters' arithmetic in test_loreft.py and
    # test_method_interface.py
    assert got == {"lora": 74_498, "bitfit": 26_882, "full": 22_713_986, "dora": 79_106,
                   "ia3": 14_594, "vera": 8_450, "ln_tuning": 10_754,
                   "adapter_houlsby": 605_186, "adapter_pfeiffer": 307_586, "prompt": 8_450,
                   "loha": 148_226, "lokr": 8_450, "oft": 72_194, "prefix": 92_930,
                   "adalora": 111_506, "loreft": 19_226, "fourierft": 12_770, "boft": 23_810}


def test_counts_match_peft_print_trainable_parameters(minilm_dir):
    """Our counts equal what peft itself reports for the same PyTorch model."""
    peft = pytest.importorskip("peft")
    base = transformers.BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    pm = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                   target_modules=["query", "value"]))
    trainable, total = pm.get_nb_trainable_parameters()
    pre = jaxpeft.load_pretrained(minilm_dir, num_labels=2, tokenizer=False)
    peft = make_peft("lora", LoraConfig(rank=8, alpha=16))
    counts = peft.count(peft.init(pre.model, pre.params, jax.random.key(0))[1])
    assert counts.trainable == trainable
    # peft's total also counts its modules_to_save copy of the head a second time.
    head = 384 * 2 + 2
    assert counts.total == total - head


def test_bert_base_lora_count_is_the_papers_0_3m():
    cfg = EncoderConfig("bert", 30522, 768, 12, 12, 3072, num_labels=2)
    model = SequenceClassifier(cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    peft = make_peft("lora", LoraConfig(rank=8))
    lora = jax.eval_shape(lambda p: peft.init(model, p, jax.random.key(0))[1], shapes)
    counts = peft.count(lora)
    head = 768 * 2 + 2
    assert counts.trainable == 294_912 + head == 2 * 12 * 768 * 8 * 2 + head


def test_every_leaf_is_covered_and_head_always_trainable(tiny_dirs):
    for mt, d in tiny_dirs.items():
        pre = jaxpeft.load_pretrained(d, tokenizer=False)
        params = add_lora(pre.params, LoraConfig(), jax.random.key(0))
        for method in METHODS:
            flat = traverse_util.flatten_dict(make_peft(method).mask(params))
            assert set(flat) == set(traverse_util.flatten_dict(params))
            assert all(isinstance(v, bool) for v in flat.values())
            heads = [v for p, v in flat.items() if p[0] == "classifier"]
            assert heads and all(heads)
        bitfit = traverse_util.flatten_dict(make_peft("bitfit").mask(params))
        assert all(v == (p[-1] == "bias" or p[0] == "classifier") for p, v in bitfit.items())


# ---- freezing -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "bitfit"])
def test_steps_change_only_trainable_leaves(tiny_dirs, method):
    pre = jaxpeft.load_pretrained(tiny_dirs["roberta"], tokenizer=False)
    options = LoraConfig(rank=4, dropout=0.1) if method == "lora" else None
    peft = make_peft(method, options)
    model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    mask = peft.mask(params)
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, total_steps=10, weight_decay=0.01), mask)
    before = jax.device_get(params)
    state, frozen = create_train_state(params, mask, tx)
    counts = peft.count(params)
    # Adam keeps mu and nu for trainable leaves only (plus scalar step counters).
    state_sizes = [x.size for x in jax.tree.leaves(state.opt_state)]
    assert sum(s for s in state_sizes if s > 1) == 2 * counts.trainable
    # The state holds the trainable leaves only; frozen leaves are the caller's own arrays
    # (held once on the device, never copied) and stay outside the donated state.
    assert sum(x.size for x in jax.tree.leaves(state.trainable)) == counts.trainable
    flat_params, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
    for path, leaf in traverse_util.flatten_dict(frozen).items():
        if leaf is not None:
            assert not flat_mask[path]
            assert leaf.unsafe_buffer_pointer() == flat_params[path].unsafe_buffer_pointer()
    ids, attn, types = random_batch("roberta", batch=8)
    batch = {"input_ids": ids, "attention_mask": attn, "token_type_ids": types,
             "labels": np.arange(8) % 2, "weights": np.ones(8, np.float32)}
    step = make_train_step(model, tx)
    for i in range(3):
        state, metrics = step(state, batch, jax.random.key(42), frozen)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    after = traverse_util.flatten_dict(jax.device_get(combine(state.trainable, frozen)))
    for path, old in traverse_util.flatten_dict(before).items():
        if flat_mask[path]:
            assert not np.array_equal(after[path], old), path_str(path)
        else:
            np.testing.assert_array_equal(after[path], old, err_msg=path_str(path))
    assert int(state.step) == 3


@pytest.mark.slow
def test_train_step_xla_options_change_kernels_not_results(tiny_dirs):
    """--train_step_xla_options only picks kernels: LoRA steps compiled with matmuls handed
    to YNNPACK alone follow the default program's losses and weights to float rounding; an
    option XLA rejects is one clear error before anything runs."""
    with pytest.raises(JaxpeftError, match="refuses them"):
        check_compiler_options({"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"}
                               if jax.default_backend() == "cpu" else {"not_an_option": "1"})
    if jax.default_backend() != "cpu":
        return
    options = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    check_compiler_options(options)
    pre = jaxpeft.load_pretrained(tiny_dirs["roberta"], tokenizer=False)
    peft = make_peft("lora", LoraConfig(rank=4, dropout=0.1))
    model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    mask = peft.mask(params)
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, total_steps=10), mask)
    ids, attn, types = random_batch("roberta", batch=8)
    batch = {"input_ids": ids, "attention_mask": attn, "token_type_ids": types,
             "labels": np.arange(8) % 2, "weights": np.ones(8, np.float32)}
    runs = []
    for compiler_options in (None, options):
        state, frozen = create_train_state(params, mask, tx)
        step, losses = make_train_step(model, tx, compiler_options), []
        for _ in range(3):
            state, metrics = step(state, batch, jax.random.key(42), frozen)
            losses.append(float(metrics["loss"]))
        runs.append((losses, jax.device_get(state.trainable)))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 runs[1][1], runs[0][1])


@pytest.mark.slow
def test_optimizer_refuses_an_update_for_a_frozen_leaf(tiny_dirs):
    """optax.masked would pass a frozen leaf's gradient through unchanged: the optimizer
    built from the mask refuses such a tree instead of silently training the leaf."""
    pre = jaxpeft.load_pretrained(tiny_dirs["bert"], tokenizer=False)
    mask = make_peft("bitfit").mask(pre.params)
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, total_steps=10), mask)
    trainable, _ = partition(pre.params, mask)
    state = tx.init(trainable)
    with pytest.raises(ValueError, match="is frozen but received an update"):
        tx.update(jax.tree.map(jnp.ones_like, pre.params), state, pre.params)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, trainable), state, trainable)
    flat_u = traverse_util.flatten_dict(updates)
    for path, m in traverse_util.flatten_dict(mask).items():
        assert (flat_u[path] is not None and bool(jnp.all(flat_u[path] != 0))) == m, path


def test_tree_with_method_leaves_needs_the_method(tiny_dirs):
    """A LoRA tree applied to a model without the LoRA method is an error, not scale 1."""
    pre = jaxpeft.load_pretrained(tiny_dirs["bert"], tokenizer=False)
    peft = make_peft("lora", LoraConfig(rank=2, alpha=8))
    model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    args = random_batch("bert")
    with pytest.raises(JaxpeftError, match=r"\['lora_a', 'lora_b'\] belong to a PEFT method"):
        _logits(pre.model, params, args)
    assert model.runtime.hooks[0].config.scale == 4.0  # alpha / r travels with the method


def test_step_stats_measure_the_step_taken():
    """update_norm/ratio equal what the parameters moved; loss_decrease is −⟨g, Δθ⟩ exactly."""
    params = {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "b": jnp.array([0.1, -0.3])}
    grads = {"w": jnp.array([[0.2, -0.4], [0.0, 1.5]]), "b": jnp.array([-0.7, 0.05])}
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, total_steps=10, max_grad_norm=0.0),
                        jax.tree.map(lambda _: True, params))
    updates, _ = tx.update(grads, tx.init(params), params)
    stats = jax.device_get(update_stats(grads, updates, params))
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    g, u, p = flat(grads), flat(updates), flat(params)
    np.testing.assert_allclose(stats["grad_norm"], np.linalg.norm(g), rtol=1e-6)
    np.testing.assert_allclose(stats["update_norm"], np.linalg.norm(u), rtol=1e-6)
    np.testing.assert_allclose(stats["update_ratio"], np.linalg.norm(u) / np.linalg.norm(p),
                               rtol=1e-6)
    np.testing.assert_allclose(stats["loss_decrease"], -np.dot(g, u), rtol=1e-6)
    # Adam's first step moves each coordinate with a nonzero gradient by the learning rate,
    # against the gradient: the decrease is lr·‖g‖₁ (the zero-gradient coordinate stays).
    np.testing.assert_allclose(stats["loss_decrease"], 1e-2 * np.abs(g).sum(), rtol=1e-5)
    np.testing.assert_allclose(np.abs(u[g != 0]), 1e-2, rtol=1e-5)

# ---- adapter files --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "bitfit", "full"])
def test_adapter_save_load_roundtrip(tiny_dirs, tmp_path, method):
    d = tiny_dirs["bert"]
    pre = jaxpeft.load_pretrained(d, tokenizer=False)
    options = LoraConfig(rank=2, alpha=4, targets=("query", "value", "output")) \
        if method == "lora" else None
    peft = make_peft(method, options)
    model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    params = _perturb_lora(jax.tree.map(lambda x: x + 0.01, params))  # every leaf changed
    mask = peft.mask(params)
    save_adapter(tmp_path / "ad", peft, params, base_model=str(d), config=pre.config)
    fresh = jaxpeft.load_pretrained(d, tokenizer=False)
    model2, params2, peft2 = load_adapter(tmp_path / "ad", fresh)
    assert peft2 == peft  # the method and every option come back from adapter.json
    assert model2.runtime.hooks == model.runtime.hooks
    args = random_batch("bert", pairs=True)
    _, fresh_params = peft.init(fresh.model, fresh.params, jax.random.key(0))
    expected = _logits(model, jax.tree.map(lambda p, f, m: p if m else f,
                                           params, fresh_params, mask), args)
    np.testing.assert_array_equal(_logits(model2, params2, args), expected)


def test_adapter_of_an_unknown_format_is_refused(tiny_dirs, tmp_path):
    """An adapter.json of another format version is one clear error, never half-read."""
    import json

    pre = jaxpeft.load_pretrained(tiny_dirs["bert"], tokenizer=False)
    peft = make_peft("lora", LoraConfig(rank=2, alpha=6))
    model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    save_adapter(tmp_path, peft, params, base_model="tiny", config=pre.config)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    meta.update(format="jaxpeft-adapter/1", method="lora", lora=meta["peft"]["options"],
                train_pooler=False)
    del meta["peft"]
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(JaxpeftError, match="not a jaxpeft-adapter/2 adapter description"):
        load_adapter(tmp_path, pre, check_base_name=False)


def test_adapter_for_other_base_or_num_labels_is_refused(tiny_dirs, tmp_path):
    pre = jaxpeft.load_pretrained(tiny_dirs["bert"], tokenizer=False)
    save_adapter(tmp_path, make_peft("bitfit"), pre.params, base_model=str(tiny_dirs["bert"]),
                 config=pre.config)
    with pytest.raises(JaxpeftError, match="another architecture"):
        load_adapter(tmp_path, jaxpeft.load_pretrained(tiny_dirs["roberta"], tokenizer=False))
    with pytest.raises(JaxpeftError, match="num_labels=2.*num_labels=3"):
        load_adapter(tmp_path, jaxpeft.load_pretrained(tiny_dirs["bert"], num_labels=3,
                                                       tokenizer=False))
    with pytest.raises(JaxpeftError, match="trained on base model"):
        moved = jaxpeft.load_pretrained(tiny_dirs["bert"], tokenizer=False)
        moved.name_or_path, moved.path = "other-model", tmp_path / "elsewhere"
        load_adapter(tmp_path, moved)


# ---- bad options ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,msg", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": -3}, "rank must be a positive integer"),
    ({"targets": ("query", "qvk")}, r"unknown LoRA target.*'qvk'.*valid targets: query, key, value"),
    ({"targets": ()}, "unknown LoRA target"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"dropout": 1.0}, "dropout must be in"),
])
def test_bad_lora_options(kwargs, msg):
    with pytest.raises(JaxpeftError, match=msg):
        LoraConfig(**kwargs)


def test_pooler_targets_where_a_pretrained_pooler_is(tiny_dirs):
    """`pooler` (alias `bert.pooler.dense`) and `all-linear` adapt BERT's pooler; RoBERTa has
    none to adapt, and a pooler trained whole cannot also carry LoRA."""
    assert LoraConfig(targets=("bert.pooler.dense", "all-linear")).targets == ("pooler",
                                                                                "all-linear")
    bert = jaxpeft.load_pretrained(tiny_dirs["bert"], tokenizer=False)
    roberta = jaxpeft.load_pretrained(tiny_dirs["roberta"], tokenizer=False)
    _, params = make_peft("lora", LoraConfig(targets=("all-linear",))).init(
        roberta.model, roberta.params, jax.random.key(0))
    assert "lora_a" in params["roberta"]["encoder"]["layer_0"]["output"]["dense"]
    with pytest.raises(JaxpeftError, match="lora needs pooler, which roberta does not have"):
        make_peft("lora", LoraConfig(targets=("pooler",))).init(roberta.model, roberta.params,
                                                                jax.random.key(0))
    for targets in (("pooler",), ("all-linear",)):
        with pytest.raises(JaxpeftError, match="--train_pooler trains the pooler whole"):
            make_peft("lora", LoraConfig(targets=targets), train_pooler=True).init(
                bert.model, bert.params, jax.random.key(0))


def test_unknown_method():
    with pytest.raises(JaxpeftError, match="unknown method 'p_tuning'.*full, lora, bitfit"):
        make_peft("p_tuning")
    with pytest.raises(JaxpeftError, match="export works for methods peft implements"):
        make_peft("bitfit").require_peft_export()


# ---- export to Hugging Face peft ------------------------------------------------------------

def _peft_logits(base_dir, adapter_dir, args, num_labels=2, cls=None):
    peft = pytest.importorskip("peft")
    cls = cls or transformers.AutoModelForSequenceClassification
    base = cls.from_pretrained(base_dir, num_labels=num_labels)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(args[0]), attention_mask=torch.tensor(args[1]),
                     token_type_ids=torch.tensor(args[2])).logits.numpy()


def test_peft_export_reproduces_logits_on_minilm(minilm, minilm_dir, sst2_batch, tmp_path):
    peft = make_peft("lora", LoraConfig(rank=8, alpha=16))
    model, params = peft.init(minilm.model, minilm.params, jax.random.key(0))
    params = _perturb_lora(params)
    export_peft(tmp_path, peft, params, base_model=str(minilm_dir))
    ours = _logits(model, params, sst2_batch)
    theirs = _peft_logits(minilm_dir, tmp_path, sst2_batch)
    assert np.abs(ours - _logits(minilm.model, minilm.params, sst2_batch)).max() > 1e-3
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mt", ["roberta", "bert"])
def test_peft_export_all_targets_pooler_rslora(tiny_dirs, tmp_path, mt):
    pre = jaxpeft.load_pretrained(tiny_dirs[mt], tokenizer=False)
    cfg = LoraConfig(rank=3, alpha=5, use_rslora=True,
                     targets=("key", "attention_output", "intermediate", "output"))
    train_pooler = mt == "bert"
    peft = make_peft("lora", cfg, train_pooler=train_pooler)
    model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    params = _perturb_lora(params)
    if train_pooler:
        params["bert"]["pooler"]["dense"]["bias"] = params["bert"]["pooler"]["dense"]["bias"] + 0.3
    export_peft(tmp_path, peft, params, base_model=str(tiny_dirs[mt]))
    args = random_batch(mt, pairs=(mt == "bert"))
    np.testing.assert_allclose(_peft_logits(tiny_dirs[mt], tmp_path, args),
                               _logits(model, params, args), atol=1e-4, rtol=0)


# LoRA's gradients against peft's: tests/test_peft_family.py::test_gradients_match_peft[lora].


@pytest.mark.parametrize("mt", ["bert", "roberta"])
def test_regression_target_map_survives_adapter_and_export(tmp_path, mt):
    """A regression head with the label map (std * y + mean): adapter files restore it and
    the peft export folds it into the head, so PyTorch predicts the same values."""
    cls = {"bert": transformers.BertForSequenceClassification,
           "roberta": transformers.RobertaForSequenceClassification}[mt]
    base_dir = tmp_path / "base"
    save_torch_model(cls, tiny_hf_config(mt, num_labels=1), base_dir)
    pre = jaxpeft.load_pretrained(base_dir, tokenizer=False)
    target = (2.7, 1.5)
    peft = make_peft("lora", LoraConfig(rank=2, alpha=4))
    lora_model, params = peft.init(pre.model, pre.params, jax.random.key(0))
    model = peft.attach(pre.model.clone(runtime=Runtime(target_mean=target[0],
                                                        target_std=target[1])))
    params = _perturb_lora(params)
    args = random_batch(mt)
    ours = _logits(model, params, args)
    np.testing.assert_allclose(ours, _logits(lora_model, params, args) * target[1] + target[0],
                               atol=1e-5)
    save_adapter(tmp_path / "ad", peft, params, base_model=str(base_dir), config=pre.config,
                 target=target)
    m2, p2, _ = load_adapter(tmp_path / "ad", jaxpeft.load_pretrained(base_dir, tokenizer=False))
    np.testing.assert_array_equal(_logits(m2, p2, args), ours)
    export_peft(tmp_path / "peft", peft, params, base_model=str(base_dir), target=target)
    np.testing.assert_allclose(_peft_logits(base_dir, tmp_path / "peft", args, num_labels=1),
                               ours, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_loraplus_scales_the_b_learning_rate(tiny_dirs, method):
    """LoRA+: from the same start and gradients, --loraplus_lr_ratio=4 makes every lora_b
    step exactly 4x the plain LoRA step and leaves every other step unchanged."""
    pre = jaxpeft.load_pretrained(tiny_dirs["bert"], tokenizer=False)
    ids, attn, types = random_batch("bert", batch=8)
    batch = {"input_ids": ids, "attention_mask": attn, "token_type_ids": types,
             "labels": np.arange(8) % 2, "weights": np.ones(8, np.float32)}
    moved = {}
    for ratio in (0.0, 4.0):
        peft = make_peft(method, LoraConfig(rank=4, loraplus_lr_ratio=ratio))
        model, params = peft.init(pre.model, pre.params, jax.random.key(0))
        mask = peft.mask(params)
        tx = make_optimizer(OptimConfig(learning_rate=1e-3, total_steps=10, max_grad_norm=0.0),
                            mask, peft.lr_multipliers(params))
        state, frozen = create_train_state(params, mask, tx)
        state, _ = make_train_step(model, tx)(state, batch, jax.random.key(0), frozen)
        after = traverse_util.flatten_dict(jax.device_get(state.trainable))
        before = traverse_util.flatten_dict(jax.device_get(params))
        steps = {p: np.abs(after[p] - before[p]) for p in after if after[p] is not None}
        moved[ratio] = {kind: np.concatenate([s[s > 0] for p, s in steps.items()
                                              if (p[-1] == "lora_b") == (kind == "b")])
                        for kind in ("b", "other")}
    assert len(moved[4.0]["b"]) == len(moved[0.0]["b"]) > 0
    np.testing.assert_allclose(moved[4.0]["b"], 4 * moved[0.0]["b"], rtol=1e-5)
    np.testing.assert_allclose(moved[4.0]["other"], moved[0.0]["other"], rtol=1e-6)
    assert np.median(moved[0.0]["b"]) == pytest.approx(1e-3, rel=0.05)  # Adam: about lr
    with pytest.raises(JaxpeftError, match="LoRA\\+ learning-rate ratio must be >= 0"):
        LoraConfig(loraplus_lr_ratio=-1.0)
