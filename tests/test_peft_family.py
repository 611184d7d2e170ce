"""DoRA, IA3, VeRA, LN-tuning, prompt tuning, LoHa, LoKr, OFT, FourierFT and BOFT (and LoRA,
as the reference, also on peft's all-linear targets) against Hugging Face peft: trainable
counts, exported adapters that peft loads with exactly its own keys and the same logits, the
same gradients, and merged models equal to unmerged ones."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import traverse_util

import jaxpeft
from jaxpeft.peft import LoraConfig, export_peft, make_peft
from jaxpeft.peft.hf_export import peft_tensors
from jaxpeft.peft.boft import BoftConfig
from jaxpeft.peft.fourierft import FourierftConfig
from jaxpeft.peft.ia3 import Ia3Config
from jaxpeft.peft.loha import LohaConfig
from jaxpeft.peft.lokr import LokrConfig, kron_factors
from jaxpeft.peft.oft import OftConfig
from jaxpeft.peft.prompt import PromptConfig
from jaxpeft.peft.vera import VeraConfig
from tests.helpers import loss_and_grads, moved_off_start, random_batch, stsb_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

PEFT_SET = Ia3Config(("key", "value", "output", "attention_output"))  # peft's BERT default
# (method, our options, the same configuration in peft)
CASES = {
    "lora": (LoraConfig(rank=8, alpha=16),
             lambda: hf_peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                        target_modules=["query", "value"])),
    "dora": (LoraConfig(rank=8, alpha=16),
             lambda: hf_peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                        target_modules=["query", "value"], use_dora=True)),
    # peft's bias option: every bias trains (LoRA), those of the adapted layers (DoRA)
    "lora bias": (LoraConfig(rank=8, alpha=16, bias="all"),
                  lambda: hf_peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                             target_modules=["query", "value"], bias="all")),
    "dora bias": (LoraConfig(rank=8, alpha=16, bias="lora_only"),
                  lambda: hf_peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                             target_modules=["query", "value"], use_dora=True,
                                             bias="lora_only")),
    # peft's all-linear: every layer's Dense layers and BERT's pretrained pooler
    "lora all-linear": (LoraConfig(rank=8, alpha=16, targets=("all-linear",)),
                        lambda: hf_peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                   target_modules="all-linear")),
    "ia3": (PEFT_SET, lambda: hf_peft.IA3Config(task_type="SEQ_CLS")),
    "ia3 pooler": (Ia3Config(("key", "value", "output", "attention_output", "pooler")),
                   lambda: hf_peft.IA3Config(task_type="SEQ_CLS",
                                             target_modules=["key", "value", "output.dense",
                                                             "pooler.dense"],
                                             feedforward_modules=["output.dense"])),
    "vera": (VeraConfig(rank=256),
             lambda: hf_peft.VeraConfig(task_type="SEQ_CLS", r=256,
                                        target_modules=["query", "value"], save_projection=True)),
    "ln_tuning": (None, lambda: hf_peft.LNTuningConfig(task_type="SEQ_CLS",
                                                       target_modules=["LayerNorm"])),
    "loha": (LohaConfig(rank=8, alpha=16),
             lambda: hf_peft.LoHaConfig(task_type="SEQ_CLS", r=8, alpha=16,
                                        target_modules=["query", "value"])),
    "lokr": (LokrConfig(rank=8, alpha=16),
             lambda: hf_peft.LoKrConfig(task_type="SEQ_CLS", r=8, alpha=16,
                                        target_modules=["query", "value"])),
    "oft": (OftConfig(block_size=32),
            lambda: hf_peft.OFTConfig(task_type="SEQ_CLS", r=0, oft_block_size=32,
                                      target_modules=["query", "value"])),
    "boft": (BoftConfig(block_size=4),
             lambda: hf_peft.BOFTConfig(task_type="SEQ_CLS", boft_block_size=4,
                                        boft_n_butterfly_factor=1,
                                        target_modules=["query", "value"])),
    # with peft's per-layer count for one layer, so counts, export, gradients check it too
    "fourierft": (FourierftConfig(n_frequency=1000,
                                  n_frequency_pattern=("layer.0.attention.self.query=300",)),
                  lambda: hf_peft.FourierFTConfig(
                      task_type="SEQ_CLS", n_frequency=1000, target_modules=["query", "value"],
                      n_frequency_pattern={"layer.0.attention.self.query": 300})),
    # peft's head reads the first virtual token: --prompt_head=virtual
    "prompt": (PromptConfig(num_virtual_tokens=20, head="virtual"),
               lambda: hf_peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20,
                                                  prompt_tuning_init="SAMPLE_VOCAB")),
}


def _trained(pre, method, scale=0.05, seed=1):
    """`(peft, model, params)` of a `CASES` entry (its method: the first word) with every
    trainable leaf moved off its initial value."""
    return moved_off_start(pre, make_peft(method.split()[0], CASES[method][0]), scale, seed)


def _torch_model(base_dir, num_labels=2):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=num_labels)


def _torch_logits(model, args):
    with torch.no_grad():
        return model(input_ids=torch.tensor(args[0]), attention_mask=torch.tensor(args[1]),
                     token_type_ids=torch.tensor(args[2])).logits.numpy()


@pytest.mark.parametrize("method,expected", [("lora", 74_498), ("dora", 79_106),
                                             ("lora bias", 100_610), ("dora bias", 83_714),
                                             ("lora all-linear", 338_690), ("ia3", 16_898),
                                             ("ia3 pooler", 17_282), ("vera", 8_450),
                                             ("ln_tuning", 10_754), ("prompt", 8_450),
                                             ("loha", 148_226), ("lokr", 8_450),
                                             ("oft", 72_194), ("fourierft", 12_070),
                                             ("boft", 23_810)])
def test_counts_equal_peft(minilm, minilm_dir, method, expected):
    peft, _, params = _trained(minilm, method)
    trainable, _ = hf_peft.get_peft_model(_torch_model(minilm_dir),
                                          CASES[method][1]()).get_nb_trainable_parameters()
    assert peft.count(params).trainable == trainable == expected


def test_ia3_default_targets_are_the_papers(minilm):
    peft = make_peft("ia3")
    _, params = peft.init(minilm.model, minilm.params, jax.random.key(0))
    # key, value (384 each) and the FFN output's input (1536) in 6 layers, plus the head
    assert peft.count(params).trainable == 6 * (384 + 384 + 1536) + 770 == 14_594


def _check_export(pre, base_dir, method, args, tmp_path, trained=None):
    peft, model, params = trained or _trained(pre, method)
    export_peft(tmp_path, peft, params, base_model=str(base_dir))
    # peft only warns about missing keys: compare with the keys peft itself would save.
    from safetensors.numpy import load_file
    config = hf_peft.PeftConfig.from_pretrained(tmp_path)
    fresh = hf_peft.get_peft_model(_torch_model(base_dir), config)
    expected = set(hf_peft.get_peft_model_state_dict(fresh))
    saved = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    # peft's bias="all" file also holds two more copies of the head's bias (its wrapper's
    # trained copy and the untrained original), which carry nothing the export lacks.
    assert saved <= expected and all(
        re.search(r"\.(?:modules_to_save|original_module)\.(?:\w+\.)*bias$", k)
        for k in expected - saved)
    theirs = _torch_logits(hf_peft.PeftModel.from_pretrained(_torch_model(base_dir),
                                                             tmp_path).eval(), args)
    ours = np.asarray(model.apply({"params": params}, *args, deterministic=True))
    base = np.asarray(pre.model.apply({"params": pre.params}, *args, deterministic=True))
    assert np.abs(ours - base).max() > 1e-3  # the adapter really changes the output
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


EXPORTED = ["dora", "lora bias", "dora bias", "lora all-linear", "ia3", "ia3 pooler", "vera",
            "ln_tuning", "prompt", "loha", "lokr", "oft", "fourierft", "boft"]


@pytest.mark.parametrize("method", EXPORTED)
def test_export_loads_in_peft_with_same_logits_minilm(minilm, minilm_dir, sst2_batch, method,
                                                      tmp_path):
    _check_export(minilm, minilm_dir, method, sst2_batch, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in EXPORTED if m != "ia3 pooler"])  # no pooler
def test_export_loads_in_peft_with_same_logits_roberta(tiny_roberta, method, tmp_path):
    pre = jaxpeft.load_pretrained(tiny_roberta, tokenizer=False)
    _check_export(pre, tiny_roberta, method, random_batch("roberta"), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "lora bias", "dora bias", "lora all-linear",
                                    "ia3", "ia3 pooler", "vera",
                                    "ln_tuning", "prompt", "loha", "lokr", "oft", "fourierft",
                                    "boft"])
def test_gradients_match_peft(minilm_dir, glue_dir, method, tmp_path):
    """Loss and every trainable gradient equal PyTorch peft's on a real STS-B batch."""
    pre = jaxpeft.load_pretrained(minilm_dir, num_labels=1)
    peft, model, params = _trained(pre, method, scale=0.01)
    export_peft(tmp_path, peft, params, base_model=str(minilm_dir))
    args, y = stsb_batch(pre, glue_dir)
    loss, grads = loss_and_grads(model, params, peft, args, y)
    # peft refuses is_trainable for prompt learning: the same parameters are set by hand.
    prompt = method == "prompt"
    tm = hf_peft.PeftModel.from_pretrained(_torch_model(minilm_dir, 1), tmp_path,
                                           is_trainable=not prompt).eval()
    if prompt:
        for n, p in tm.named_parameters():
            p.requires_grad_("prompt_encoder" in n or "modules_to_save" in n)
    out = tm(**{k: torch.tensor(v) for k, v in zip(("input_ids", "attention_mask",
                                                    "token_type_ids"), args)},
             labels=torch.tensor(y))
    out.loss.backward()
    ref = {n.replace(".modules_to_save.default", "").replace(".default", "")
           .replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
           .replace("prompt_encoder.embedding.weight", "prompt_embeddings"): p.grad.numpy()
           for n, p in tm.named_parameters() if p.requires_grad}
    np.testing.assert_allclose(float(loss), float(out.loss.detach()), rtol=1e-6)
    # Our gradients under peft's names and layouts: the export's own mapping, applied to the
    # gradient tree (frozen places hold the frozen values, which are not compared).
    ours = peft_tensors(peft, grads)
    for name, r in ref.items():
        # A key bias's gradient is zero in exact arithmetic (the softmax does not see a
        # shift shared by all keys): both sides hold rounding noise, compared to a floor.
        np.testing.assert_allclose(ours[name], r, atol=1e-5 * max(np.abs(r).max(), 1e-3),
                                   rtol=0, err_msg=name)
    trainable_leaves = sum(traverse_util.flatten_dict(peft.mask(params)).values())
    assert set(ref) <= set(ours) and len(ref) == trainable_leaves


