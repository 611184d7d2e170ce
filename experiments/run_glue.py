r"""Fine-tune BERT/RoBERTa on a GLUE task with a PEFT method (LoRA, BitFit, ...) or fully.

  python -m experiments.run_glue --task=sst2 --method=lora --model=minilm \
      --data_dir=../shared/glue_data --max_steps=300 --output_dir=runs/sst2-lora

Flags only, generated from `jaxpeft.config.RunConfig`; the work is
`jaxpeft.run.train_and_evaluate`.
"""

import functools
import sys

from absl import app, flags

from jaxpeft import config
from jaxpeft.run import cli_main

config.define_flags()
flags.adopt_module_key_flags(config)  # --help lists them as this script's flags


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    sys.exit(cli_main(config.from_flags()))


def cli():
    """Console-script entry point."""
    app.run(main, flags_parser=functools.partial(config.parse_flags, module=__name__))


if __name__ == "__main__":
    cli()
