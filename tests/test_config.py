"""RunConfig as the one source of options; the metrics-row schema and its one reader."""

import json

import pytest

from jaxpeft import config
from jaxpeft.config import RunConfig, validate
from jaxpeft.errors import JaxpeftError
from jaxpeft.writer import read_metrics


def test_every_field_has_help_and_a_known_type():
    for name, option in config.options().items():
        assert option.help.strip(), name
        assert config.field_kind(name) in (int, float, bool, str, tuple), name
        default = option.default
        assert default is None or isinstance(default, config.field_kind(name)), name


def test_roles_come_from_the_fields():
    assert "output_dir" not in config.names_where("sweepable")
    # What a resumed run may change: where and how it reports, how often it evaluates and
    # saves, and the steps after training (the length is outputs.LENGTH's own rule).
    assert {"resume", "overwrite", "progress", "multihost", "output_dir", "do_predict",
            "export_peft", "export_merged", "tensorboard", "compilation_cache",
            "train_step_xla_options", "eval_every", "log_every", "checkpoint_every",
            "eval_batch_size", "cache_dir", "multihost_timeout", "mesh"} == set(
                config.names_where("resumable"))
    not_settings = set(config.names_where("setting", False))
    assert {"cache_dir", "eval_batch_size", "output_dir"} <= not_settings
    assert not {"seed", "learning_rate", "lora_rank", "method"} & not_settings


def test_parse_value_types():
    assert config.parse_value("lora_rank", "4") == 4
    assert config.parse_value("learning_rate", "2e-5") == 2e-5
    assert config.parse_value("packing", "false") is False
    assert config.parse_value("lora_targets", "query+value") == ("query", "value")
    with pytest.raises(JaxpeftError, match="not a number"):
        config.parse_value("batch_size", "x")


@pytest.mark.parametrize("overrides,message", [
    ({"dtype": "float16"}, "--dtype='float16' is not one of: float32, bfloat16"),
    ({"warmup_ratio": 1.0}, "--warmup_ratio must be in [0, 1)"),
    ({"max_steps": 0, "num_epochs": 0.0}, "give --num_epochs > 0 or --max_steps > 0"),
    ({"resume": True, "overwrite": True}, "give --resume or --overwrite, not both"),
    ({"lora_alpha": 0.0}, "LoRA alpha must be > 0"),
    ({"batch_size": 6}, "--batch_size=6 must be a multiple of the 4 devices"),
    ({"seed": -1}, "--seed must be in [0, 2**31), got -1"),
    ({"seed": 2**64}, "--seed must be in [0, 2**31)"),
    ({"multihost_timeout": 0}, "--multihost_timeout must be > 0"),
])
def test_validate_names_the_option(overrides, message):
    with pytest.raises(JaxpeftError) as e:
        validate(RunConfig(**overrides), device_count=4)
    assert message in str(e.value)


def test_default_output_dir_names_task_and_method():
    assert RunConfig(task="CoLA", method="bitfit").with_output_dir().output_dir == \
        "runs/cola-bitfit"
    assert RunConfig(output_dir="x").with_output_dir().output_dir == "x"


def test_default_learning_rate_comes_from_the_method():
    assert RunConfig(method="bitfit").resolved_learning_rate() == 1e-3
    assert RunConfig(method="full", learning_rate=3e-5).resolved_learning_rate() == 3e-5


def test_metrics_reader_splits_rows_by_their_prefix(tmp_path):
    rows = [{"step": 2, "epoch": 0.5, "train_loss": 0.7, "train_learning_rate": 1e-3,
             "train_grad_norm": 1.5, "train_examples_per_s": 10.0},
            {"step": 2, "epoch": 0.5, "eval_loss": 0.6, "eval_accuracy": 0.5},
            {"step": 4, "epoch": 1.0, "train_loss": 0.6, "train_learning_rate": 5e-4}]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(tmp_path / "run") == ([rows[0], rows[2]], [rows[1]])
    assert read_metrics(tmp_path / "missing") == ([], [])


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    """Run files are as readable as a plain open() would make them (not mkstemp's 0600)."""
    import os

    from jaxpeft.fileio import atomic_write_json

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "results.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == mode
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}


def test_train_step_xla_options_parse_values_with_commas():
    cfg = RunConfig(train_step_xla_options="a_option=X,Y; b_option=3")
    assert cfg.xla_options() == {"a_option": "X,Y", "b_option": "3"}
    assert RunConfig().xla_options() == {}
    with pytest.raises(JaxpeftError, match="name=value options joined by ';'"):
        validate(RunConfig(train_step_xla_options="just_a_name"))
    # XLA takes a bool option only as a bool, so the flag's true/false become bools.
    assert RunConfig(train_step_xla_options="a=TRUE;b=false;c=truth").xla_options() == \
        {"a": True, "b": False, "c": "truth"}
    # `auto`: the loop measures the options; multi-host runs must name them.
    assert RunConfig(train_step_xla_options="auto").xla_options() == {}
    validate(RunConfig(train_step_xla_options="auto"))
    with pytest.raises(JaxpeftError, match="auto times the step on one process"):
        validate(RunConfig(train_step_xla_options="auto", multihost=True))


def test_task_names_have_one_spelling():
    """`SST-2`, `sst-2` and `SST2` are one task in config.json, resume checks and reports."""
    from jaxpeft.config import RunConfig, recorded_options

    for spelling in ("SST-2", "sst-2", "SST2", "sst2"):
        assert RunConfig(task=spelling).task == "sst2"
        assert RunConfig(task=spelling).to_dict()["task"] == "sst2"
        assert recorded_options({"task": spelling})["task"] == "sst2"  # runs saved before
    assert RunConfig(task="STS-B").with_output_dir().output_dir == "runs/stsb-lora"
    assert RunConfig(task="nosuch").task == "nosuch"  # validate() names the problem