@pytest.mark.parametrize("method", ["dora", "lora bias", "dora bias", "lora all-linear", "ia3",
                                    "ia3 pooler", "vera", "loha", "lokr", "oft", "fourierft",
                                    "boft"])
def test_merged_equals_unmerged(minilm, sst2_batch, method):
    peft, model, params = _trained(minilm, method)
    plain, merged = peft.merge(model, params)
    leaves = {p[-1] for p in traverse_util.flatten_dict(merged)}
    assert not leaves & {"lora_a", "lora_b", "lora_magnitude", "ia3_in", "ia3_out",
                         "vera_A", "vera_B", "vera_lambda_d", "vera_lambda_b", "loha_u1", "loha_v1",
                         "loha_u2", "loha_v2", "lokr_w1", "lokr_w2_a", "lokr_w2_b", "oft_q",
                         "fourierft_spectrum", "boft_r", "boft_s"}
    unmerged = np.asarray(model.apply({"params": params}, *sst2_batch, deterministic=True))
    np.testing.assert_allclose(np.asarray(plain.apply({"params": merged}, *sst2_batch,
                                                      deterministic=True)),
                               unmerged, atol=1e-5, rtol=0)


def test_dora_starts_equal_to_the_base_model(minilm, sst2_batch):
    peft = make_peft("dora", LoraConfig(rank=4, alpha=8, targets=("query", "value", "output")))
    model, params = peft.init(minilm.model, minilm.params, jax.random.key(0))
    np.testing.assert_allclose(
        np.asarray(model.apply({"params": params}, *sst2_batch, deterministic=True)),
        np.asarray(minilm.model.apply({"params": minilm.params}, *sst2_batch,
                                      deterministic=True)), atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "vera", "ln_tuning", "loha",
                                    "lokr", "oft"])
