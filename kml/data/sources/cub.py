"""CUB-200-2011: 11788 photographs of 200 bird species.

Raw layout::

    CUB_200_2011.tgz -> CUB_200_2011/images/<NNN.Name>/<Name>_<id>.jpg
                        CUB_200_2011/classes.txt   "<class id> <NNN.Name>"
                        CUB_200_2011/images.txt    "<image id> <NNN.Name>/<file>.jpg"
                        (+ bounding_boxes.txt, image_class_labels.txt, ... not used)

Split (published MMAML/KML): the 200 class names sorted (the published script
shuffles an unsorted ``os.listdir``; kml sorts first so the split does not
depend on the file system), shuffled with ``numpy.random.RandomState(123)``,
then 70 / 15 / 15 % -> 140 / 30 / 30 classes. Images are squashed to 84 x 84
RGB (grey photos are tiled to RGB), no bounding-box crop, as published.
Reuses learn2learn's ``<root>/cubirds200/CUB_200_2011/`` when present.
"""

from __future__ import annotations

from pathlib import Path

from kml.data.sources.base import Context, ConversionPlan, split_by_fractions
from kml.data.sources.fetch import Resource
from kml.data.sources.images import IMAGE_SUFFIXES, ClassPlan, load_image
from kml.errors import KMLError

__all__ = ["build", "FRACTIONS", "LICENCE", "NAME", "RESOURCES", "SEED", "SIDE", "SOURCE", "SPLIT_RULES", "VARIANTS"]

NAME = "cub"
SIDE = 84
SOURCE = "Caltech-UCSD Birds-200-2011 (Wah et al. 2011), CUB_200_2011.tgz from data.caltech.edu"
LICENCE = "research and educational use; photos from Flickr, copyright of their owners (Caltech DATA record)"
RESOURCES = (
    Resource(
        "CUB_200_2011.tgz",
        (
            "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
            # the old location (dead at the time of writing), kept as a fallback
            "http://www.vision.caltech.edu/visipedia-data/CUB-200-2011/CUB_200_2011.tgz",
        ),
        "md5:97eceeb196236b17998738112f37df78",
        1_150_000_000,
    ),
)
FRACTIONS = (70, 15, 15)
SEED = 123
VARIANTS = {"published": (FRACTIONS, SEED)}
SPLIT_RULES = {
    "published": "200 class folders sorted, shuffled with numpy RandomState(123), then 70/15/15 % -> 140/30/30"
}


def _listing(base: Path) -> dict[str, list[str]]:
    """Class -> image paths relative to ``images/``, from images.txt (or the folders when it is absent)."""
    classes: dict[str, list[str]] = {}
    if (base / "classes.txt").is_file():
        for line in (base / "classes.txt").read_text().splitlines():
            if line.strip():
                classes[line.split(maxsplit=1)[1].strip()] = []
    if (base / "images.txt").is_file():
        for line in (base / "images.txt").read_text().splitlines():
            if line.strip():
                rel = line.split(maxsplit=1)[1].strip()
                name = rel.split("/", 1)[0]
                if classes and name not in classes:
                    raise KMLError(f"{base}/images.txt lists {rel!r} whose class is not in classes.txt")
                classes.setdefault(name, []).append(rel)
    else:  # an images/ folder placed by hand without the text files
        for folder in sorted((base / "images").iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                classes[folder.name] = [
                    f"{folder.name}/{p.name}" for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
                ]
    return classes


def build(ctx: Context) -> ConversionPlan:
    folder = ctx.obtain(
        RESOURCES,
        expect=["CUB_200_2011/images"],
        reuse=[(ctx.root / "cubirds200", "learn2learn CUBirds200 download")],
        archive_dirs=[ctx.root / "cubirds200", ctx.root / "cub"],
    )
    base = folder / "CUB_200_2011"
    classes = _listing(base)
    if len(classes) != 200:
        raise KMLError(f"cub: found {len(classes)} classes under {base}, expected 200; the archive is incomplete")
    fractions, seed = VARIANTS[ctx.variant]
    cuts = split_by_fractions(sorted(classes), fractions, seed)
    splits = {
        split: [ClassPlan(name, [base / "images" / rel for rel in sorted(classes[name])]) for name in names]
        for split, names in cuts.items()
    }
    return ConversionPlan(
        splits,
        decode=lambda path: load_image(path, SIDE, 3),
        describe=lambda path: str(Path(path).relative_to(folder)),
        info={
            "split_rule": SPLIT_RULES[ctx.variant],
            "preprocessing": f"RGB, Lanczos resize (squash) to {SIDE}x{SIDE}, no crop",
        },
    )
