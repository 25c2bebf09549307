"""kml-convert-checkpoint: rewrite a trusted checkpoint that needs code to load as one kml reads safely.

    kml-convert-checkpoint old.pt new.pt --trust

kml reads every checkpoint with torch.load(weights_only=True): tensors and plain values only, so a
checkpoint from a stranger cannot run code. A file that needs more (numpy arrays, custom classes) is
refused; if you trust where it came from, this command unpickles it in full once (running any code
it holds), turns numpy values into tensors and numbers, and writes a checkpoint every kml command loads.
"""

from __future__ import annotations

import argparse

from kml.cli.common import ArgumentParser
from kml.errors import exit_on_kml_error
from kml.runtime.threads import configure_threads

__all__ = ["build_parser", "main"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="kml-convert-checkpoint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="the checkpoint to convert")
    parser.add_argument("target", help="where to write the converted checkpoint (may be the source)")
    parser.add_argument(
        "--trust", action="store_true", help="you trust the source's origin: it is unpickled in full, running its code"
    )
    return parser


@exit_on_kml_error
def main(argv: list[str] | None = None) -> int:
    configure_threads()  # before torch loads OpenMP
    args = build_parser().parse_args(argv)
    from kml.training.checkpoint import convert_checkpoint

    target = convert_checkpoint(args.source, args.target, trust=args.trust)
    print(f"wrote {target}: it loads with torch.load(weights_only=True)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