@pytest.mark.parametrize("base", ["minilm", "roberta"])
def test_merged_export_loads_in_plain_transformers(minilm, minilm_dir, sst2_batch, tiny_roberta,
                                                   method, base, tmp_path):
    """--export_merged: a plain *ForSequenceClassification folder, no missing keys, same
    logits (regression target map folded into the head on the RoBERTa case)."""
    from jaxpeft.peft import export_merged

    if base == "minilm":
        pre, base_dir, args, target = minilm, minilm_dir, sst2_batch, None
    else:
        pre = jaxpeft.load_pretrained(tiny_roberta, tokenizer=False, num_labels=1)
        base_dir, args, target = tiny_roberta, random_batch("roberta"), (2.5, 1.5)
    peft, model, params = _trained(pre, method)
    if target is not None:
        model = model.clone(runtime=model.runtime.__class__(
            hooks=model.runtime.hooks, target_mean=target[0], target_std=target[1]))
    export_merged(tmp_path, peft, params, base_dir=base_dir, tokenizer=pre.tokenizer,
                  target=target)
    loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(loaded).__name__.endswith("ForSequenceClassification")
    ours = np.asarray(model.apply({"params": params}, *args, deterministic=True))
    np.testing.assert_allclose(_torch_logits(loaded.eval(), args), ours, atol=1e-4, rtol=0)


