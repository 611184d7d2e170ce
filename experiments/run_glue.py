r"""Fine-tune BERT/RoBERTa on a GLUE task with a PEFT method (LoRA, BitFit, ...) or fully.

  python -m experiments.run_glue --task=sst2 --method=lora --model=minilm \
      --data_dir=../shared/glue_data --max_steps=300 --output_dir=runs/sst2-lora

Flags only, generated from `jaxpeft.config.RunConfig`; the work is
`jaxpeft.run.train_and_evaluate`.
"""

# Commands that run XLA steps restart once with glibc's malloc tuned for them (jaxpeft.hostmem);
# doing it before the imports below means the restart repeats none of them (console scripts:
# experiments/__init__.py).
from jaxpeft import hostmem

if __name__ == "__main__":
    hostmem.restart_with_tuned_malloc()

import functools  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402

from jaxpeft import config  # noqa: E402
from jaxpeft.run import cli_main  # noqa: E402

config.define_flags()
flags.adopt_module_key_flags(config)  # --help lists them as this script's flags


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    sys.exit(cli_main(config.from_flags()))


def cli():
    """Runs the command (the console script reaches it through `experiments`, which has
    restarted the process with the malloc tuning first)."""
    app.run(main, flags_parser=functools.partial(config.parse_flags, module=__name__))


if __name__ == "__main__":
    cli()
