"""AdaLoRA against peft's ADALORA: counts, export and import, the loss with its
orthogonality penalty and its gradients, and whole training runs (AdamW, the rank allocator's
budget schedule) step for step; the schedule itself and the options' checks."""

import jax
import numpy as np
import optax
import pytest

import jaxpeft
from jaxpeft.errors import JaxpeftError
from jaxpeft.peft import combine, export_peft, make_peft
from jaxpeft.peft.adalora import AdaloraConfig, rank_allocator
from jaxpeft.peft.hf_export import peft_tensors
from jaxpeft.peft.hf_import import import_peft
from jaxpeft.train import create_train_state, make_train_step
from tests.helpers import loss_and_grads, moved_off_start, save_tiny_bert, stsb_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")


def _trained(pre, options, scale=0.05, seed=1):
    return moved_off_start(pre, make_peft("adalora", options), scale, seed)


def _peft_config(options, total_step, **kw):
    return hf_peft.AdaLoraConfig(
        task_type="SEQ_CLS", init_r=options.init_r, target_r=options.target_r,
        lora_alpha=options.alpha, target_modules=["query", "value"], tinit=options.tinit,
        tfinal=options.tfinal, deltaT=options.delta_t, beta1=options.beta1,
        beta2=options.beta2, orth_reg_weight=options.orth_reg, total_step=total_step, **kw)


def _torch_model(base_dir, num_labels=2):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=num_labels)


def _args(enc):
    return tuple(enc[k] for k in ("input_ids", "attention_mask", "token_type_ids"))


def test_counts_equal_peft(minilm, minilm_dir):
    peft, _, params = _trained(minilm, AdaloraConfig())
    theirs = hf_peft.get_peft_model(_torch_model(minilm_dir), _peft_config(
        AdaloraConfig(), 100)).get_nb_trainable_parameters()[0]
    assert peft.count(params).trainable == theirs == 12 * (384 + 1 + 384) * 12 + 770


def test_export_loads_in_peft_with_same_logits_and_imports_back(minilm, minilm_dir,
                                                                sst2_batch, tmp_path):
    peft, model, params = _trained(minilm, AdaloraConfig(init_r=6, target_r=2))
    export_peft(tmp_path, peft, params, base_model=str(minilm_dir))
    from safetensors.numpy import load_file
    config = hf_peft.PeftConfig.from_pretrained(tmp_path)
    fresh = hf_peft.get_peft_model(_torch_model(minilm_dir), config)
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == set(
        hf_peft.get_peft_model_state_dict(fresh))
    tm = hf_peft.PeftModel.from_pretrained(_torch_model(minilm_dir), tmp_path).eval()
    with torch.no_grad():
        theirs = tm(**{k: torch.tensor(v) for k, v in zip(
            ("input_ids", "attention_mask", "token_type_ids"), sst2_batch)}).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, *sst2_batch, deterministic=True))
    base = np.asarray(minilm.model.apply({"params": minilm.params}, *sst2_batch,
                                         deterministic=True))
    assert np.abs(ours - base).max() > 1e-3
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    model2, params2, peft2 = import_peft(tmp_path, minilm)
    assert peft2.name == "adalora" and peft2.options.init_r == 6
    np.testing.assert_allclose(np.asarray(model2.apply({"params": params2}, *sst2_batch,
                                                       deterministic=True)), ours, atol=1e-5)
    merged_model, merged = peft.merge(model, params)
    np.testing.assert_allclose(np.asarray(merged_model.apply(
        {"params": merged}, *sst2_batch, deterministic=True)), ours, atol=1e-5, rtol=0)


def test_masked_triplets_export_pruned_as_peft_saves_them(minilm, minilm_dir, sst2_batch,
                                                          tmp_path):
    """Triplets the allocator masked (E exactly 0) leave the file, named by `rank_pattern`,
    as in peft's own save after an allocation: peft loads it with our logits and saves it
    again tensor for tensor; the import puts zeros back at full rank."""
    from flax import traverse_util
    from safetensors.numpy import load_file

    peft, model, params = _trained(minilm, AdaloraConfig(init_r=4, target_r=2))
    flat = dict(traverse_util.flatten_dict(params))
    values = sorted(p for p in flat if p[-1] == "adalora_e")
    for i, path in enumerate(values):  # layer by layer, 0 to 3 of the 4 triplets masked
        flat[path] = flat[path].at[:i % 4].set(0.0)
    params = traverse_util.unflatten_dict(flat)
    export_peft(tmp_path / "ours", peft, params, base_model=str(minilm_dir))
    config = hf_peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert sorted(config.rank_pattern) == sorted(
        "bert." + ".".join(p[1:-1]).replace("layer_", "layer.") + ".lora_E" for p in values)
    assert sum(map(sum, config.rank_pattern.values())) == sum(4 - i % 4 for i in
                                                              range(len(values)))
    tm = hf_peft.PeftModel.from_pretrained(_torch_model(minilm_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = tm(**{k: torch.tensor(v) for k, v in zip(
            ("input_ids", "attention_mask", "token_type_ids"), sst2_batch)}).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, *sst2_batch, deterministic=True))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    tm.save_pretrained(tmp_path / "resaved")
    mine, peft_own = (load_file(str(tmp_path / d / "adapter_model.safetensors"))
                      for d in ("ours", "resaved"))
    assert set(mine) == set(peft_own)
    for key, value in mine.items():
        np.testing.assert_array_equal(value, peft_own[key], err_msg=key)
    assert hf_peft.PeftConfig.from_pretrained(tmp_path / "resaved").rank_pattern == \
        config.rank_pattern
    model2, params2, _ = import_peft(tmp_path / "ours", minilm)
    np.testing.assert_allclose(np.asarray(model2.apply({"params": params2}, *sst2_batch,
                                                       deterministic=True)), ours, atol=1e-6)


