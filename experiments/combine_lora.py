r"""Combine LoRA adapters of one task into one (peft's add_weighted_adapter: cat, linear).

  python -m experiments.combine_lora --adapter=runs/sst2-lora-s0 --adapter=runs/sst2-lora-s1 \
      --weights=0.5,0.5 --combination=cat --head=weighted --output=runs/sst2-lora-soup

Writes a jaxpeft adapter folder (`predict --run=` it). Flags only; the work is
`jaxpeft.peft.weighted.combine_adapter_folders`.
"""

from absl import flags

from jaxpeft.cli import start
from jaxpeft.peft.weighted import COMBINATIONS, HEADS, combine_cli

flags.DEFINE_multi_string("adapter", [], "Repeated: a LoRA run folder (its best/ adapter) or "
                          "adapter folder.")
flags.DEFINE_list("weights", [], "One weight per --adapter.")
flags.DEFINE_enum("combination", "cat", COMBINATIONS, "cat: the exact weighted sum of the "
                  "updates (rank: the sum of ranks); linear: peft's weighted sum of the factors "
                  "(equal ranks).")
flags.DEFINE_enum("head", "first", HEADS, "The classification head: the first adapter's, or "
                  "the weighted mean of the heads.")
flags.DEFINE_string("output", None, "A new folder for the combined adapter.", required=True)
flags.DEFINE_string("model", "", "Base model (default: the one the adapters were trained on).")


def main() -> int:
    f = flags.FLAGS
    return combine_cli(f.adapter, f.weights, f.output, f.combination, f.head, f.model or None)


def cli():
    """Console-script entry point."""
    start(main, __name__)


if __name__ == "__main__":
    cli()
