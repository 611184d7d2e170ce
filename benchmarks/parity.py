"""Largest differences between jaxpeft and PyTorch transformers on real GLUE dev sentences.

  python -m benchmarks.parity --data_dir=../shared/glue_data --n=64

MiniLM wrapped as BertForSequenceClassification with a seeded head (2 labels on SST-2
sentences, regression on STS-B pairs), saved and loaded by jaxpeft; one padded batch each.
Prints max |logit difference| and max |last hidden state difference| (all positions, and
real tokens only). Needs torch (requirements-dev.txt).
"""

import tempfile

import numpy as np
import torch
import transformers
from absl import app, flags

import jaxpeft
from jaxpeft.data import load_split
from jaxpeft.models.checkpoint import minilm_path

flags.DEFINE_string("data_dir", "../shared/glue_data", "GLUE folder")
flags.DEFINE_integer("n", 64, "examples per batch")


def main(_):
    f = flags.FLAGS
    folder = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    sst2 = load_split("sst2", "validation", f.data_dir).take(f.n)
    stsb = load_split("stsb", "validation", f.data_dir).take(f.n)
    for name, num_labels, split in (("SST-2", 2, sst2), ("STS-B", 1, stsb)):
        out = tempfile.mkdtemp()
        torch.manual_seed(1234)
        ref = transformers.BertForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels).eval()
        ref.save_pretrained(out)
        tok.save_pretrained(out)
        pre = jaxpeft.load_pretrained(out)
        enc = tok(split.text_a, split.text_b, padding=True, return_tensors="np")
        args = [enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
        with torch.no_grad():
            r = ref(*(torch.tensor(a) for a in args), output_hidden_states=True)
        logits, hidden = pre.model.apply({"params": pre.params}, *args, deterministic=True,
                                         output_hidden_states=True)
        dl = np.abs(np.asarray(logits) - r.logits.numpy()).max()
        dh = np.abs(np.asarray(hidden) - r.hidden_states[-1].numpy())
        real = enc["attention_mask"][..., None].astype(bool)
        print(f"{name}: batch {args[0].shape}, max |dlogit| {dl:.2e}, max |dhidden| "
              f"{dh.max():.2e} (real tokens {np.where(real, dh, 0).max():.2e})")


if __name__ == "__main__":
    app.run(main)
