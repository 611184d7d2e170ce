r"""Fine-tune BERT/RoBERTa on a GLUE task with a PEFT method (LoRA, BitFit, ...) or fully.

  python -m experiments.run_glue --task=sst2 --method=lora --model=minilm \
      --data_dir=../shared/glue_data --max_steps=300 --output_dir=runs/sst2-lora

Flags only, generated from `jaxpeft.config.RunConfig`; the work is
`jaxpeft.run.train_and_evaluate`.
"""

from absl import flags

from jaxpeft import config
from jaxpeft.cli import start
from jaxpeft.run import train_cli

config.define_flags()
flags.adopt_module_key_flags(config)  # --help lists them as this script's flags


def main() -> int:
    return train_cli(config.from_flags())


def cli():
    """Console-script entry point."""
    start(main, __name__)


if __name__ == "__main__":
    cli()
