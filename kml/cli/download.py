"""kml-download: download (or find), verify and convert the few-shot benchmarks into the kml cache.

    kml-download --datasets omniglot miniimagenet fc100 cub aircraft --root data
    python download.py --datasets omniglot --root data      # the same command, from a repository checkout

A thin command line over :func:`kml.data.sources.prepare`; see the guide's
"Datasets" page (docs/guide/datasets.md) for sources, sizes, splits and where to place archives by hand.
Bad input is one ``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from kml.cli.common import ArgumentParser
from kml.config.checks import Number, check_number
from kml.errors import KMLError, exit_on_kml_error
from kml.runtime.threads import configure_threads

__all__ = ["build_parser", "main", "parse_args", "parse_checksums"]


def build_parser(prog: str = "kml-download") -> ArgumentParser:
    """The command line's parser (one-line errors, exit status 2)."""
    # imported here, not at the top: kml.data loads torch, and importing this module must not (tests/test_threads.py)
    from kml.data.modes import DATASET_MODES
    from kml.data.sources.base import MIRROR_ENV

    parser = ArgumentParser(
        prog=prog,
        description="Download (or find), verify, extract and convert few-shot datasets into <root>/cache/.",
        epilog="Archives placed by hand under <root>/raw/<dataset>/ (or directly under <root>) are used without "
        "touching the network.",
    )
    _add_source_arguments(parser, DATASET_MODES, MIRROR_ENV)
    _add_conversion_arguments(parser)
    return parser


def _add_source_arguments(parser: ArgumentParser, datasets: Sequence[str], mirror_env: str) -> None:
    """What to prepare and where the raw files come from (--datasets ... --timeout)."""
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=list(datasets),
        metavar="NAME",
        help=f"datasets to prepare (default: all): {', '.join(datasets)}; aliases FC100, bird, ...",
    )
    parser.add_argument("--root", default="data", help="data root (default: data)")
    parser.add_argument("--force", action="store_true", help="convert again even if a complete cache exists")
    parser.add_argument(
        "--split",
        default=None,
        metavar="VARIANT",
        help="class split variant, e.g. 'vinyals' (Omniglot 1200/100/323), 'omniglot=released' (the released "
        "MMAML/KML 1100/0/523, sorted) or 'omniglot=lake'; default: the published split of each dataset",
    )
    parser.add_argument(
        "--mirror",
        action="append",
        default=None,
        metavar="URL",
        help=f"base URL serving the archives by file name, replacing the built-in locations "
        f"(repeatable, tried in order; default from ${mirror_env})",
    )
    parser.add_argument(
        "--checksum",
        action="append",
        default=[],
        metavar="FILE=MD5",
        help="override the expected checksum of an archive (md5 or sha256:<hex>), e.g. for a mirror's copy",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a download that receives less than 32 KiB in this many seconds (or a server silent for as long) "
        "is abandoned for the next mirror (default: 60)",
    )


def _add_conversion_arguments(parser: ArgumentParser) -> None:
    """How the raw files are converted into the cache (--on-corrupt ... --quiet)."""
    parser.add_argument(
        "--on-corrupt",
        choices=("stop", "skip"),
        default="stop",
        help="an image that cannot be decoded stops the conversion (default) or is skipped and counted",
    )
    parser.add_argument(
        "--no-crop",
        action="store_true",
        help="aircraft: keep the whole photo (minus its copyright banner) instead of the bounding box",
    )
    parser.add_argument(
        "--aircraft-banner",
        action="store_true",
        help="aircraft with --no-crop: keep the 20-pixel copyright banner too, as the released MMAML/KML converters",
    )
    parser.add_argument(
        "--aircraft-misfile",
        action="store_true",
        help="aircraft: file the images as the released MMAML converter does (F/A-18 lands in no split: 70/15/14)",
    )
    parser.add_argument(
        "--fc100-colours",
        choices=("clean", "released"),
        default="clean",
        help="fc100: the archive's bytes at 32 px (default) or as the released loader sees them (ToPILImage of a "
        "0..255 float: x*255 mod 256, then Lanczos to 84)",
    )
    parser.add_argument(
        "--omniglot-side",
        type=int,
        default=28,
        help="stored Omniglot side: 28 (default) or 84, the published mixtures' 105 -> 84 Lanczos (see docs/guide/methods.md, Fidelity)",
    )
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="delete <root>/raw/<dataset>/extracted/ (what kml extracted) after converting; archives and folders "
        "placed by hand stay",
    )
    parser.add_argument("--workers", type=int, default=None, help="image decoding threads (default: cores, at most 8)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_args(argv: list[str] | None = None, prog: str = "kml-download") -> argparse.Namespace:
    """The parsed command line (``sys.argv[1:]`` when ``argv`` is ``None``)."""
    return build_parser(prog).parse_args(argv)


def parse_checksums(items: list[str]) -> dict[str, str]:
    """``--checksum FILE=MD5`` values as ``{file: checksum}``; a malformed one is a :class:`KMLError`."""
    from kml.data.sources.fetch import parse_checksum  # here, not at the top: kml.data loads torch

    checksums = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise KMLError(f"--checksum expects FILE=MD5, got {item!r}")
        try:
            parse_checksum(value)
        except KMLError as error:
            raise KMLError(f"--checksum {item!r}: {error}") from None
        checksums[name] = value
    return checksums


@exit_on_kml_error
def main(argv: list[str] | None = None, prog: str = "kml-download") -> int:
    """Run the command line; returns 0, or exits with status 2 and one error line."""
    configure_threads()  # before torch loads OpenMP (the conversion decodes images with torch threads)
    args = parse_args(argv, prog)
    check_number("--workers", args.workers, Number(int, 1, optional=True))  # 0 or -1 would reach the thread pool
    check_number("--timeout", args.timeout, Number(float, 0, above=True))
    checksums = parse_checksums(args.checksum)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)

    from kml.data.sources import format_summary, prepare

    rows = prepare(
        args.datasets,
        root=args.root,
        force=args.force,
        split_variant=args.split,
        mirrors=args.mirror,
        checksums=checksums,
        on_corrupt=args.on_corrupt,
        crop=not args.no_crop,
        omniglot_side=args.omniglot_side,
        aircraft_banner=args.aircraft_banner,
        fc100_colours=args.fc100_colours,
        aircraft_misfile=args.aircraft_misfile,
        cleanup=args.cleanup,
        progress=not args.quiet,
        workers=args.workers,
        timeout=args.timeout,
        keep_going=True,
    )
    print(format_summary(rows))
    failed = [row for row in rows if row.error]
    for row in failed:
        print(f"error: {row.dataset}: {row.error}", file=sys.stderr)
    if failed:
        raise KMLError(
            f"{len(failed)} of {len(rows)} datasets failed: {', '.join(r.dataset for r in failed)} (see above)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