def test_methods_that_do_not_merge_refuse_the_merged_export(minilm, tmp_path):
    from jaxpeft.errors import JaxpeftError
    from jaxpeft.peft import export_merged

    for method in ("prompt", "adapter_houlsby"):
        peft = make_peft(method)
        _, params = peft.init(minilm.model, minilm.params, jax.random.key(0))
        with pytest.raises(JaxpeftError, match="cannot be merged"):
            export_merged(tmp_path, peft, params, base_dir=".", tokenizer=None)


def test_lokr_factors_are_peft_s():
    from peft.tuners.lokr.layer import factorization

    for dim in (1, 2, 7, 32, 37, 64, 384, 768, 1024, 1536, 3072, 4096):
        for factor in (-1, 1, 2, 4, 8, 16, 5):
            assert kron_factors(dim, factor) == factorization(dim, factor), (dim, factor)


def test_lokr_low_rank_first_factor_matches_peft(minilm, minilm_dir, sst2_batch, tmp_path):
    """`--lokr_decompose_both` with a split factor: both Kronecker factors low-rank (r=2 is
    under half of 8), the same count, keys and logits as peft."""
    options = LokrConfig(rank=2, alpha=4, targets=("query", "value", "output"),
                         decompose_both=True, decompose_factor=8)
    peft = make_peft("lokr", options)
    model, params = peft.init(minilm.model, minilm.params, jax.random.key(0))
    flat = traverse_util.flatten_dict(params)
    params = traverse_util.unflatten_dict({p: v + 0.05 * jax.random.normal(
        jax.random.key(i), v.shape) if p[-1].startswith("lokr_") else v
        for i, (p, v) in enumerate(sorted(flat.items()))})
    assert {p[-1] for p in flat if p[-1].startswith("lokr_")} == {
        "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    config = hf_peft.LoKrConfig(task_type="SEQ_CLS", r=2, alpha=4, decompose_both=True,
                                decompose_factor=8,
                                target_modules=r".*\.(query|value|[0-9]+\.output\.dense)")
    theirs_model = hf_peft.get_peft_model(_torch_model(minilm_dir), config)
    assert peft.count(params).trainable == theirs_model.get_nb_trainable_parameters()[0]
    export_peft(tmp_path, peft, params, base_model=str(minilm_dir))
    from safetensors.numpy import load_file
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == set(
        hf_peft.get_peft_model_state_dict(theirs_model))
    theirs = _torch_logits(hf_peft.PeftModel.from_pretrained(_torch_model(minilm_dir),
                                                             tmp_path).eval(), sst2_batch)
    ours = np.asarray(model.apply({"params": params}, *sst2_batch, deterministic=True))
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_lora_init_from_the_kernel_matches_peft(minilm, minilm_dir, sst2_batch, init, tmp_path):
    """PiSSA and OLoRA: the residual base (W − scale·a0 b0) equals the one peft makes in
    place, the model starts as the base, and a trained adapter exports as a rank-2r plain
    LoRA that peft loads on the unchanged base with our logits; merged equals unmerged."""
    options = LoraConfig(rank=8, alpha=16, targets=("query", "value"), init=init)
    peft = make_peft("lora", options)
    model, params = peft.init(minilm.model, minilm.params, jax.random.key(0))
    tm = hf_peft.get_peft_model(_torch_model(minilm_dir), hf_peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"],
        init_lora_weights=init))
    assert peft.count(params).trainable == tm.get_nb_trainable_parameters()[0]
    query = params["bert"]["encoder"]["layer_3"]["attention"]["self"]["query"]
    residual = np.asarray(query["kernel"] - options.scale * query["lora_a0"] @ query["lora_b0"])
    theirs = tm.base_model.model.bert.encoder.layer[3].attention.self.query.base_layer.weight
    np.testing.assert_allclose(residual, theirs.detach().numpy().T, atol=2e-6, rtol=0)
    base = np.asarray(minilm.model.apply({"params": minilm.params}, *sst2_batch,
                                         deterministic=True))
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, *sst2_batch,
                                                      deterministic=True)), base, atol=1e-5)
    peft, model, params = moved_off_start(minilm, peft)
    export_peft(tmp_path, peft, params, base_model=str(minilm_dir))
    from safetensors.numpy import load_file
    config = hf_peft.PeftConfig.from_pretrained(tmp_path)
    assert config.r == 16 and config.lora_alpha == 32 and config.init_lora_weights is True
    expected = set(hf_peft.get_peft_model_state_dict(hf_peft.get_peft_model(
        _torch_model(minilm_dir), config)))
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == expected
    loaded = _torch_logits(hf_peft.PeftModel.from_pretrained(_torch_model(minilm_dir),
                                                             tmp_path).eval(), sst2_batch)
    ours = np.asarray(model.apply({"params": params}, *sst2_batch, deterministic=True))
    assert np.abs(ours - base).max() > 1e-3
    np.testing.assert_allclose(loaded, ours, atol=1e-5, rtol=0)
    plain, merged = peft.merge(model, params)
    np.testing.assert_allclose(np.asarray(plain.apply({"params": merged}, *sst2_batch,
                                                      deterministic=True)), ours, atol=1e-5)


