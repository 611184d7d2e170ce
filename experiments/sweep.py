r"""Run a grid of run_glue configurations, each into its own folder under --root.

  python -m experiments.sweep --root=runs/lr --task=sst2 --model=minilm \
      --data_dir=../shared/glue_data --max_steps=300 \
      --grid="method=full,lora,bitfit;learning_rate=2e-5,1e-4,5e-4,1e-3" --seeds=0,1

Every run_glue flag sets the base configuration; --grid varies some of them. Finished runs
are skipped, failed ones reported. Flags only; the work is `jaxpeft.sweep.run_sweep`.
"""

from absl import flags

from experiments import run_glue
from jaxpeft import config
from jaxpeft.cli import start
from jaxpeft.sweep import sweep_cli

flags.adopt_module_key_flags(run_glue)  # every run_glue flag sets the base run (--help shows them)

flags.DEFINE_string("root", "runs/sweep", "Folder holding one subfolder per run.")
flags.DEFINE_string("grid", "", "Settings to vary: 'name=v1,v2;name2=v3,v4' "
                    "(lora_targets values join modules with '+').")
flags.DEFINE_list("seeds", ["0"], "Seeds: each grid point runs once per seed.")


def main() -> int:
    f = flags.FLAGS
    return sweep_cli(config.from_flags(), f.grid, f.seeds, f.root, f.progress)


def cli():
    """Console-script entry point."""
    start(main, __name__)


if __name__ == "__main__":
    cli()
