"""Tables and plots from the run folders or study files under --root (reads only the runs'
JSON files); with --pack, keeps the runs under --root as one study file instead.

  python -m experiments.report --root=runs/lr --out=docs/RESULTS_lr.md --plots_dir=docs/plots
  python -m experiments.report --root=runs/a --root=runs/b/some-run --out=combined.md
  python -m experiments.report --root=runs/lr --pack=docs/studies/lr.jsonl.gz
  python -m experiments.report --root=docs/studies/lr.jsonl.gz --out=docs/results/lr.md

Flags only; the work is `jaxpeft.plots.report_cli`.
"""

from absl import flags

from jaxpeft.cli import start
from jaxpeft.plots import report_cli

flags.DEFINE_multi_string("root", ["runs"], "Folder searched for runs (results.json files), "
                          "or a study file (.jsonl.gz); repeat to combine them.")
flags.DEFINE_string("out", "", "Markdown file to write (default: <root>/report.md).")
flags.DEFINE_string("plots_dir", "", "Where PNG plots go (default: <root>/plots).")
flags.DEFINE_string("pack", "", "Instead of a report, write the runs under --root into this "
                    "study file (.jsonl.gz: one record per run, config, results, metrics).")


def main() -> int:
    f = flags.FLAGS
    return report_cli(f.root, f.out, f.plots_dir, f.pack)


def cli():
    """Console-script entry point."""
    start(main, __name__)


if __name__ == "__main__":
    cli()
