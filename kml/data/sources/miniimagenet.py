"""mini-ImageNet: 100 ImageNet classes x 600 images, Ravi & Larochelle's 64 / 16 / 20 split.

Accepted raw layouts, tried in this order (no network for any of them):

1. learn2learn's pickles ``mini-imagenet-cache-{train,validation,test}.pkl``
   (also ``-val.pkl``, as in torchmeta's ``mini-imagenet.tar.gz``): a dict with
   ``'image_data'`` uint8 ``[N, 84, 84, 3]`` and ``'class_dict'`` ``{wnid: [indices]}``;
   looked for in ``raw/miniimagenet/``, the root, ``<root>/mini-imagenet/``,
   ``<root>/miniimagenet/``.
2. torchmeta's HDF5 files ``<root>/miniimagenet/{train,val,test}_data.hdf5``
   (group ``datasets/<wnid>`` uint8 ``[n, 84, 84, 3]``) with ``{split}_labels.json``,
   only when ``h5py`` is importable.
3. An ``images/`` folder of ``<wnid><8 digits>.jpg`` files (the MMAML
   ``mini-imagenet.zip``) with the Ravi & Larochelle ``train.csv``,
   ``val.csv``, ``test.csv`` (``filename,label``) beside it; without the csv
   files the class of an image is its file-name prefix and the split is the
   wnid lists below (the same split).
4. ``mini-imagenet.tar.gz`` (torchmeta's, holds the pickles) or
   ``mini-imagenet.zip`` (MMAML's, an ``images/`` folder) placed by hand.

Otherwise the three learn2learn pickles are downloaded (Zenodo, then Dropbox).
The usual MMAML source is a Google Drive file that refuses scripted downloads;
the error message then says where to put which file. No checksum of these
files is published: the computed md5 is recorded in the manifest. Whatever the
source, the class lists must match the Ravi & Larochelle split exactly.
Images are stored RGB at 84 x 84 (Lanczos resize when a source is not 84).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from kml.data.sources.base import Context, ConversionPlan
from kml.data.sources.fetch import Resource
from kml.data.sources.images import ClassPlan, key, load_image, load_pickle, resize_array
from kml.errors import KMLError

__all__ = [
    "build",
    "LICENCE",
    "MMAML_ZIP",
    "NAME",
    "PICKLE_NAMES",
    "RESOURCES",
    "SIDE",
    "SOURCE",
    "SPLIT_RULES",
    "TORCHMETA_TAR",
    "VARIANTS",
    "WNIDS",
]

NAME = "miniimagenet"
SIDE = 84
SOURCE = "mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle 2017 split"
LICENCE = "ImageNet terms of access: non-commercial research and education only (image-net.org)"
WNIDS = {
    "train": (
        "n01532829 n01558993 n01704323 n01749939 n01770081 n01843383 n01910747 n02074367 n02089867 n02091831 "
        "n02101006 n02105505 n02108089 n02108551 n02108915 n02111277 n02113712 n02120079 n02165456 n02457408 "
        "n02606052 n02687172 n02747177 n02795169 n02823428 n02966193 n03017168 n03047690 n03062245 n03207743 "
        "n03220513 n03337140 n03347037 n03400231 n03476684 n03527444 n03676483 n03838899 n03854065 n03888605 "
        "n03908618 n03924679 n03998194 n04067472 n04243546 n04251144 n04258138 n04275548 n04296562 n04389033 "
        "n04435653 n04443257 n04509417 n04515003 n04596742 n04604644 n04612504 n06794110 n07584110 n07697537 "
        "n07747607 n09246464 n13054560 n13133613"
    ).split(),
    "val": (
        "n01855672 n02091244 n02114548 n02138441 n02174001 n02950826 n02971356 n02981792 n03075370 n03417042 "
        "n03535780 n03584254 n03770439 n03773504 n03980874 n09256479"
    ).split(),
    "test": (
        "n01930112 n01981276 n02099601 n02110063 n02110341 n02116738 n02129165 n02219486 n02443484 n02871525 "
        "n03127925 n03146219 n03272010 n03544143 n03775546 n04146614 n04149813 n04418357 n04522168 n07613480"
    ).split(),
}
VARIANTS = {"published": WNIDS}
SPLIT_RULES = {"published": "Ravi & Larochelle 2017: 64 / 16 / 20 classes (the csv split files)"}
PICKLE_NAMES = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
_ZENODO = "https://zenodo.org/record/7978538/files"
_DROPBOX = {
    "train": "https://www.dropbox.com/s/9g8c6w345s2ek03/mini-imagenet-cache-train.pkl?dl=1",
    "validation": "https://www.dropbox.com/s/ip1b7se3gij3r1b/mini-imagenet-cache-validation.pkl?dl=1",
    "test": "https://www.dropbox.com/s/ye9jeb5tyz0x01b/mini-imagenet-cache-test.pkl?dl=1",
}
_PICKLE_SIZES = {"train": 820_000_000, "validation": 205_000_000, "test": 256_000_000}
RESOURCES = tuple(
    Resource(
        f"mini-imagenet-cache-{name}.pkl", (f"{_ZENODO}/mini-imagenet-cache-{name}.pkl", _DROPBOX[name]), None, size
    )
    for name, size in _PICKLE_SIZES.items()
)
TORCHMETA_TAR = Resource("mini-imagenet.tar.gz", (), "md5:b38f1eb4251fb9459ecc8e7febf9b2eb")  # torchmeta's md5
MMAML_ZIP = Resource("mini-imagenet.zip", ())


def _dirs(ctx: Context) -> list[Path]:
    return [ctx.raw_dir, ctx.root, ctx.root / "mini-imagenet", ctx.root / "miniimagenet", ctx.root / "mini_imagenet"]


def _manual(ctx: Context) -> str:
    return (
        f"place in {ctx.raw_dir}/ either learn2learn's mini-imagenet-cache-train.pkl, -validation.pkl and -test.pkl, "
        f"or torchmeta's mini-imagenet.tar.gz, or MMAML's mini-imagenet.zip (an images/ folder; its Google Drive "
        f"link refuses scripted downloads, open it in a browser) with the Ravi & Larochelle train.csv, val.csv, "
        f"test.csv if you have them; then rerun"
    )


def _check_classes(split: str, names, where: str) -> None:
    if set(names) != set(WNIDS[split]):
        extra, missing = sorted(set(names) - set(WNIDS[split])), sorted(set(WNIDS[split]) - set(names))
        raise KMLError(
            f"miniimagenet {split} classes in {where} are not the Ravi & Larochelle {split} split "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(extra)} unexpected, e.g. {extra[:3]})"
        )


def _find_pickles(ctx: Context, extracted: Path | None = None) -> dict[str, Path] | None:
    found = {}
    dirs = [*_dirs(ctx)[2:], *([extracted] if extracted else [])]
    for split, names in PICKLE_NAMES.items():
        path = next(
            (p for name in names if (p := ctx.find_file(f"mini-imagenet-cache-{name}.pkl", dirs)) is not None),
            None,
        )
        if path is None:
            return None
        found[split] = path
    return found


def _from_pickles(ctx: Context, paths: dict[str, Path]) -> ConversionPlan:
    arrays: dict[str, np.ndarray] = {}
    splits = {}
    for split, path in paths.items():
        if path.name not in ctx.sources:  # record its checksum (no network: the file is there)
            ctx.archive(Resource(path.name, ()), [path.parent])
        data = load_pickle(path)
        images, class_dict = np.asarray(key(data, "image_data")), key(data, "class_dict")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise KMLError(f"{path}: expected uint8 image_data [N, H, W, 3], got {images.dtype} {list(images.shape)}")
        names = {(k.decode() if isinstance(k, bytes) else k): v for k, v in class_dict.items()}
        _check_classes(split, names, path.name)
        arrays[split] = images
        splits[split] = [ClassPlan(w, [(split, int(i)) for i in names[w]]) for w in sorted(names)]
    return ConversionPlan(
        splits,
        decode=lambda item: resize_array(arrays[item[0]][item[1]], SIDE),
        describe=lambda item: f"{paths[item[0]].name}[{item[1]}]",
        info={"layout": "learn2learn pickles"},
    )


def _from_hdf5(ctx: Context, folder: Path) -> ConversionPlan:
    import h5py

    arrays: dict[tuple[str, str], np.ndarray] = {}
    splits = {}
    for split in WNIDS:
        names = json.loads((folder / f"{split}_labels.json").read_text())
        _check_classes(split, names, f"{folder}/{split}_labels.json")
        with h5py.File(folder / f"{split}_data.hdf5", "r") as handle:
            for wnid in names:
                arrays[(split, wnid)] = np.asarray(handle["datasets"][wnid][()], dtype=np.uint8)
        splits[split] = [ClassPlan(w, [(split, w, i) for i in range(len(arrays[(split, w)]))]) for w in sorted(names)]
    ctx.sources["torchmeta hdf5"] = {"origin": str(folder), "checksum": None, "verified": False}
    return ConversionPlan(
        splits,
        decode=lambda item: resize_array(arrays[item[:2]][item[2]], SIDE),
        describe=lambda item: f"{item[0]}_data.hdf5:datasets/{item[1]}[{item[2]}]",
        info={"layout": "torchmeta hdf5"},
    )


def _from_images(ctx: Context, folder: Path) -> ConversionPlan:
    images = folder / "images"
    splits = {}
    # the csv files come with the images, or are placed by hand beside the zip
    tables = next((f for f in (folder, ctx.raw_dir) if all((f / f"{s}.csv").is_file() for s in WNIDS)), None)
    if tables is not None:
        for split in WNIDS:
            with open(tables / f"{split}.csv", newline="") as handle:
                rows = [row for row in csv.reader(handle) if row and row[0] != "filename"]
            by_class: dict[str, list[Path]] = {}
            for filename, label in rows:
                by_class.setdefault(label, []).append(images / filename)
            _check_classes(split, by_class, f"{tables}/{split}.csv")
            splits[split] = [ClassPlan(w, sorted(by_class[w])) for w in sorted(by_class)]
        layout = "images/ folder with Ravi & Larochelle csv files"
    else:  # no csv: the class of an image is its wnid prefix
        by_class = {}
        for path in sorted(images.iterdir()):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
                by_class.setdefault(path.name[:9], []).append(path)
        unexpected = sorted(set(by_class) - {w for wnids in WNIDS.values() for w in wnids})
        if unexpected:
            raise KMLError(
                f"miniimagenet: {images} holds images of classes outside the Ravi & Larochelle split, "
                f"e.g. {unexpected[:3]}"
            )
        for split, wnids in WNIDS.items():
            _check_classes(split, [w for w in wnids if w in by_class], str(images))
            splits[split] = [ClassPlan(w, by_class[w]) for w in sorted(wnids)]
        layout = "images/ folder, classes from file names, built-in Ravi & Larochelle wnid lists"
    ctx.sources.setdefault("images", {"origin": str(images), "checksum": None, "verified": False})
    return ConversionPlan(
        splits,
        decode=lambda path: load_image(path, SIDE, 3),
        describe=lambda path: str(Path(path).relative_to(folder)),
        info={"layout": layout},
    )


def _plan(ctx: Context) -> ConversionPlan:
    pickles = _find_pickles(ctx)
    if pickles:
        return _from_pickles(ctx, pickles)
    torchmeta = ctx.root / "miniimagenet"
    if all((torchmeta / f"{s}_data.hdf5").is_file() and (torchmeta / f"{s}_labels.json").is_file() for s in WNIDS):
        try:
            import h5py  # noqa: F401
        except ImportError:
            pass
        else:
            return _from_hdf5(ctx, torchmeta)
    for folder in (ctx.raw_dir, ctx.root / "miniimagenet", ctx.root / "mini-imagenet"):
        if (folder / "images").is_dir():
            return _from_images(ctx, folder)
    for resource in (TORCHMETA_TAR, MMAML_ZIP):
        if ctx.find_file(resource.filename, _dirs(ctx)[2:]):
            folder = ctx.extracted(ctx.archive(resource, _dirs(ctx)[2:]))
            pickles = _find_pickles(ctx, folder)
            if pickles:
                return _from_pickles(ctx, pickles)
            if (folder / "images").is_dir():
                return _from_images(ctx, folder)
            raise KMLError(f"{resource.filename} holds neither mini-imagenet-cache-*.pkl nor an images/ folder")
    paths = {split: ctx.archive(resource, (), _manual(ctx)) for split, resource in zip(WNIDS, RESOURCES)}
    return _from_pickles(ctx, paths)


def build(ctx: Context) -> ConversionPlan:
    plan = _plan(ctx)
    plan.info.update(
        split_rule=SPLIT_RULES[ctx.variant], preprocessing=f"RGB at {SIDE}x{SIDE} (Lanczos resize when not {SIDE})"
    )
    return plan
