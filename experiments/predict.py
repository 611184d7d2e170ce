r"""Predict with trained adapters on new text (TSV or JSON lines; '-' reads stdin).

  python -m experiments.predict --run=runs/sst2-lora --input=reviews.tsv --output=preds.tsv
  echo '{"sentence": "a gorgeous, witty film"}' | python -m experiments.predict --run=runs/sst2-lora --input=-
  python -m experiments.predict --adapter=sst2=runs/sst2-lora --adapter=stsb=runs/stsb-lora --input=mixed.jsonl

With --run: writes `index`, `label` (the label name; STS-B: the score) and one probability
column per class. With --adapter (repeated): every input row names its adapter (--adapter_column) and
rows of all adapters share batches over one base model; the output adds an `adapter` column.
Flags only; the work is `jaxpeft.mixed.predict_cli`.
"""

from absl import flags

from jaxpeft.cli import start
from jaxpeft.mixed import predict_cli

flags.DEFINE_string("run", "", "A run folder (its best/ adapter) or an adapter folder.")
flags.DEFINE_multi_string("adapter", [], "Repeated: several adapters over one base, each as "
                          "name=folder (a run or adapter folder); each input row names one in "
                          "--adapter_column.")
flags.DEFINE_string("adapter_column", "adapter", "With --adapter: the input column naming "
                    "each row's adapter.")
flags.DEFINE_string("input", None, "TSV with a header, JSON lines, or '-' for stdin.",
                    required=True)
flags.DEFINE_string("output", "", "Where to write the TSV (default: stdout).")
flags.DEFINE_string("model", "", "Base model (default: the one the adapters were trained on).")
flags.DEFINE_list("text_columns", [], "With --run: the input's text column(s) (default: found "
                  "by the task's field names).")
flags.DEFINE_integer("batch_size", 64, "Rows per forward pass.")


def main() -> int:
    f = flags.FLAGS
    return predict_cli(f.run or None, f.adapter, f.input, f.output or None, f.model or None,
                       tuple(f.text_columns) or None, f.adapter_column, f.batch_size)


def cli():
    """Console-script entry point."""
    start(main, __name__)


if __name__ == "__main__":
    cli()
