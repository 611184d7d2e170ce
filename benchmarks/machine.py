"""The machine a benchmark ran on, in one line and as a dict: CPU model and vector
extensions, cores, accelerator, library versions. Step times differ across CPUs by more than
the differences being measured (docs/performance.md), so every benchmark names its machine."""

import os
import platform
from importlib import metadata

from jaxpeft.tuning import cpuinfo

# The extensions XLA's and PyTorch's CPU kernels pick code paths by.
_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
               "asimd", "sve")


def describe() -> dict:
    """`{cpu, extensions, cores, accelerator, versions}` of this machine (versions of the
    libraries that are installed: jax, jaxlib, flax, optax, torch, transformers, peft)."""
    info = cpuinfo()
    flags = set(info.get("flags", info.get("Features", "")).split())
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    accelerator = None
    try:
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            accelerator = f"{device.device_kind} x {jax.device_count()}"
    except Exception:  # noqa: BLE001 - no jax, or no backend: the CPU line still stands
        pass
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "extensions": [e for e in _EXTENSIONS if e in flags],
            "cores": len(os.sched_getaffinity(0)), "accelerator": accelerator,
            "versions": versions}


def line(info: dict = None) -> str:
    """`machine: AMD EPYC 9B14 (avx2 fma), 2 cores; jax 0.10.2, torch 2.13.0+cpu, ...`."""
    info = info or describe()
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    where = f"; {info['accelerator']}" if info["accelerator"] else ""
    extensions = " ".join(info["extensions"]) or "none of " + " ".join(_EXTENSIONS)
    return (f"machine: {info['cpu']} ({extensions}), {info['cores']} cores{where}; "
            f"{versions}")
