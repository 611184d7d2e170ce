"""Weighted combinations of LoRA adapters against peft's `add_weighted_adapter` (`cat`,
`linear`): the same logits on the real MiniLM; heads, folders, the command and its errors."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.peft import LoraConfig, load_adapter, make_peft
from jaxpeft.peft.adapters import save_adapter
from jaxpeft.peft.hf_export import peft_tensors
from jaxpeft.peft.weighted import combine_adapter_folders, combine_cli, combine_lora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")


def _lora(pre, options, seed, scale=0.05):
    """`(peft, params)` of a LoRA with every trainable leaf moved off its start."""
    peft = make_peft("lora", options)
    _, params = peft.init(pre.model, pre.params, jax.random.key(seed))
    flat, mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(peft.mask(params))
    for i, path in enumerate(sorted(flat)):
        if mask[path]:
            flat[path] = flat[path] + scale * jax.random.normal(
                jax.random.key(100 * seed + i), flat[path].shape)
    return peft, traverse_util.unflatten_dict(flat)


def _peft_combined(minilm_dir, adapters, weights, combination, head_params):
    """peft's combination of the adapters' LoRA tensors on the transformers model whose
    head is `head_params` (peft refuses adapters that each carry a head)."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir,
                                                                            num_labels=2)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor(np.asarray(head_params["kernel"]).T))
        model.classifier.bias.copy_(torch.tensor(np.asarray(head_params["bias"])))
    names = [f"a{i}" for i in range(len(adapters))]
    pm = None
    for name, (peft, params) in zip(names, adapters):
        o = peft.options
        config = hf_peft.LoraConfig(r=o.rank, lora_alpha=o.alpha, use_rslora=o.use_rslora,
                                    target_modules=["query", "value"])
        if pm is None:
            pm = hf_peft.get_peft_model(model, config, adapter_name=name)
        else:
            pm.add_adapter(name, config)
        state = {k.replace(".weight", f".{name}.weight"): torch.tensor(v)
                 for k, v in peft_tensors(peft, params).items() if ".lora_" in k}
        missing = set(state) - set(pm.state_dict())
        assert not missing, sorted(missing)[:3]
        pm.load_state_dict(state, strict=False)
    pm.add_weighted_adapter(names, list(weights), "combined", combination_type=combination)
    pm.set_adapter("combined")
    return pm.eval()


