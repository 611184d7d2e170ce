"""Adapters trained with PyTorch peft, imported into jaxpeft: same dev-set logits, clear
errors for what does not fit."""

import json

import numpy as np
import pytest

import jaxpeft
from jaxpeft.errors import JaxpeftError
from jaxpeft.peft.hf_import import import_peft
from tests.helpers import save_torch_model, tiny_hf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

CONFIGS = {
    "lora": lambda: hf_peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                       target_modules=["query", "value", "intermediate.dense"],
                                       rank_pattern={"intermediate.dense": 2},
                                       alpha_pattern={r"layer\.0\..*value": 2}),
    "dora": lambda: hf_peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, use_dora=True,
                                       target_modules=["key", "value"],
                                       rank_pattern={"key": 6}),
    # base biases trained beside the factors: all of them (the pooler's too), the adapted ones
    "lora bias": lambda: hf_peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, bias="all",
                                            target_modules=["query", "value"]),
    "dora bias": lambda: hf_peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                            use_dora=True, bias="lora_only",
                                            target_modules=["query", "intermediate.dense"]),
    # every linear layer, BERT's pretrained pooler included
    "lora all-linear": lambda: hf_peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                  target_modules="all-linear"),
    "ia3": lambda: hf_peft.IA3Config(task_type="SEQ_CLS"),
    "ia3 pooler": lambda: hf_peft.IA3Config(task_type="SEQ_CLS",
                                            target_modules=["value", "pooler.dense"],
                                            feedforward_modules=[]),
    "ln_tuning": lambda: hf_peft.LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"]),
    "prompt": lambda: hf_peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5),
    "loha": lambda: hf_peft.LoHaConfig(task_type="SEQ_CLS", r=4, alpha=8, rank_dropout=0.1,
                                       module_dropout=0.1, rank_pattern={"output.dense": 2},
                                       target_modules=["query", "value", "output.dense"]),
    "lokr": lambda: hf_peft.LoKrConfig(task_type="SEQ_CLS", r=4, alpha=8, decompose_both=True,
                                       rank_dropout=0.2, rank_dropout_scale=True,
                                       alpha_pattern={"key": 2.0},
                                       target_modules=["query", "key"]),
    "oft": lambda: hf_peft.OFTConfig(task_type="SEQ_CLS", r=0, oft_block_size=16,
                                     module_dropout=0.1, target_modules=["query", "value"]),
    # OFT's blocks given by their number per layer (peft's r) instead of their size
    "oft r": lambda: hf_peft.OFTConfig(task_type="SEQ_CLS", r=6, oft_block_size=0,
                                       target_modules=["key", "intermediate.dense"]),
    "fourierft": lambda: hf_peft.FourierFTConfig(task_type="SEQ_CLS", n_frequency=500,
                                                 scaling=300.0, random_loc_seed=5,
                                                 n_frequency_pattern={"layer.1.output.dense": 200},
                                                 target_modules=["query", "output.dense"]),
    "boft": lambda: hf_peft.BOFTConfig(task_type="SEQ_CLS", boft_block_size=0, boft_block_num=8,
                                       boft_n_butterfly_factor=1, boft_dropout=0.25,
                                       target_modules=["key", "intermediate.dense"]),
    "adalora": lambda: hf_peft.AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_r=2,
                                             total_step=10, target_modules=["query", "value"]),
}
# options of those configurations beyond the shapes (training-time dropouts, trained
# biases, targets), which the imported options carry
CARRIED = {"lora bias": {"bias": "all"}, "dora bias": {"bias": "lora_only"},
           "lora all-linear": {"targets": ("query", "key", "value", "attention_output",
                                           "intermediate", "output", "pooler")},
           "ia3 pooler": {"targets": ("value", "pooler")},
           "loha": {"rank_dropout": 0.1, "module_dropout": 0.1},
            "lokr": {"rank_dropout": 0.2, "module_dropout": 0.0, "rank_dropout_scale": True},
            "boft": {"dropout": 0.25}}


def _train_in_torch(base_dir, config, batch, out, steps=3):
    """A peft model trained a few AdamW steps on one real batch, saved with save_pretrained."""
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir,
                                                                            num_labels=2)
    model = hf_peft.get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, types = (torch.tensor(x) for x in batch)
    labels = torch.tensor([i % 2 for i in range(ids.shape[0])])
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, token_type_ids=types,
                     labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    model.eval()
    with torch.no_grad():
        return model


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_peft_trained_adapter_scores_as_in_pytorch(minilm_dir, glue_dir, sst2_batch, method,
                                                   tmp_path):
    tm = _train_in_torch(minilm_dir, CONFIGS[method](), sst2_batch, tmp_path)
    lines = (glue_dir / "SST-2" / "dev.tsv").read_text().splitlines()[17:81]
    pre = jaxpeft.load_pretrained(minilm_dir, num_labels=2)
    enc = pre.tokenizer([l.split("\t")[0] for l in lines], padding=True, return_tensors="np")
    args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    with torch.no_grad():
        theirs = tm(**{k: torch.tensor(v) for k, v in zip(
            ("input_ids", "attention_mask", "token_type_ids"), args)}).logits.numpy()
    model, params, peft = import_peft(tmp_path, pre)
    assert peft.name == method.split()[0]
    ours = np.asarray(model.apply({"params": params}, *args, deterministic=True))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    base = np.asarray(pre.model.apply({"params": pre.params}, *args, deterministic=True))
    assert np.abs(ours - base).max() > 1e-3  # the adapter was really applied
    assert peft.count(params).trainable == tm.get_nb_trainable_parameters()[0]
    for name, value in CARRIED.get(method, {}).items():
        assert getattr(peft.options, name) == value


