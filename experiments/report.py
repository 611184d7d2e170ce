"""Tables and plots from the run folders under --root (reads only their JSON files).

  python -m experiments.report --root=runs/lr --out=docs/RESULTS_lr.md --plots_dir=docs/plots
  python -m experiments.report --root=runs/a --root=runs/b/some-run --out=combined.md

Flags only; the work is `jaxpeft.plots.write_report`.
"""

import functools
import sys

from absl import app, flags

from jaxpeft import config
from jaxpeft.errors import JaxpeftError
from jaxpeft.plots import write_report

flags.DEFINE_multi_string("root", ["runs"], "Folder searched for runs (results.json files); "
                          "repeat to combine folders or single run folders.")
flags.DEFINE_string("out", "", "Markdown file to write (default: <root>/report.md).")
flags.DEFINE_string("plots_dir", "", "Where PNG plots go (default: <root>/plots).")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    try:
        print(write_report(f.root, f.out, f.plots_dir))
    except JaxpeftError as e:
        sys.exit(f"error: {e}")


def cli():
    """Console-script entry point (`pip install` makes one per experiment script)."""
    app.run(main, flags_parser=functools.partial(config.parse_flags, module=__name__))


if __name__ == "__main__":
    cli()