def test_lora_gaussian_init_is_peft_s(minilm, minilm_dir, sst2_batch, tmp_path):
    """`--lora_init=gaussian`: lora_a normal with std 1/r (peft's), lora_b zero; the export
    names the init and loads in peft with our logits."""
    peft = make_peft("lora", LoraConfig(rank=8, alpha=16, init="gaussian"))
    _, params = peft.init(minilm.model, minilm.params, jax.random.key(0))
    a = np.concatenate([np.asarray(v).ravel() for p, v in traverse_util.flatten_dict(
        params).items() if p[-1] == "lora_a"])
    assert abs(a.std() - 1 / 8) < 0.005 and abs(a.mean()) < 0.005
    peft, model, params = moved_off_start(minilm, peft)
    export_peft(tmp_path, peft, params, base_model=str(minilm_dir))
    assert hf_peft.PeftConfig.from_pretrained(tmp_path).init_lora_weights == "gaussian"
    loaded = _torch_logits(hf_peft.PeftModel.from_pretrained(_torch_model(minilm_dir),
                                                             tmp_path).eval(), sst2_batch)
    np.testing.assert_allclose(loaded, np.asarray(model.apply(
        {"params": params}, *sst2_batch, deterministic=True)), atol=1e-5, rtol=0)


def test_dora_refuses_other_inits(minilm):
    from jaxpeft.errors import JaxpeftError

    with pytest.raises(JaxpeftError, match="DoRA starts from LoRA's default"):
        make_peft("dora", LoraConfig(init="pissa")).init(minilm.model, minilm.params,
                                                         jax.random.key(0))


@pytest.mark.parametrize("options", [LoraConfig(rank=4, alpha=8), LohaConfig(), LokrConfig(),
                                     BoftConfig(), FourierftConfig(), OftConfig()],
                         ids=lambda o: o.label)
def test_adapter_options_saved_before_newer_fields_still_load(options):
    """adapter.json files written before a field existed (LoRA's `init` and patterns, LoHa's
    and LoKr's dropouts and patterns, BOFT's dropout, FourierFT's pattern, OFT's `r`) lack
    it: they meant its default. Any
    other missing or unknown field stays an error."""
    from jaxpeft.errors import JaxpeftError

    assert type(options).added_fields
    saved = options.to_dict()
    for name in type(options).added_fields:
        del saved[name]
    assert type(options).from_dict(saved) == options
    del saved["targets"]
    with pytest.raises(JaxpeftError, match="do not match"):
        type(options).from_dict(saved)


def test_oft_exact_cayley_matches_peft(minilm, minilm_dir, sst2_batch, tmp_path):
    """`--oft_neumann_terms=0`: the exact Cayley transform (peft's use_cayley_neumann=False),
    on query, value and the FFN output with 16-feature blocks; rotations really orthogonal."""
    from jaxpeft.peft.oft import rotation

    peft = make_peft("oft", OftConfig(block_size=16, neumann_terms=0,
                                      targets=("query", "value", "output")))
    peft, model, params = moved_off_start(minilm, peft)
    q = params["bert"]["encoder"]["layer_0"]["output"]["dense"]["oft_q"]
    r = np.asarray(rotation(q, 16, 0))
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(16), r.shape),
                               atol=1e-5)
    export_peft(tmp_path, peft, params, base_model=str(minilm_dir))
    config = hf_peft.PeftConfig.from_pretrained(tmp_path)
    assert config.use_cayley_neumann is False
    loaded = _torch_logits(hf_peft.PeftModel.from_pretrained(_torch_model(minilm_dir),
                                                             tmp_path).eval(), sst2_batch)
    np.testing.assert_allclose(loaded, np.asarray(model.apply(
        {"params": params}, *sst2_batch, deterministic=True)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,k,seed", [(10, 10, 777), (384 * 384, 1000, 777),
                                      (384 * 1536, 500, 3), (32 * 96, 64, 0)])
