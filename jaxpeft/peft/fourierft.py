"""FourierFT (Gao et al., 2024; peft's FOURIERFT): each targeted weight's update is the
inverse 2-D Fourier transform of a few trained spectral coefficients.

Beside each `--lora_targets` kernel `(in, out)` the tree gets `fourierft_spectrum`
(`--fourierft_n_frequency` values, or the count `--fourierft_n_frequency_pattern` gives that
layer: peft's `n_frequency_pattern`, each `PATTERN=N` matched as peft does, against the end
of the layer's transformers module name). The layer adds `x @ ΔW` with

    ΔW = Re(ifft2(S)) · --fourierft_scaling,   S zero but for the spectrum at fixed entries.

The entries are peft's: the first n of a random permutation of the `out × in` positions,
`torch.randperm(out · in, generator=manual_seed(--fourierft_seed))`, the same in every layer
of one shape. peft does not save them; it draws them again from the seed when it loads, so
the export must use the very same ones. `torch_randperm_prefix` reproduces that
permutation's first n entries without torch (its Fisher-Yates shuffle over the 32-bit
Mersenne Twister stream that NumPy's legacy `RandomState` also produces; checked equal to
torch's for several sizes and seeds). The spectrum starts standard normal, as peft's default
(`init_weights=False`), so the model does not start as the base. ΔW is formed once per step
and layer and folded into the frozen kernel, as LoHa's is; merge adds it for good.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxpeft.errors import JaxpeftError
from jaxpeft.models.encoder import DenseHook, token_matmul
from jaxpeft.peft.codec import PeftCodec
from jaxpeft.peft.lora import (check_targets, peft_target_modules, target_modules,
                               targets_of_modules)
from jaxpeft.peft.method import (MethodOptions, PeftMethod, flag, fold_into_kernels,
                                 module_patterns, pattern_value, shared_flag)

LEAF = "fourierft_spectrum"


@dataclasses.dataclass(frozen=True)
class FourierftConfig(MethodOptions):
    """FourierFT options: spectral coefficients per target, their scale, the seed of their
    positions, targets."""

    n_frequency: int = flag("fourierft_n_frequency", 1000, "FourierFT: trained spectral "
                            "coefficients per targeted layer.")
    scaling: float = flag("fourierft_scaling", 150.0, "FourierFT: the scale of the update "
                          "(peft's default 150; the paper uses 100-300).")
    seed: int = flag("fourierft_seed", 777, "FourierFT: the seed of the coefficients' "
                     "positions (peft's random_loc_seed).")
    targets: tuple = shared_flag("lora_targets", ("query", "value"))
    n_frequency_pattern: tuple = flag(
        "fourierft_n_frequency_pattern", (), "FourierFT: other coefficient counts for some "
        "layers, as PATTERN=N entries (peft's n_frequency_pattern): the first PATTERN, a "
        "regex, that matches the end of a layer's module name (e.g. "
        "'layer.0.attention.self.query=2000') gives its count.")
    label: ClassVar[str] = "FourierFT"
    added_fields: ClassVar[dict] = {"n_frequency_pattern": ()}

    def __post_init__(self):
        if not isinstance(self.n_frequency, int) or self.n_frequency <= 0:
            raise JaxpeftError("--fourierft_n_frequency must be a positive integer, got "
                               f"{self.n_frequency!r}")
        object.__setattr__(self, "n_frequency_pattern",
                           tuple(str(e) for e in self.n_frequency_pattern))
        self.pattern()  # checks the entries
        object.__setattr__(self, "targets", check_targets(self.targets, "FourierFT"))

    def pattern(self) -> tuple:
        """`((PATTERN, N), ...)` of `--fourierft_n_frequency_pattern`, in order."""
        return module_patterns(self.n_frequency_pattern, "fourierft_n_frequency_pattern")

    def n_for(self, module: tuple) -> int:
        """The coefficient count of the layer at module path `module`."""
        return pattern_value(self.pattern(), module, self.n_frequency)


@functools.lru_cache(maxsize=None)
def torch_randperm_prefix(n: int, k: int, seed: int) -> np.ndarray:
    """The first `k` entries of `torch.randperm(n, generator=torch.Generator().manual_seed(
    seed))` on the CPU: Fisher-Yates, swap i with i + (32-bit draw mod (n − i)); only the
    first k swaps fix the first k entries."""
    draws = np.random.RandomState(seed).randint(0, 2 ** 32, size=k, dtype=np.uint32)
    perm = np.arange(n, dtype=np.int64)
    for i in range(k):
        j = i + int(draws[i]) % (n - i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm[:k].copy()


def spectrum_entries(fan_in: int, fan_out: int, n: int, config: FourierftConfig) -> tuple:
    """`(rows, cols)` of a layer's `n` coefficients in our `(in, out)` layout (peft's
    `(out, in)` entries transposed)."""
    if n > fan_in * fan_out:
        raise JaxpeftError(f"FourierFT: {n} coefficients exceed the {fan_out} x {fan_in} "
                           "entries of a targeted layer")
    flat = torch_randperm_prefix(fan_in * fan_out, n, config.seed)
    return flat % fan_in, flat // fan_in


def fourier_delta(spectrum, fan_in: int, fan_out: int, config: FourierftConfig):
    """`ΔW (in, out) = Re(ifft2(S)) · scaling`, S holding `spectrum` at peft's entries (as
    many as the spectrum has values)."""
    rows, cols = spectrum_entries(fan_in, fan_out, spectrum.shape[0], config)
    dense = jnp.zeros((fan_in, fan_out), jnp.float32).at[rows, cols].set(
        spectrum.astype(jnp.float32))
    return jnp.fft.ifft2(dense).real * config.scaling


@dataclasses.dataclass(frozen=True)
class FourierftHook(DenseHook):
    """Computes `x @ (W + ΔW) + b` in layers holding a spectrum (ΔW formed once per call)."""

    config: FourierftConfig
    leaves: tuple = (LEAF,)

    def __call__(self, dense, x, y, kernel, bias, deterministic):
        if not dense.has_variable("params", LEAF):
            return y
        delta = fourier_delta(dense.get_variable("params", LEAF), *kernel.shape, self.config)
        return token_matmul(x, kernel + delta.astype(y.dtype)) + bias


class FourierftCodec(PeftCodec):
    """peft's FOURIERFT: `fourierft_spectrum` (n,) per target; positions from the seed."""

    peft_type = "FOURIERFT"
    markers = ("fourierft_",)

    def config(self, options, family):
        return {"n_frequency": options.n_frequency, "scaling": options.scaling,
                "random_loc_seed": options.seed, "fan_in_fan_out": False,
                "target_modules": peft_target_modules(options, family),
                "n_frequency_pattern": dict(options.pattern()),
                "init_weights": False, "bias": "none"}

    def options_from(self, config, modules):
        if config.get("fan_in_fan_out"):
            raise JaxpeftError("FourierFT: fan_in_fan_out adapters are not supported")
        pattern = config.get("n_frequency_pattern") or {}
        return FourierftConfig(n_frequency=int(config["n_frequency"]),
                               scaling=float(config["scaling"]),
                               seed=int(config["random_loc_seed"]),
                               targets=targets_of_modules(modules, "FourierFT"),
                               n_frequency_pattern=tuple(f"{p}={n}" for p, n in pattern.items()))

    def leaf(self, path, value):
        return (LEAF, value) if path[-1] == LEAF else None