@pytest.mark.slow
def test_loss_with_penalty_and_gradients_match_peft(minilm_dir, glue_dir, tmp_path):
    """peft adds the orthogonality penalty to the loss: the same loss and gradients."""
    pre = jaxpeft.load_pretrained(minilm_dir, num_labels=1)
    options = AdaloraConfig(init_r=6, target_r=2, orth_reg=0.5)
    peft, model, params = _trained(pre, options, scale=0.02)
    args, y = stsb_batch(pre, glue_dir)
    loss, grads = loss_and_grads(model, params, peft, args, y, penalty=True)
    tm = hf_peft.get_peft_model(_torch_model(minilm_dir, 1), _peft_config(options, 100))
    hf_peft.set_peft_model_state_dict(tm, {k: torch.tensor(v) for k, v in
                                           peft_tensors(peft, params).items()})
    tm.eval()
    out = tm(**{k: torch.tensor(v) for k, v in zip(
        ("input_ids", "attention_mask", "token_type_ids"), args)}, labels=torch.tensor(y))
    out.loss.backward()
    np.testing.assert_allclose(float(loss), float(out.loss.detach()), rtol=1e-6)
    ref = {n.replace(".modules_to_save.default", "").replace(".default", ""): p.grad.numpy()
           for n, p in tm.named_parameters() if p.requires_grad}
    ours = peft_tensors(peft, grads)
    assert set(ref) == set(ours)
    for name, r in ref.items():
        np.testing.assert_allclose(ours[name], r, atol=1e-5 * np.abs(r).max(), rtol=0,
                                   err_msg=name)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, minilm_dir):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_nodrop"), minilm_dir, hidden_size=32,
                          intermediate_size=64, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("delta_t", [1, 2])
def test_training_with_the_rank_allocator_matches_peft(tiny_dir, glue_dir, delta_t):
    """12 AdamW steps on real SST-2 batches with peft's `update_and_allocate` after each:
    the same masked triplets at every step (budget phase, then the fixed pattern) and the
    same parameters at the end."""
    pre = jaxpeft.load_pretrained(tiny_dir, num_labels=2)
    total = 12
    options = AdaloraConfig(init_r=4, target_r=2, tinit=2, tfinal=3, delta_t=delta_t)
    peft, model, params = _trained(pre, options, scale=0.1)
    lines = (glue_dir / "SST-2" / "train.tsv").read_text().splitlines()[1:97]
    batches = []
    for i in range(0, 96, 16):
        chunk = [l.split("\t") for l in lines[i:i + 16]]
        enc = pre.tokenizer([c[0] for c in chunk], padding="max_length", max_length=40,
                            truncation=True, return_tensors="np")
        batches.append((*_args(enc), np.array([int(c[1]) for c in chunk])))

    tm = hf_peft.get_peft_model(_torch_model(tiny_dir), _peft_config(options, total))
    hf_peft.set_peft_model_state_dict(tm, {k: torch.tensor(v) for k, v in
                                           peft_tensors(peft, params).items()})
    tm.eval()  # no dropout (there is none): the same function on both sides
    opt = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    mask = peft.mask(params)
    tx = rank_allocator(optax.adamw(1e-2, weight_decay=0.0), options, total)
    state, frozen = create_train_state(params, mask, tx)
    step_fn = make_train_step(model, tx, penalty=peft.penalty)
    kept = []
    for step in range(total):
        ids, att, types, labels = batches[step % len(batches)]
        out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(att),
                 token_type_ids=torch.tensor(types), labels=torch.tensor(labels))
        out.loss.backward()
        opt.step()
        tm.base_model.update_and_allocate(step)
        opt.zero_grad()
        batch = {"input_ids": ids, "attention_mask": att, "token_type_ids": types,
                 "labels": labels, "weights": np.ones(16, np.float32)}
        state, metrics = step_fn(state, batch, jax.random.key(0), frozen)
        np.testing.assert_allclose(float(metrics["loss"]), float(out.loss.detach()),
                                   rtol=2e-5, err_msg=f"step {step}")
        ours = peft_tensors(peft, combine(state.trainable, frozen))
        theirs = {n.replace(".modules_to_save.default", "").replace(".default", ""):
                  p.detach().numpy() for n, p in tm.named_parameters() if p.requires_grad}
        values = [n for n in ours if n.endswith("lora_E")]
        for n in values:
            np.testing.assert_array_equal(ours[n] == 0, theirs[n] == 0,
                                          err_msg=f"step {step}: {n}")
        kept.append(sum(int((ours[n] != 0).sum()) for n in values))
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, atol=2e-4 * max(np.abs(value).max(), 1),
                                   rtol=0, err_msg=name)
    # Full budget (8 triplets of 4) through tinit, target (2 × 4 = 8 of 16) from the end of
    # the budget phase, which was reached.
    assert kept[0] == 16 and kept[-1] == 8 and min(kept) == 8