def test_fourierft_positions_are_torch_s_randperm(n, k, seed):
    """peft draws FourierFT's positions with torch.randperm at every load: ours are the same."""
    from jaxpeft.peft.fourierft import torch_randperm_prefix
    want = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].numpy()
    np.testing.assert_array_equal(torch_randperm_prefix(n, k, seed), want)


@pytest.mark.parametrize("n,blocks,half,factors", [(384, 96, 2, 1), (384, 48, 2, 1),
                                                   (32, 4, 2, 2), (64, 8, 4, 1)])
def test_boft_butterfly_permutations_are_peft_s(n, blocks, half, factors):
    from jaxpeft.peft.boft import butterfly_perm
    from peft.tuners.boft.layer import BOFTLayer
    want = BOFTLayer.block_butterfly_perm(None, n, blocks, half, factors).numpy()
    np.testing.assert_array_equal(butterfly_perm(n, blocks, half, factors), want)


@pytest.mark.parametrize("options", [BoftConfig(block_size=4, butterfly_factors=2),
                                     BoftConfig(block_size=0, block_num=8, butterfly_factors=3)])
def test_boft_butterfly_rotation_is_peft_s(options):
    """m > 1 (peft runs it only with its CUDA extension): our rotation equals the one peft's
    own helpers build from the same boft_R, and is orthogonal."""
    from jaxpeft.peft.boft import rotation
    from peft.tuners.boft.layer import BOFTLayer
    n = 64
    num, size = options.blocks(n)
    r = np.asarray(0.3 * jax.random.normal(jax.random.key(0),
                                           (options.butterfly_factors, num, size, size)))
    layer = BOFTLayer.__new__(BOFTLayer)
    q = BOFTLayer.cayley_batch(layer, torch.tensor(r).view(-1, size, size)).view(r.shape)
    total = None
    for i in range(options.butterfly_factors):
        bd = torch.block_diag(*torch.unbind(q[i]))
        perm = BOFTLayer.block_butterfly_perm(None, n, int(num / 2 ** i), int(size / 2),
                                              options.butterfly_factors - 1)
        p = BOFTLayer.perm2mat(None, perm)
        m = p @ bd @ p.T
        total = m if total is None else m @ total
    ours = np.asarray(rotation(jax.numpy.asarray(r), options))
    np.testing.assert_allclose(ours, total.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours @ ours.T, np.eye(n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rescale", [True, False])
def test_lycoris_rank_and_module_dropout(rescale):
    """peft's LoHa/LoKr dropouts: each output column of ΔW kept or zeroed (the kept ones
    rescaled by the inverse kept fraction when asked), the whole update skipped at the
    module rate, nothing changed outside training."""
    import flax.linen as nn
    from jaxpeft.peft.loha import lycoris_dropout

    options = LohaConfig(rank_dropout=0.5, module_dropout=0.3)

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, delta, deterministic):
            return lycoris_dropout(self, delta, options, rescale, deterministic)

    delta = np.random.RandomState(0).randn(6, 40).astype(np.float32)
    np.testing.assert_array_equal(Probe().apply({}, delta, True), delta)
    skipped, fractions = 0, []
    for seed in range(300):
        out = np.asarray(Probe().apply({}, delta, False, rngs={"dropout": jax.random.key(seed)}))
        if not out.any():
            skipped += 1
            continue
        kept = out.any(axis=0)
        factor = 1 / kept.mean() if rescale else 1.0
        np.testing.assert_allclose(out[:, kept], delta[:, kept] * factor, rtol=1e-6)
        fractions.append(kept.mean())
    assert 0.22 < skipped / 300 < 0.38
    assert abs(np.mean(fractions) - 0.5) < 0.03


def test_boft_dropout_sets_one_factor_s_blocks_to_the_identity():
    """peft's multiplicative BOFT dropout: in one factor, int(rate · blocks) blocks become the
    identity, which is the rotation of the same R with those blocks zeroed."""
    from jaxpeft.peft.boft import identity_blocks, rotation

    options = BoftConfig(block_size=4, butterfly_factors=2, dropout=0.3)
    num, size = options.blocks(64)
    r = 0.3 * jax.random.normal(jax.random.key(0), (2, num, size, size))
    for seed in range(5):
        key = jax.random.key(seed)
        mask = np.asarray(identity_blocks(key, 2, num, 0.3))
        assert sorted(mask.sum(axis=1).tolist()) == [0, int(0.3 * num)]
        zeroed = jax.numpy.where(mask[..., None, None], 0.0, r)
        np.testing.assert_allclose(rotation(r, options, key),
                                   rotation(zeroed, options), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,options", [
    ("loha", LohaConfig(rank=8, alpha=16, rank_dropout=0.3, module_dropout=0.2)),
    ("lokr", LokrConfig(rank=8, alpha=16, rank_dropout=0.3, rank_dropout_scale=True)),
    ("boft", BoftConfig(block_size=4, dropout=0.5))])