class Fourierft(PeftMethod):
    """FourierFT on the `--lora_targets` Dense layers; the spectra (and the head) train."""

    name = "fourierft"
    summary = ("updates as inverse Fourier transforms of a few trained spectral coefficients "
               "(FourierFT, Gao et al., 2024)")
    Options = FourierftConfig
    default_learning_rate = 5e-2
    codec = FourierftCodec()

    def requires(self, options):
        return options.targets

    def augment(self, params, options, rng):
        flat = dict(traverse_util.flatten_dict(params))
        if any(p[-1] == LEAF for p in flat):
            raise JaxpeftError("these params already have FourierFT leaves")
        for i, mod in enumerate(target_modules(flat, options.targets, "FourierFT")):
            n = options.n_for(mod)
            spectrum_entries(*flat[mod + ("kernel",)].shape, n, options)  # checks the size
            flat[mod + (LEAF,)] = jax.random.normal(jax.random.fold_in(rng, i), (n,),
                                                    jnp.float32)
        return traverse_util.unflatten_dict(flat)

    def rules(self, options):
        return [(rf".*/{LEAF}", True), (".*", False)]

    def hooks(self, options):
        return (FourierftHook(options),)

    def merge(self, params, options):
        return fold_into_kernels(params, (LEAF,), lambda kernel, held, _: kernel + fourier_delta(
            held[LEAF], *kernel.shape, options))
