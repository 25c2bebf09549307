"""The released codes' data as options (issue 26), and published recipes that check their data.

Each option is checked against what the released MMAML/KML code does, on archives built in each dataset's exact
raw layout (tests/fixtures_datasets.py): the Omniglot split 1100 / 0 / 523, FC100 through ``ToPILImage`` of a
0..255 float tensor and Lanczos to 84, the Aircraft converter's filing that loses F/A-18. The recipe data check
runs on caches written as kml writes them (a manifest per split), old ones (without the new fields) included.
"""

from __future__ import annotations

import json
from pathlib import Path

import fixtures_datasets as fx
import numpy as np
import pytest
import torch
from PIL import Image
from test_training import one_line_error, tiny_args

from kml.cli import train as train_cli
from kml.config.data_checks import data_departures
from kml.data.modes import has_split, load_store
from kml.data.sources import prepare
from kml.data.sources.aircraft import released_filing
from kml.data.sources.cache import MARKER
from kml.data.sources.fc100 import released_colours
from kml.data.store import ImageStore, cache_dir
from kml.errors import KMLError

FAST = {"progress": False, "backoff": 0.01, "workers": 2}


def placed(root: Path, name: str, files: dict[str, bytes]) -> dict[str, str]:
    """Archives placed by hand under ``raw/<name>/`` (no network); their checksums, as for a mirror's copy."""
    (root / "raw" / name).mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        (root / "raw" / name / file).write_bytes(data)
    return {file: fx.md5(data) for file, data in files.items()}


def classes(root: Path, mode: str) -> dict[str, list[str]]:
    """Class names per split of a converted cache (splits it has only)."""
    return {
        split: load_store(mode, split, root).class_names
        for split in ("train", "val", "test")
        if has_split(mode, split, root)
    }


# ------------------------------------------------------------------ Omniglot: 1100 / 0 / 523
def test_released_omniglot_split_is_the_first_1100_sorted_folders_and_no_validation(tmp_path):
    sums = placed(tmp_path, "omniglot", fx.omniglot_archives(drawers=1))
    prepare(["omniglot"], tmp_path, split_variant="omniglot=released", checksums=sums, mirrors=[fx.dead_url()], **FAST)
    released = classes(tmp_path, "omniglot")
    assert {split: len(names) for split, names in released.items()} == {"train": 1100, "test": 523}
    assert not has_split("omniglot", "val", tmp_path) and not cache_dir(tmp_path, "omniglot", "val").exists()
    with pytest.raises(KMLError, match="has no val classes"):  # not "run kml-download": it was run
        load_store("omniglot", "val", tmp_path)
    marker = json.loads((tmp_path / "cache" / "omniglot" / MARKER).read_text())
    assert marker["options"]["variant"] == "released" and set(marker["splits"]) == {"train", "test"}
    assert "sorted" in load_store("omniglot", "test", tmp_path).info["split_rule"]

    prepare(["omniglot"], tmp_path, checksums=sums, mirrors=[fx.dead_url()], **FAST)  # kml's 1000 / 100 / 523
    published = classes(tmp_path, "omniglot")
    assert released["train"] == published["train"] + published["val"]  # the same sorted order, cut 1100 / 0
    assert released["test"] == published["test"]  # the same 523 meta-test characters
    assert has_split("omniglot", "val", tmp_path)


# ------------------------------------------------------------------ FC100 through ToPILImage
def test_released_fc100_colours_wrap_as_topilimage_of_a_float_tensor_then_lanczos_to_84(tmp_path):
    pixels = np.array([0, 1, 2, 127, 128, 129, 254, 255], dtype=np.uint8)
    assert released_colours(pixels).tolist() == [0, 255, 254, 129, 128, 127, 2, 1]  # x*255 mod 256 = -x mod 256
    sums = placed(tmp_path, "fc100", fx.cifar100_archive(train_per_class=1, test_per_class=1))
    prepare(["fc100"], tmp_path, fc100_colours="released", checksums=sums, mirrors=[fx.dead_url()], **FAST)
    store = load_store("fc100", "train", tmp_path)
    assert store.image_shape == (3, 84, 84) and store.info["colours"] == "released" and store.info["side"] == 84
    coarse, fine = (int(part.split("_")[1]) for part in store.class_names[0].split("/"))
    raw = fx.cifar_pixels(fine, coarse, 0)  # uint8 [3, 32, 32], the archive's bytes of the class's first image
    by_hand = (raw.astype(np.int64) * 255 % 256).astype(np.uint8).transpose(1, 2, 0)
    expected = np.asarray(Image.fromarray(by_hand).resize((84, 84), Image.LANCZOS)).transpose(2, 0, 1)
    assert torch.equal(store.class_images(0)[0], torch.from_numpy(np.ascontiguousarray(expected)))
    # torchvision 0.4 (the released requirements) converted with torch: mul(255).byte(), the same wrap on x86
    assert np.array_equal(torch.FloatTensor(raw.astype(np.float32)).mul(255).byte().numpy(), by_hand.transpose(2, 0, 1))
    clean = np.asarray(Image.fromarray(raw.transpose(1, 2, 0)).resize((84, 84), Image.LANCZOS)).transpose(2, 0, 1)
    assert np.abs(store.class_images(0)[0].numpy().astype(int) - clean).mean() > 50  # far from the clean colours

    transforms = pytest.importorskip("torchvision.transforms")  # the released loader's own pipeline, where installed
    loader = transforms.Compose([transforms.ToPILImage(), transforms.Resize(84, Image.LANCZOS)])
    seen = np.asarray(loader(torch.FloatTensor(raw.astype(np.float32)))).transpose(2, 0, 1)
    assert np.array_equal(seen, expected)


