"""Omniglot: 1623 handwritten characters from 50 alphabets, 20 drawers each.

Raw layout (the two archives torchvision downloads)::

    images_background.zip -> images_background/<Alphabet>/<characterNN>/<id>_<drawer>.png  (30 alphabets, 964 chars)
    images_evaluation.zip -> images_evaluation/<Alphabet>/<characterNN>/<id>_<drawer>.png  (20 alphabets, 659 chars)

Splits (all on the 1623 character folders of both archives together, sorted by
their path ``images_background/...`` then ``images_evaluation/...``):

- ``published`` (default): the published MMAML/KML code takes the first 1100
  folders of an *unsorted* glob as meta-train and the other 523 as meta-test,
  so its split depends on the file system; kml sorts first. The published
  code has no meta-val; kml carves it from the end of the published
  meta-train: train = folders 1-1000, val = 1001-1100, test = 1101-1623 (the
  published meta-test size and rule).
- ``released``: the released MMAML/KML split itself, 1100 / 0 / 523: the
  first 1100 folders for meta-train, no meta-val (a run validates on its
  other modes only), the last 523 for meta-test. The released code takes the
  first 1100 of an unsorted ``glob`` (``maml/datasets/omniglot.py`` lines 38-42
  of MMAML-Classification, ``scripts/datasets/omniglot.py`` of
  KML-Classification), whose order is the file system's: no one can
  reproduce that order, so kml cuts the same counts from the sorted folders.
- ``vinyals``: the common 1200 / 100 / 323 split (Vinyals et al. 2016) on the
  same sorted order.
- ``lake``: by alphabet, as Omniglot's authors split it: the background
  archive's alphabets for meta-train (its last 10% of alphabets by name, at
  least one, held out for meta-val), the evaluation archive's alphabets for
  meta-test (964 / 659 characters less the validation alphabets). Test
  characters come from alphabets never seen in training. It also accepts
  partial archives (e.g. the authors' small background sets repackaged), since
  it needs no fixed character count.

Stored grey at 28 x 28 (Lanczos, as the published code), inverted so strokes
are bright on black; the store tiles grey to 3 channels when modes are mixed.
``kml-download --omniglot-side 84`` stores it at 84 instead: the 105-pixel
originals Lanczos-resized straight to 84, as the published mixtures use it (a
28-pixel store is brought up to a mixture's side bilinearly at load).
Reuses torchvision's / learn2learn's ``<root>/omniglot-py/`` when present.
"""

from __future__ import annotations

from pathlib import Path

from kml.data.sources.base import Context, ConversionPlan
from kml.data.sources.fetch import Resource
from kml.data.sources.images import ClassPlan, load_image
from kml.errors import KMLError

__all__ = [
    "build",
    "LAKE_VAL_FRACTION",
    "LICENCE",
    "NAME",
    "NUM_CHARACTERS",
    "RESOURCES",
    "SIDE",
    "small_archives",
    "SOURCE",
    "SPLIT_RULES",
    "TOP_FOLDERS",
    "VARIANTS",
]

NAME = "omniglot"
SIDE = 28
SOURCE = (
    "Omniglot (Lake et al. 2015), images_background.zip + images_evaluation.zip from github.com/brendenlake/omniglot"
)
LICENCE = "MIT licence (github.com/brendenlake/omniglot)"
_BASES = (
    "https://raw.githubusercontent.com/brendenlake/omniglot/master/python",
    "https://github.com/brendenlake/omniglot/raw/master/python",
)
RESOURCES = (
    Resource(
        "images_background.zip",
        tuple(f"{base}/images_background.zip" for base in _BASES),
        "md5:68d2efa1b9178cc56df9314c21c6e718",  # torchvision's
        9_500_000,
    ),
    Resource(
        "images_evaluation.zip",
        tuple(f"{base}/images_evaluation.zip" for base in _BASES),
        "md5:6b91aef0f799c5bb55b94e3f2daec811",  # torchvision's
        6_500_000,
    ),
)
TOP_FOLDERS = ("images_background", "images_evaluation")
NUM_CHARACTERS = 1623
# variant -> (train, val, test) character counts on the sorted folder list
# character counts (train, val, test) of each split by count; "lake" splits by alphabet instead
VARIANTS: dict[str, tuple[int, int, int] | None] = {
    "published": (1000, 100, 523),
    "vinyals": (1200, 100, 323),
    "lake": None,
    "released": (1100, 0, 523),
}
LAKE_VAL_FRACTION = 0.1
SPLIT_RULES = {
    "lake": "by alphabet: train = images_background alphabets sorted by name except the last 10% (at least one), "
    "val = those last background alphabets, test = every images_evaluation alphabet",
    "published": "1623 character folders of both archives sorted by path; train = first 1000, val = next 100 "
    "(the published meta-train is the first 1100), test = last 523 (the published meta-test)",
    "vinyals": "1623 character folders of both archives sorted by path; "
    "train = first 1200, val = next 100, test = last 323",
    "released": "1623 character folders of both archives sorted by path (the released code's glob is unsorted); "
    "train = first 1100, no val, test = last 523 (the released MMAML/KML split)",
}


