"""The PEFT method registry: the one place that lists methods (one line each).

Run code, adapter files, benchmarks and tests look methods up here by the `--method` name and
never branch on it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from jaxpeft.errors import JaxpeftError
from jaxpeft.peft.adalora import Adalora
from jaxpeft.peft.bitfit import BitFit
from jaxpeft.peft.boft import Boft
from jaxpeft.peft.bottleneck import AdapterHoulsby, AdapterPfeiffer
from jaxpeft.peft.dora import Dora
from jaxpeft.peft.fourierft import Fourierft
from jaxpeft.peft.full import Full
from jaxpeft.peft.ia3 import Ia3
from jaxpeft.peft.ln_tuning import LnTuning
from jaxpeft.peft.loha import Loha
from jaxpeft.peft.lokr import Lokr
from jaxpeft.peft.oft import Oft
from jaxpeft.peft.lora import Lora
from jaxpeft.peft.loreft import Loreft
from jaxpeft.peft.prefix import Prefix
from jaxpeft.peft.prompt import Prompt
from jaxpeft.peft.vera import Vera
from jaxpeft.peft.method import FlagSpec, Peft, PeftMethod, flag_specs

METHODS: dict[str, PeftMethod] = {m.name: m for m in (
    Full(),
    Lora(),
    BitFit(),
    Dora(),
    Ia3(),
    Vera(),
    LnTuning(),
    AdapterHoulsby(),
    AdapterPfeiffer(),
    Prompt(),
    Loha(),
    Lokr(),
    Oft(),
    Prefix(),
    Adalora(),
    Loreft(),
    Fourierft(),
    Boft(),
)}


def method_flags() -> dict[str, FlagSpec]:
    """`{flag name: FlagSpec}` of every registered method's options (`--lora_rank`, ...), read
    anew on each call so that a method registered later brings its flags along."""
    return flag_specs(METHODS.values())


def get_method(name: str) -> PeftMethod:
    """The registered method called `name`; a clear error listing the others if none is."""
    if name not in METHODS:
        raise JaxpeftError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def make_peft(name: str, options: Optional[Any] = None, train_pooler: bool = False) -> Peft:
    """`Peft` for method `name` with `options` (the method's `Options`; default: its
    defaults)."""
    method = get_method(name)
    if options is None:
        options = method.Options()
    elif not isinstance(options, method.Options):
        raise JaxpeftError(f"method {name!r} takes {method.Options.__name__} options, got "
                           f"{type(options).__name__}")
    return Peft(method, options, train_pooler)


def peft_from_run(run: Any) -> Peft:
    """`Peft` of a run configuration: `run.method`, its options read from the run's fields,
    `run.train_pooler`."""
    method = get_method(run.method)
    return Peft(method, method.options_from(run), bool(run.train_pooler))


def peft_from_dict(d: Mapping) -> Peft:
    """Inverse of `Peft.to_dict` (what `adapter.json` stores)."""
    method = get_method(d["method"])
    return Peft(method, method.Options.from_dict(d["options"]), bool(d["train_pooler"]))