# ------------------------------------------------------------------ Aircraft: F/A-18 misfiled
def test_released_aircraft_filing_loses_fa18_and_leaves_14_test_classes(tmp_path):
    sums = placed(tmp_path, "aircraft", fx.aircraft_archive())
    common = {"crop": False, "aircraft_banner": True, "checksums": sums, "mirrors": [fx.dead_url()], **FAST}
    prepare(["aircraft"], tmp_path, **common)
    filed = classes(tmp_path, "aircraft")
    assert "F/A-18" in filed["test"] and "F-16A/B" in filed["train"]  # the published shuffle's splits of both
    prepare(["aircraft"], tmp_path, aircraft_misfile=True, **common)
    misfiled = classes(tmp_path, "aircraft")
    assert {split: len(names) for split, names in misfiled.items()} == {"train": 70, "val": 15, "test": 14}
    assert misfiled["train"] == filed["train"] and misfiled["test"] == [n for n in filed["test"] if n != "F/A-18"]
    assert load_store("aircraft", "test", tmp_path).info["misfiled"] == ["F/A-18"]
    # a slashed variant keeps its images where its own split is train (its folder exists there)
    cuts, lost = released_filing({"train": ["F/A-18", "A"], "val": ["B/C"], "test": ["D"]})
    assert cuts == {"train": ["F/A-18", "A"], "val": [], "test": ["D"]} and lost == ["B/C"]


# ------------------------------------------------------------------ recipes check their data
def cache(root: Path, mode: str, side: int, info: dict, splits=("train", "val", "test"), count: int = 6) -> None:
    """A small cache written as kml writes one (a manifest per split, ``info`` as the converter records it)."""
    for split in splits:
        images = [
            np.full((4, 1, side, side), 40 * c + 10 * s, dtype=np.uint8)
            + np.arange(4, dtype=np.uint8)[:, None, None, None]
            for s, c in ((splits.index(split), c) for c in range(count))
        ]
        names = [f"{split}_{c}" for c in range(count)]
        ImageStore.from_class_arrays(images, names, mode, split, {"dataset": mode, **info}).save(
            cache_dir(root, mode, split)
        )
    marker = {"dataset": mode, "splits": {split: {"classes": count, "images": 4 * count} for split in splits}}
    (root / "cache" / mode / MARKER).write_text(json.dumps(marker))


OMNIGLOT_28 = {"split": "published", "side": 28, "preprocessing": "grey, Lanczos resize to 28x28, inverted"}


def test_mmaml_refuses_a_28_pixel_omniglot_cache_in_one_line_naming_the_download_command(tmp_path, capsys):
    cache(tmp_path / "data", "omniglot", 28, OMNIGLOT_28)
    argv = tiny_args(tmp_path, "--recipe", "mmaml", "--modes", "omniglot", steps=2)
    err = one_line_error(capsys, argv)
    root = tmp_path / "data"
    assert "recipe mmaml@1 was published on other data: omniglot stored at 28 px (published: 84" in err
    assert f"python download.py --datasets omniglot --omniglot-side 84 --split omniglot=published --root {root}" in err
    assert "--allow-data-departure" in err and not (tmp_path / "train_dir" / "run").exists()

    assert train_cli.main([*argv, "--allow-data-departure"]) == 0  # allowed: trained, and recorded
    config = json.loads((tmp_path / "train_dir" / "run" / "config.json").read_text())
    assert config["allow_data_departure"] is True and config["recipe"] == "mmaml@1"
    assert config["data_departures"] == ["omniglot stored at 28 px (published: 84, Lanczos from 105)"]


def test_what_the_data_check_accepts_and_refuses(tmp_path):
    cache(tmp_path, "omniglot", 84, OMNIGLOT_28, count=5)  # kml records side 28 whatever the side: the images decide
    assert data_departures(["omniglot", "glyphs", f"folder:{tmp_path}"], tmp_path) == []  # published data
    as_released = data_departures(["omniglot"], tmp_path, released=True)
    assert [d.flags for d in as_released] == [
        ("--omniglot-side 84", "--split omniglot=released")
    ]  # as released: 1100/0/523
    # an Aircraft cache of any kml version: cropped unless its note says the banner was kept
    cache(tmp_path, "aircraft", 84, {"split": "published", "crop": "bounding box (images_box.txt)"}, count=5)
    (found,) = data_departures(["aircraft"], tmp_path)
    assert found.flags == ("--no-crop", "--aircraft-banner") and "cropped to the bounding box" in found.what
    cache(tmp_path, "aircraft", 84, {"split": "published"}, count=5)  # no note at all: kml's default, cropped
    assert [d.mode for d in data_departures(["aircraft"], tmp_path)] == ["aircraft"]
    cache(tmp_path, "aircraft", 84, {"crop": "none (whole photo, banner kept)"}, count=5)
    assert data_departures(["aircraft"], tmp_path) == []
    # FC100: kml's clean bytes are a documented fix of the published recipes, the released colours of as-released
    cache(tmp_path, "fc100", 32, {"split": "published"}, count=5)
    assert data_departures(["fc100"], tmp_path) == []
    assert data_departures(["fc100"], tmp_path, released=True)[0].flags == ("--fc100-colours released",)


def test_a_run_on_the_released_omniglot_split_validates_on_its_other_modes(tmp_path):
    cache(tmp_path / "data", "omniglot", 28, {**OMNIGLOT_28, "split": "released"}, splits=("train", "test"))
    argv = tiny_args(tmp_path, "--modes", "omniglot", "glyphs", "--val-every", "2", steps=2)
    assert train_cli.main(argv) == 0  # kml's own method: no recipe, no data check
    rows = (tmp_path / "train_dir" / "run" / "validation.csv").read_text()
    assert "glyphs" in rows and "omniglot" not in rows
