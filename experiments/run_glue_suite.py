r"""Run the GLUE benchmark in one command: every task (or --tasks), one run folder each, then
glue.md / glue.json (and, with --do_predict, glue_submission.zip) in --output_dir.

  python -m experiments.run_glue_suite --model=minilm --method=lora \
      --data_dir=../shared/glue_data --output_dir=runs/glue-lora

Every run_glue flag applies to every task; the per-task recipe (--recipe) sets epochs, batch
size, sequence length and learning rate unless the flag is given. Flags only; the work is
`jaxpeft.suite.run_suite`.
"""

from absl import flags

from experiments import run_glue
from jaxpeft import config
from jaxpeft.cli import start
from jaxpeft.suite import GLUE_TASKS, RECIPES, suite_cli

flags.adopt_module_key_flags(run_glue)  # every run_glue flag applies to each task

flags.DEFINE_list("tasks", list(GLUE_TASKS), "GLUE tasks to run, in this order.")
flags.DEFINE_string("recipe", "standard", "Per-task defaults: " + ", ".join(RECIPES) +
                    " (standard: BERT's 3 epochs, batch 32, length 128; lora-paper: the LoRA "
                    "paper's RoBERTa-base table). Flags given explicitly win.")


def main() -> int:
    f = flags.FLAGS
    explicit = frozenset(name for name in config.options() if f[name].present)
    return suite_cli(config.from_flags(), tuple(t.lower().replace("-", "") for t in f.tasks),
                     f.recipe, explicit)


def cli():
    """Console-script entry point."""
    start(main, __name__)


if __name__ == "__main__":
    cli()
