#!/usr/bin/env python
"""Download, verify and convert the few-shot benchmarks into the kml cache.

    python download.py --datasets omniglot miniimagenet fc100 cub aircraft --root data

The same command as ``kml-download`` (installed with the package): a thin script over
:func:`kml.cli.download.main`; see docs/guide/datasets.md.
"""

import sys

from kml.cli.download import main, parse_args  # noqa: F401 - parse_args for scripts that load this file

if __name__ == "__main__":
    sys.exit(main(prog="python download.py"))