@pytest.mark.parametrize("combination", ["cat", "linear"])
def test_combination_logits_equal_peft_s(minilm, minilm_dir, sst2_batch, combination):
    """Two LoRAs (different alphas; a negative weight) combined here and by peft give the
    same logits; `cat` is the weighted sum of the updates."""
    adapters = [_lora(minilm, LoraConfig(rank=4, alpha=8), 1),
                _lora(minilm, LoraConfig(rank=4, alpha=16, use_rslora=True), 2)]
    weights = (0.7, -0.4)
    peft, params = combine_lora(adapters, weights, combination)
    assert peft.options.rank == (8 if combination == "cat" else 4)
    model = peft.attach(minilm.model)
    ours = np.asarray(model.apply({"params": params}, *sst2_batch, deterministic=True))
    tm = _peft_combined(minilm_dir, adapters, weights, combination, params["classifier"])
    with torch.no_grad():
        theirs = tm(**{k: torch.tensor(v) for k, v in zip(
            ("input_ids", "attention_mask", "token_type_ids"), sst2_batch)}).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    base = {**minilm.params, "classifier": params["classifier"]}
    plain = np.asarray(minilm.model.apply({"params": base}, *sst2_batch, deterministic=True))
    assert np.abs(ours - plain).max() > 1e-3  # the combined update is applied
    if combination == "cat":  # exactly the weighted sum of the adapters' updates
        flat = traverse_util.flatten_dict(params)
        parts = [traverse_util.flatten_dict(p) for _, p in adapters]
        for path in [p for p in flat if p[-1] == "lora_a"]:
            mod = path[:-1]
            got = np.asarray(flat[mod + ("lora_a",)] @ flat[mod + ("lora_b",)])
            want = sum(w * pe.options.scale * np.asarray(f[mod + ("lora_a",)]
                                                         @ f[mod + ("lora_b",)])
                       for w, (pe, _), f in zip(weights, adapters, parts))
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_heads_and_refusals(minilm):
    a = _lora(minilm, LoraConfig(rank=4, alpha=8), 1)
    b = _lora(minilm, LoraConfig(rank=2, alpha=8), 2)
    _, first = combine_lora([a, b], (1.0, 3.0), "cat", head="first")
    np.testing.assert_array_equal(first["classifier"]["kernel"], a[1]["classifier"]["kernel"])
    _, mean = combine_lora([a, b], (1.0, 3.0), "cat", head="weighted")
    np.testing.assert_allclose(mean["classifier"]["kernel"],
                               (a[1]["classifier"]["kernel"] + 3 * b[1]["classifier"]["kernel"])
                               / 4, atol=1e-7)
    with pytest.raises(JaxpeftError, match="linear combination needs equal ranks"):
        combine_lora([a, b], (0.5, 0.5), "linear")
    with pytest.raises(JaxpeftError, match="one weight per adapter"):
        combine_lora([a, b], (0.5,), "cat")
    c = _lora(minilm, LoraConfig(rank=4, alpha=8, targets=("query",)), 3)
    with pytest.raises(JaxpeftError, match="differ in --lora_targets"):
        combine_lora([a, c], (0.5, 0.5), "cat")
    ia3 = make_peft("ia3")
    _, p = ia3.init(minilm.model, minilm.params, jax.random.key(0))
    with pytest.raises(JaxpeftError, match="only LoRA adapters combine"):
        combine_lora([a, (ia3, p)], (0.5, 0.5), "cat")
    biased = _lora(minilm, LoraConfig(rank=4, alpha=8, bias="lora_only"), 4)
    with pytest.raises(JaxpeftError, match="train base biases .--lora_bias. do not combine"):
        combine_lora([a, biased], (0.5, 0.5), "cat")


def test_pissa_adapters_combine_as_peft_shares_them(minilm, sst2_batch):
    """A PiSSA adapter enters as its rank-2r plain form: the one-adapter `cat` with weight 1
    computes the adapter itself."""
    peft, params = _lora(minilm, LoraConfig(rank=4, alpha=8, init="pissa"), 1)
    combined, out = combine_lora([(peft, params)], (1.0,), "cat")
    assert combined.options.rank == 8 and combined.options.init == "default"
    want = peft.attach(minilm.model).apply({"params": params}, *sst2_batch, deterministic=True)
    got = combined.attach(minilm.model).apply({"params": out}, *sst2_batch, deterministic=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_folders_and_command(minilm, tmp_path, capsys):
    """Adapter folders in, a loadable adapter folder out; a second write is refused."""
    folders = []
    for seed in (1, 2):
        peft, params = _lora(minilm, LoraConfig(rank=4, alpha=8), seed)
        folders.append(save_adapter(tmp_path / f"a{seed}", peft, params, base_model="minilm",
                                    config=minilm.config,
                                    run={"task": "sst2", "max_seq_length": 64}))
    out = combine_adapter_folders(folders, (0.5, 0.5), tmp_path / "soup", head="weighted")
    model, params, peft = load_adapter(out, minilm)
    assert peft.options.rank == 8 and peft.name == "lora"
    capsys.readouterr()
    assert combine_cli([str(f) for f in folders], ["0.5", "0.5"], str(out), "cat", "first",
                       None) == 1
    assert "is not an empty folder" in capsys.readouterr().err
    assert combine_cli([str(f) for f in folders], ["a", "b"], str(tmp_path / "x"), "cat",
                       "first", None) == 1
    assert "--weights: a,b are not numbers" in capsys.readouterr().err
