"""The command-line scripts (flags only; each calls one library function).

The console scripts of the commands that run XLA steps start here rather than in the script
modules: importing a script module loads JAX, and these entry points first restart the
process with glibc's malloc tuned (`jaxpeft.hostmem`), so the restart repeats no import.
`python -m experiments.<script>` does the same at the top of each script.
"""

import importlib


def _tuned(script: str) -> None:
    from jaxpeft import hostmem

    hostmem.restart_with_tuned_malloc()
    importlib.import_module(f"experiments.{script}").cli()


def glue():
    """`jaxpeft-glue`: experiments.run_glue."""
    _tuned("run_glue")


def glue_suite():
    """`jaxpeft-glue-suite`: experiments.run_glue_suite."""
    _tuned("run_glue_suite")


def sweep():
    """`jaxpeft-sweep`: experiments.sweep."""
    _tuned("sweep")


def predict():
    """`jaxpeft-predict`: experiments.predict."""
    _tuned("predict")