@pytest.mark.slow
def test_unsupported_types_and_other_bases_are_clear_errors(minilm_dir, sst2_batch, tmp_path):

    _train_in_torch(minilm_dir, CONFIGS["lora"](), sst2_batch, tmp_path / "lora", steps=1)
    tiny = tmp_path / "tiny"
    save_torch_model(transformers.BertForSequenceClassification, tiny_hf_config("bert"), tiny)
    with pytest.raises(JaxpeftError, match="for another base model"):
        import_peft(tmp_path / "lora", jaxpeft.load_pretrained(tiny, tokenizer=False))
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    for change, message in (({"peft_type": "HRA"}, "has no jaxpeft method"),
                            ({"task_type": "CAUSAL_LM"}, "imports sequence-classification"),
                            ({"bias": "boft_only"}, "bias='boft_only' is not supported"),
                            ({"fan_in_fan_out": True}, "fan_in_fan_out")):
        (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(JaxpeftError, match=message):
            import_peft(tmp_path / "lora", jaxpeft.load_pretrained(minilm_dir, num_labels=2))
    # damaged files: a config that is not an object, truncated weights; an --output in use
    (tmp_path / "lora" / "adapter_config.json").write_text("[]")
    with pytest.raises(JaxpeftError, match="adapter_config.json: the peft adapter config is "
                                           "not a JSON object"):
        import_peft(tmp_path / "lora", jaxpeft.load_pretrained(minilm_dir, num_labels=2))
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(cfg))
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(JaxpeftError, match="adapter_model.safetensors: not a readable "
                                           "safetensors file"):
        import_peft(tmp_path / "lora", jaxpeft.load_pretrained(minilm_dir, num_labels=2))
    from jaxpeft.peft.hf_import import convert_peft_adapter
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "adapter.json").write_text("{}")
    with pytest.raises(JaxpeftError, match="--output exists and is not an empty folder"):
        convert_peft_adapter(tmp_path / "lora", str(minilm_dir), "sst2", taken)
    assert (taken / "adapter.json").read_text() == "{}"
    vera = hf_peft.VeraConfig(task_type="SEQ_CLS", r=16, target_modules=["query", "value"],
                              save_projection=True)
    _train_in_torch(minilm_dir, vera, sst2_batch, tmp_path / "vera", steps=1)
    with pytest.raises(JaxpeftError, match="torch's random generator"):
        import_peft(tmp_path / "vera", jaxpeft.load_pretrained(minilm_dir, num_labels=2))


@pytest.mark.slow
def test_converted_adapter_predicts_like_pytorch(minilm_dir, glue_dir, sst2_batch, tmp_path):
    """experiments/import_peft.py's function, then experiments/predict.py's, on real rows."""
    from jaxpeft.peft.hf_import import convert_peft_adapter
    from jaxpeft.predict import predict_file

    tm = _train_in_torch(minilm_dir, CONFIGS["dora"](), sst2_batch, tmp_path / "peft")
    out = convert_peft_adapter(tmp_path / "peft", str(minilm_dir), "sst2", tmp_path / "ours")
    rows = (glue_dir / "SST-2" / "dev.tsv").read_text().splitlines()[:41]
    (tmp_path / "in.tsv").write_text("\n".join(rows) + "\n")
    table = predict_file(out, str(tmp_path / "in.tsv"), str(tmp_path / "preds.tsv"))
    enc = jaxpeft.load_pretrained(minilm_dir).tokenizer(
        [r.split("\t")[0] for r in rows[1:]], padding=True, truncation=True, max_length=128,
        return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(tm(**enc).logits, -1).numpy()
    ours = np.array([[float(x) for x in r[2:]] for r in table[1:]])
    np.testing.assert_allclose(ours, probs, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_pissa_and_olora_adapters_import_on_the_plain_base(minilm_dir, sst2_batch, init,
                                                                 tmp_path):
    """An adapter peft trained from a PiSSA / OLoRA start and saved as such (its factors are
    relative to the residual base peft makes when it loads it): the import builds the same
    residual from the plain base and scores as the PyTorch model."""
    config = hf_peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=init,
                                target_modules=["query", "value"])
    tm = _train_in_torch(minilm_dir, config, sst2_batch, tmp_path)
    pre = jaxpeft.load_pretrained(minilm_dir, num_labels=2)
    model, params, peft = import_peft(tmp_path, pre)
    assert peft.name == "lora" and peft.options.init == init
    with torch.no_grad():
        theirs = tm(**{k: torch.tensor(v) for k, v in zip(
            ("input_ids", "attention_mask", "token_type_ids"), sst2_batch)}).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, *sst2_batch, deterministic=True))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