def test_method_dropouts_change_training_forwards_only(minilm, sst2_batch, method, options):
    """With peft's dropouts set, evaluation is the model without them; a training forward
    differs from one without them under the same dropout key."""
    plain = dataclasses.replace(options, **{f: 0.0 for f in ("rank_dropout", "module_dropout",
                                                             "dropout") if hasattr(options, f)})
    runs = {}
    for name, opts in (("drop", options), ("plain", plain)):
        _, model, params = moved_off_start(minilm, make_peft(method, opts))
        key = {"dropout": jax.random.key(4)}
        runs[name] = [np.asarray(model.apply({"params": params}, *sst2_batch,
                                             deterministic=det, rngs=key))
                      for det in (True, False)]
    np.testing.assert_array_equal(runs["drop"][0], runs["plain"][0])
    assert np.abs(runs["drop"][1] - runs["plain"][1]).max() > 1e-4


def test_fourierft_n_frequency_pattern_is_peft_s_rule():
    """The first pattern matching the end of the transformers module name gives the count;
    malformed entries are refused by name."""
    from jaxpeft.errors import JaxpeftError

    options = FourierftConfig(n_frequency=100, n_frequency_pattern=(
        r"layer\.[01]\.attention\.self\.query=20", "query=30", "layer.1.output.dense=40"))
    layer = lambda i, *rest: ("bert", "encoder", f"layer_{i}") + rest  # noqa: E731
    assert options.n_for(layer(0, "attention", "self", "query")) == 20
    assert options.n_for(layer(2, "attention", "self", "query")) == 30
    assert options.n_for(layer(1, "output", "dense")) == 40
    assert options.n_for(layer(1, "attention", "output", "dense")) == 100  # not a suffix match
    assert options.n_for(layer(0, "attention", "self", "value")) == 100
    for bad, message in (("query", "is not PATTERN=VALUE"), ("query=0", "positive int"),
                         ("query=1.5", "positive int"), ("(=5", "is not a regex")):
        with pytest.raises(JaxpeftError, match=message):
            FourierftConfig(n_frequency_pattern=(bad,))


# per-layer ranks and alphas: rsLoRA scales, two patterns for the rank (the first match wins
# for layers 1-2's query), one for alpha
PATTERNED = LoraConfig(rank=8, alpha=16, targets=("query", "value", "intermediate"),
                       use_rslora=True, rank_pattern=(r"layer\.[12]\.attention\.self\.query=4",
                                                      "query=6", "intermediate.dense=2"),
                       alpha_pattern=("value=4",))


def _peft_patterned(use_dora):
    return hf_peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, use_rslora=True, use_dora=use_dora,
        target_modules=["query", "value", "intermediate.dense"],
        rank_pattern={r"layer\.[12]\.attention\.self\.query": 4, "query": 6,
                      "intermediate.dense": 2}, alpha_pattern={"value": 4})


LYCORIS_PATTERNS = {"rank_pattern": {r"layer\.[12]\.attention\.self\.query": 2,
                                     "value": 12},
                    "alpha_pattern": {"query": 3.0}}