def _characters(folder: Path) -> list[str]:
    """Relative paths ``images_*/<Alphabet>/<character>`` of every character folder, sorted."""
    found = []
    for top in TOP_FOLDERS:
        for alphabet in sorted((folder / top).iterdir()):
            if alphabet.is_dir() and not alphabet.name.startswith((".", "__")):
                found += [
                    f"{top}/{alphabet.name}/{c.name}"
                    for c in alphabet.iterdir()
                    if c.is_dir() and not c.name.startswith(".")
                ]
    return sorted(found)


def small_archives(small1: Path, small2: Path) -> dict[str, bytes]:
    """Omniglot's two small background sets as ``images_background.zip`` and ``images_evaluation.zip``.

    ``small1`` (5 alphabets) becomes the background archive; ``small2``'s alphabets that ``small1`` lacks (it
    repeats Greek and Latin) become the evaluation archive: 242 distinct characters in the real layout, for
    ``--split lake`` (held-out alphabets). Both are real handwriting, published by Omniglot's authors (MIT).
    """
    import io
    import zipfile

    def repackage(source: Path, top: str, keep) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(source) as archive, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as repacked:
            for name in archive.namelist():
                parts = name.split("/", 2)
                if len(parts) == 3 and parts[2] and not name.endswith("/") and keep(parts[1]):
                    repacked.writestr(f"{top}/{parts[1]}/{parts[2]}", archive.read(name))
        return out.getvalue()

    with zipfile.ZipFile(small1) as archive:
        background = {name.split("/")[1] for name in archive.namelist() if name.count("/") >= 2}
    return {
        "images_background.zip": repackage(small1, "images_background", lambda _alphabet: True),
        "images_evaluation.zip": repackage(small2, "images_evaluation", lambda alphabet: alphabet not in background),
    }


def _alphabet_split(characters: list[str]) -> dict[str, list[str]]:
    """The ``lake`` split of ``images_*/<Alphabet>/<character>`` paths: held-out alphabets for val and test."""
    background = sorted({c.split("/")[1] for c in characters if c.startswith("images_background/")})
    evaluation = [c for c in characters if c.startswith("images_evaluation/")]
    if len(background) < 2 or not evaluation:
        raise KMLError(
            f"omniglot --split lake needs at least 2 alphabets in images_background and 1 in images_evaluation, "
            f"found {len(background)} and {len({c.split('/')[1] for c in evaluation})}"
        )
    held_out = set(background[-max(1, round(LAKE_VAL_FRACTION * len(background))) :])
    in_background = [c for c in characters if c.startswith("images_background/")]
    return {
        "train": [c for c in in_background if c.split("/")[1] not in held_out],
        "val": [c for c in in_background if c.split("/")[1] in held_out],
        "test": evaluation,
    }


def build(ctx: Context) -> ConversionPlan:
    folder = ctx.obtain(
        RESOURCES,
        expect=TOP_FOLDERS,
        reuse=[(ctx.root / "omniglot-py", "torchvision/learn2learn Omniglot download")],
        archive_dirs=[ctx.root / "omniglot-py"],
    )
    characters = _characters(folder)
    side = int(ctx.options.get("omniglot_side", SIDE))  # 84 for the published mixtures (105 -> 84 Lanczos)
    if ctx.variant == "lake":
        cuts = _alphabet_split(characters)
    elif len(characters) != NUM_CHARACTERS:
        raise KMLError(
            f"omniglot: found {len(characters)} character folders under {folder}/images_*, expected {NUM_CHARACTERS}; "
            f"the archives are incomplete (delete {folder} and rerun)"
        )
    else:
        counts = VARIANTS[ctx.variant]
        assert counts is not None  # only "lake" has none, handled above
        n_train, n_val, _ = counts
        cuts = {
            "train": characters[:n_train],
            "val": characters[n_train : n_train + n_val],
            "test": characters[n_train + n_val :],
        }
    splits = {
        split: [
            ClassPlan(rel.split("/", 1)[1], sorted(p for p in (folder / rel).iterdir() if p.suffix.lower() == ".png"))
            for rel in rels
        ]
        for split, rels in cuts.items()
    }
    return ConversionPlan(
        splits,
        decode=lambda path: load_image(path, side, 1, invert=True),
        describe=lambda path: str(Path(path).relative_to(folder)),
        info={
            "split_rule": SPLIT_RULES[ctx.variant],
            "preprocessing": f"grey, Lanczos resize to {side}x{side}, inverted (255 - x) so strokes are bright",
        },
    )
