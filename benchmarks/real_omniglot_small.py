"""Convert the real small Omniglot sets kept in tests/fixtures/omniglot-small into a kml data root.

The two small background sets Omniglot's authors publish (MIT; 242 characters x 20 drawers) are repackaged
into the real archives' layout (kml.data.sources.omniglot.small_archives) and converted by the same code
``download.py`` runs, with the ``lake`` split: background alphabets for meta-train/val, held-out alphabets for
meta-test. The result is the ``omniglot`` mode of that data root, used as the real fourth mode of the README's
CPU-sized results.

    python benchmarks/real_omniglot_small.py --root data-small
    kml-train --modes synthetic omniglot --data-root data-small ...
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from kml.data.sources import prepare
from kml.data.sources.omniglot import small_archives
from kml.data.sources.prepare import format_summary

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "omniglot-small"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data-small", help="data root to convert into")
    parser.add_argument("--force", action="store_true", help="convert again")
    args = parser.parse_args()
    files = small_archives(FIXTURE / "images_background_small1.zip", FIXTURE / "images_background_small2.zip")
    raw = Path(args.root) / "raw" / "omniglot"
    raw.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():  # placed by hand, as on an offline machine
        (raw / name).write_bytes(data)
    checksums = {name: "md5:" + hashlib.md5(data).hexdigest() for name, data in files.items()}
    rows = prepare(
        ["omniglot"],
        args.root,
        force=args.force,
        split_variant="omniglot=lake",
        checksums=checksums,
        mirrors=["http://127.0.0.1:9/"],
        progress=False,
    )
    print(format_summary(rows))


if __name__ == "__main__":
    main()