def _patterned(method):
    """`(our options, peft's config)` of a method with rank and alpha patterns."""
    if method in ("lora", "dora"):
        return PATTERNED, _peft_patterned(method == "dora")
    ours = {"loha": LohaConfig, "lokr": LokrConfig}[method](
        rank=4, alpha=8, targets=("query", "value"),
        rank_pattern=tuple(f"{p}={v}" for p, v in LYCORIS_PATTERNS["rank_pattern"].items()),
        alpha_pattern=tuple(f"{p}={v}" for p, v in LYCORIS_PATTERNS["alpha_pattern"].items()))
    theirs = {"loha": hf_peft.LoHaConfig, "lokr": hf_peft.LoKrConfig}[method](
        task_type="SEQ_CLS", r=4, alpha=8, target_modules=["query", "value"],
        **LYCORIS_PATTERNS)
    return ours, theirs


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr"])
def test_rank_and_alpha_patterns_match_peft(minilm, minilm_dir, sst2_batch, method, tmp_path):
    """peft's rank_pattern / alpha_pattern: each layer's shapes and scale as peft gives
    them (count, the export in PeftModel with our logits), merged equal to unmerged."""
    ours, theirs = _patterned(method)
    trained = moved_off_start(minilm, make_peft(method, ours))
    peft, model, params = trained
    if method in ("lora", "dora"):
        layers = params["bert"]["encoder"]
        assert layers["layer_1"]["attention"]["self"]["query"]["lora_a"].shape == (384, 4)
        assert layers["layer_3"]["attention"]["self"]["query"]["lora_a"].shape == (384, 6)
        assert layers["layer_0"]["intermediate"]["dense"]["lora_b"].shape == (2, 1536)
        assert layers["layer_0"]["attention"]["self"]["value"]["lora_a"].shape == (384, 8)
    torch_model = hf_peft.get_peft_model(_torch_model(minilm_dir), theirs)
    assert peft.count(params).trainable == torch_model.get_nb_trainable_parameters()[0]
    _check_export(minilm, minilm_dir, method, sst2_batch, tmp_path, trained)
    plain, merged = peft.merge(model, params)
    np.testing.assert_allclose(
        np.asarray(plain.apply({"params": merged}, *sst2_batch, deterministic=True)),
        np.asarray(model.apply({"params": params}, *sst2_batch, deterministic=True)),
        atol=1e-5, rtol=0)


def test_lora_patterns_reach_every_use_of_the_scale(minilm):
    """The pattern flags parse as peft's keys; PiSSA's portable form doubles each layer's
    rank and alpha; the weighted combination refuses patterned adapters by name."""
    from jaxpeft.errors import JaxpeftError
    from jaxpeft.peft.lora import portable_lora
    from jaxpeft.peft.weighted import combine_lora

    module = ("bert", "encoder", "layer_2", "attention", "self", "query")
    assert PATTERNED.rank_for(module) == 4 and PATTERNED.alpha_for(module) == 16
    assert PATTERNED.scale_for(module) == 16 / 2
    value = ("bert", "encoder", "layer_2", "attention", "self", "value")
    assert PATTERNED.scale_for(value) == 4 / np.sqrt(8)
    pissa = dataclasses.replace(PATTERNED, init="pissa")
    peft = make_peft("lora", pissa)
    _, params = peft.init(minilm.model, minilm.params, jax.random.key(0))
    converted, options = portable_lora(params, pissa)
    for mod in (module, value):
        assert options.rank_for(mod) == 2 * pissa.rank_for(mod)
        assert np.isclose(options.scale_for(mod), pissa.scale_for(mod))
    with pytest.raises(JaxpeftError, match="per-layer rank or alpha patterns"):
        combine_lora([(peft, params)] * 2, [0.5, 0.5])
    with pytest.raises(JaxpeftError, match="lora_alpha_pattern.*positive float"):
        LoraConfig(alpha_pattern=("value=-1",))


def test_oft_blocks_by_number_per_layer_match_peft(minilm, minilm_dir, sst2_batch, tmp_path):
    """peft's OFT `r` (blocks per layer; the block size follows each layer's width): count,
    export in PeftModel with our logits; the two ways of giving blocks are exclusive."""
    from jaxpeft.errors import JaxpeftError

    options = OftConfig(block_size=0, r=6, targets=("query", "intermediate"))
    trained = moved_off_start(minilm, make_peft("oft", options))
    peft, model, params = trained
    layer = params["bert"]["encoder"]["layer_0"]
    assert layer["attention"]["self"]["query"]["oft_q"].shape == (6, 64 * 63 // 2)
    theirs = hf_peft.OFTConfig(task_type="SEQ_CLS", r=6, oft_block_size=0,
                               target_modules=["query", "intermediate.dense"])
    torch_model = hf_peft.get_peft_model(_torch_model(minilm_dir), theirs)
    assert peft.count(params).trainable == torch_model.get_nb_trainable_parameters()[0]
    _check_export(minilm, minilm_dir, "oft", sst2_batch, tmp_path, trained)
    for bad in ({"block_size": 32, "r": 6}, {"block_size": 0}):
        with pytest.raises(JaxpeftError, match="exactly one of --oft_block_size and --oft_r"):
            OftConfig(**bad)
    with pytest.raises(JaxpeftError, match="--oft_r=5 does not split the 384"):
        make_peft("oft", OftConfig(block_size=0, r=5)).init(minilm.model, minilm.params,
                                                             jax.random.key(0))
