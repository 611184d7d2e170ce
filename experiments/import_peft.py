r"""Import an adapter trained with Hugging Face peft (PyTorch) as a jaxpeft adapter folder.

  python -m experiments.import_peft --peft_dir=my_peft_adapter --model=minilm --task=sst2 \
      --output=runs/imported-sst2
  python -m experiments.predict --run=runs/imported-sst2 --input=reviews.tsv

LoRA, DoRA, IA3, LN-tuning and prompt tuning adapters of BERT/RoBERTa sequence classifiers
(task_type SEQ_CLS, head in modules_to_save). Flags only; the work is
`jaxpeft.peft.hf_import.convert_peft_adapter`.
"""

from absl import flags

from jaxpeft.cli import start
from jaxpeft.peft.hf_import import convert_cli

flags.DEFINE_string("peft_dir", None, "Folder with adapter_config.json and "
                    "adapter_model.safetensors.", required=True)
flags.DEFINE_string("model", None, "The base model the adapter was trained on (hub id, "
                    "folder, or minilm).", required=True)
flags.DEFINE_string("task", None, "GLUE task the adapter's head predicts.", required=True)
flags.DEFINE_string("output", None, "Where to write the jaxpeft adapter folder.",
                    required=True)
flags.DEFINE_integer("max_seq_length", 128, "Token length to predict with.")


def main() -> int:
    f = flags.FLAGS
    return convert_cli(f.peft_dir, f.model, f.task, f.output, f.max_seq_length)


def cli():
    """Console-script entry point."""
    start(main, __name__)


if __name__ == "__main__":
    cli()