def test_schedule_and_options():
    budget, allocate = AdaloraConfig(init_r=12, target_r=4, tinit=10, tfinal=20,
                                     delta_t=5).schedule(100)
    assert budget[10] == 1.0 and not allocate[:11].any()
    assert budget[80] == 0.0 and allocate[80] and allocate[81:].all()
    assert allocate[15] and not allocate[16] and 0 < budget[15] < 1
    with pytest.raises(JaxpeftError, match="leave no budget phase"):
        AdaloraConfig(tinit=50, tfinal=50).schedule(100)
    with pytest.raises(JaxpeftError, match="exceeds"):
        AdaloraConfig(init_r=4, target_r=8)
    with pytest.raises(JaxpeftError, match="--adalora_beta1"):
        AdaloraConfig(beta1=1.0)


class _Kill(Exception):
    pass


@pytest.mark.slow
def test_run_resumes_exactly(tiny_model, glue_dir, tmp_path):
    """Through the run loop (12 steps): a run killed in the budget phase and resumed (the
    allocator's scores and step count are in the optimizer state, checkpointed) ends as the
    uninterrupted one."""
    from jaxpeft.config import RunConfig
    from jaxpeft.run import train_and_evaluate
    from tests.helpers import comparable_rows, run_config

    ada = dict(method="adalora", adalora_init_r=4, adalora_target_r=2, adalora_tinit=2,
               adalora_tfinal=3, learning_rate=1e-2)
    full = train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "a", **ada))

    def kill_at_6(step):
        if step == 6:
            raise _Kill()

    cfg = run_config(tiny_model, glue_dir, tmp_path / "b", **ada)
    with pytest.raises(_Kill):
        train_and_evaluate(cfg, on_step=kill_at_6)
    resumed = train_and_evaluate(RunConfig(**{**cfg.__dict__, "resume": True}))
    assert resumed["final"] == full["final"] and resumed["best"] == full["best"]
    assert comparable_rows(tmp_path / "b" / "run") == comparable_rows(tmp_path / "a" / "run")


@pytest.mark.slow
def test_peft_trained_adapter_with_a_rank_pattern_imports(tiny_dir, glue_dir, tmp_path):
    """An adapter trained in PyTorch through peft's final phase is saved pruned to its
    rank pattern; imported, it gives peft's logits."""
    pre = jaxpeft.load_pretrained(tiny_dir, num_labels=2)
    options = AdaloraConfig(init_r=4, target_r=2, tinit=1, tfinal=2)
    torch.manual_seed(0)
    tm = hf_peft.get_peft_model(_torch_model(tiny_dir), _peft_config(options, 6))
    lines = (glue_dir / "SST-2" / "train.tsv").read_text().splitlines()[1:17]
    enc = pre.tokenizer([l.split("\t")[0] for l in lines], padding=True, return_tensors="np")
    inputs = {k: torch.tensor(v) for k, v in zip(
        ("input_ids", "attention_mask", "token_type_ids"), _args(enc))}
    labels = torch.tensor([int(l.split("\t")[1]) for l in lines])
    opt = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=1e-2)
    tm.eval()
    for step in range(6):
        tm(**inputs, labels=labels).loss.backward()
        opt.step()
        tm.base_model.update_and_allocate(step)
        opt.zero_grad()
    tm.save_pretrained(tmp_path)
    config = hf_peft.PeftConfig.from_pretrained(tmp_path)
    assert config.rank_pattern  # the saved tensors are pruned
    with torch.no_grad():
        theirs = tm(**inputs).logits.numpy()
    model, params, peft = import_peft(tmp_path, pre)
    ours = np.asarray(model.apply({"params": params}, *_args(enc), deterministic=True))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
