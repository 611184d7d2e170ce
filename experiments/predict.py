r"""Predict with a trained adapter on new text (TSV or JSON lines; '-' reads stdin).

  python -m experiments.predict --run=runs/sst2-lora --input=reviews.tsv --output=preds.tsv
  echo '{"sentence": "a gorgeous, witty film"}' | python -m experiments.predict --run=runs/sst2-lora --input=-

Writes `index`, `label` (the label name; STS-B: the score) and one probability column per
class. Flags only; the work is `jaxpeft.predict.predict_file`.
"""

from absl import flags

from jaxpeft.cli import start
from jaxpeft.predict import predict_cli

flags.DEFINE_string("run", None, "A run folder (its best/ adapter) or an adapter folder.",
                    required=True)
flags.DEFINE_string("input", None, "TSV with a header, JSON lines, or '-' for stdin.",
                    required=True)
flags.DEFINE_string("output", "", "Where to write the TSV (default: stdout).")
flags.DEFINE_string("model", "", "Base model (default: the one the adapter was trained on).")
flags.DEFINE_list("text_columns", [], "The input's text column(s) (default: found by the "
                  "task's field names).")
flags.DEFINE_integer("batch_size", 64, "Rows per forward pass.")


def main() -> int:
    f = flags.FLAGS
    return predict_cli(f.run, f.input, f.output or None, f.model or None,
                       tuple(f.text_columns) or None, f.batch_size)


def cli():
    """Console-script entry point."""
    start(main, __name__)


if __name__ == "__main__":
    cli()
