"""Your data without surprises (issue 29): image folders in any nesting (Omniglot's own layout), the class split
of a folder set by its mode name (fractions, seed, a short name), silent conversions under ``--no-progress``,
arrays with any hashable labels and a class split for them, no half cache after a failed conversion, errors that
name ``kml-download``, and synthetic splits drawn from one distribution.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kml.data import synthetic
from kml.data.modes import (
    canonical_mode,
    expand_modes,
    load_store,
    load_stores,
    mode_label,
    parse_folder_mode,
    with_folder_split,
)
from kml.data.sources.folder import cache_name, load_folder
from kml.data.sources.prepare import resolve_datasets
from kml.data.store import ImageStore, check_same_cache, split_by_class, split_classes
from kml.errors import KMLError

KML = Path(__file__).resolve().parents[1] / "kml"


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (6, 6), value).save(path)


def class_folders(root: Path, names: list[str], per_class: int = 2) -> Path:
    """``root/<name>/<k>.png`` for every (possibly nested) class name; each class its own grey level."""
    for c, name in enumerate(names):
        for k in range(per_class):
            _image(root / name / f"{k}.png", 10 * c + k)
    return root


def cache_folders(data: Path) -> list[Path]:
    return sorted(p for p in (data / "cache").iterdir() if p.name.startswith("folder-"))


def split_names(folder: Path, data: Path, mode: str | None = None) -> dict[str, list[str]]:
    mode = mode or f"folder:{folder}"
    return {s: sorted(load_store(mode, s, data, progress=False).class_names) for s in ("train", "val", "test")}


# ------------------------------------------------------------------ 1. layouts
def test_nested_class_folders_are_classes_named_by_their_path(tmp_path):
    names = [f"{alphabet}/character{c:02d}" for alphabet in ("Greek", "Latin") for c in range(1, 11)]
    folder = class_folders(tmp_path / "omniglot", names)
    got = split_names(folder, tmp_path / "data")
    assert sorted(sum(got.values(), [])) == sorted(names)
    assert [len(v) for v in got.values()] == [14, 3, 3]
    expected = split_classes(sorted(names))  # the rule of a flat folder: sorted paths, RandomState(123), 70/15/15
    assert got == {split: sorted(chosen) for split, chosen in expected.items()}


def test_a_split_folder_is_recognised_by_its_top_level_names_and_may_nest_classes(tmp_path):
    folder = tmp_path / "split"
    class_folders(folder, ["train/Greek/a", "train/Greek/b", "train/Latin/c", "val/x", "val/y", "test/p/q", "test/r"])
    assert split_names(folder, tmp_path / "data") == {
        "train": ["Greek/a", "Greek/b", "Latin/c"],
        "val": ["x", "y"],
        "test": ["p/q", "r"],
    }


def test_ambiguous_folders_are_refused_and_loose_images_are_said(tmp_path, caplog):
    mixed = class_folders(tmp_path / "mixed", ["train/a", "train/b", "cats", "dogs"])
    with pytest.raises(KMLError, match=r"mixes split folders \(train\) with other folders of images \(cats, dogs\)"):
        load_folder(mixed, "train", tmp_path / "data", progress=False)
    nested = class_folders(tmp_path / "nested", ["cat", "cat/kittens", "dog"])
    with pytest.raises(KMLError, match=r"nested/cat holds images and so does .*nested/cat/kittens inside it"):
        load_folder(nested, "train", tmp_path / "data", progress=False)
    loose = class_folders(tmp_path / "loose", [f"c{c}" for c in range(8)])
    _image(loose / "preview.png", 0)
    with caplog.at_level(logging.WARNING, logger="kml.data.sources.folder"):
        assert load_folder(loose, "train", tmp_path / "data", progress=False).num_classes == 5
    assert "1 image(s) lie outside every class folder (e.g. preview.png)" in caplog.text
    assert not list((tmp_path / "data" / "cache").glob(".*staging*"))


# ------------------------------------------------------------------ 1. split fractions and seed, short names
def test_fractions_and_seed_in_the_mode_name_make_another_cache_recorded_in_its_manifest(tmp_path):
    folder = class_folders(tmp_path / "pets", [f"c{c:02d}" for c in range(20)])
    data = tmp_path / "data"
    default = split_names(folder, data)
    assert [len(v) for v in default.values()] == [14, 3, 3] and len(cache_folders(data)) == 1
    assert split_names(folder, data, f"folder,seed=123,fractions=70/15/15:{folder}") == default  # the defaults
    assert len(cache_folders(data)) == 1 and cache_folders(data)[0].name == cache_name(folder)  # same cache as before

    custom = split_names(folder, data, f"folder,fractions=0.5/0.25/0.25,seed=7:{folder}")
    assert [len(v) for v in custom.values()] == [10, 5, 5]
    assert split_names(folder, data, f"folder,fractions=50/25/25,seed=7:{folder}") == custom  # percentages: same
    assert len(cache_folders(data)) == 2  # another split is another cache, the default one kept
    other_seed = split_names(folder, data, f"folder,fractions=0.5/0.25/0.25,seed=8:{folder}")
    assert other_seed != custom and len(cache_folders(data)) == 3

    directory = data / "cache" / cache_name(folder, (0.5, 0.25, 0.25), 7)
    marker = json.loads((directory / "dataset.json").read_text())
    assert marker["options"]["fractions"] == [0.5, 0.25, 0.25] and marker["options"]["seed"] == 7
    manifest = json.loads((directory / "val" / "manifest.json").read_text())
    assert (
        manifest["info"]["split_rule"] == "class folders sorted, shuffled with numpy RandomState(7), cut 0.5/0.25/0.25"
    )
    store = load_store(f"folder,fractions=0.5/0.25/0.25,seed=7:{folder}", "val", data, progress=False)
    assert store.mode == f"folder,fractions=0.5/0.25/0.25,seed=7:{folder}"

    split = class_folders(tmp_path / "split", ["train/a", "train/b", "val/c", "val/d", "test/e", "test/f"])
    with pytest.raises(KMLError, match="already split into train/val/test folders; split fractions and seed"):
        load_store(f"folder,seed=7:{split}", "train", data, progress=False)


def test_split_flags_rewrite_the_folder_modes_that_do_not_set_their_own():
    modes = ["glyphs", "folder:/a", "b=folder,seed=3:/b", "folder,fractions=1/1/2:/c"]
    assert with_folder_split(modes) == modes
    assert with_folder_split(modes, [80, 10, 10], 7) == [
        "glyphs",
        "folder,fractions=0.8/0.1/0.1,seed=7:/a",
        "b=folder,fractions=0.8/0.1/0.1,seed=3:/b",
        "folder,fractions=0.25/0.25/0.5,seed=7:/c",
    ]
    assert with_folder_split(["folder:/a"], None, 123) == ["folder:/a"]  # the default seed: the default name
    with pytest.raises(KMLError, match="apply to folder modes .* only"):
        with_folder_split(["glyphs"], None, 5)
    with pytest.raises(KMLError, match="three non-negative numbers"):
        with_folder_split(["folder:/a"], [1, -1, 1])
    with pytest.raises(KMLError, match="integer from 0 to 4294967295"):
        with_folder_split(["folder:/a"], None, -2)


def test_a_short_name_is_what_tables_show_and_the_path_is_kept(tmp_path):
    folder = class_folders(tmp_path / "sk", [f"c{c}" for c in range(10)])
    mode = canonical_mode(f"sketches=folder:{folder}")
    assert mode == f"sketches=folder:{folder}" and mode_label(mode) == "sketches"
    assert mode_label(f"folder:{folder}") == f"folder:{folder}" and mode_label("omniglot") == "omniglot"
    assert canonical_mode("sk=folder:a/b:c") == f"sk=folder:{Path.cwd() / 'a/b:c'}"  # a ':' in a path is a path
    (store,) = load_stores([f"sketches=folder:{folder}"], "train", tmp_path / "data", 8, 1, progress=False)
    assert store.mode == mode and store.num_classes == 7
    (plain,) = load_stores([f"folder:{folder}"], "train", tmp_path / "data", 8, 1, progress=False)
    assert torch.equal(plain.images, store.images) and len(cache_folders(tmp_path / "data")) == 1  # one cache
    with pytest.raises(KMLError, match="two modes are named 'x'"):
        expand_modes(["x=folder:/a", "x=folder:/b"])
    for bad in ("omniglot=folder:/a", "folder2=folder:/a", "a b=folder:/a"):
        with pytest.raises(KMLError, match="a name is letters, digits"):
            canonical_mode(bad)
    with pytest.raises(KMLError, match="expected fractions=TRAIN/VAL/TEST or seed=N"):
        parse_folder_mode("folder,split=1/1/1:/a")
    assert parse_folder_mode("omniglot") is None and parse_folder_mode("a=b") is None


def test_no_progress_silences_the_folder_conversion(tmp_path, capfd):
    folder = class_folders(tmp_path / "quiet", [f"c{c}" for c in range(10)])
    load_stores([f"folder:{folder}"], "train", tmp_path / "quiet-data", progress=False)
    assert capfd.readouterr().err == ""
    load_stores([f"folder:{folder}"], "train", tmp_path / "loud-data")  # the default: a bar per split
    assert "img/s" in capfd.readouterr().err


# ------------------------------------------------------------------ 2. arrays with any labels, split by class
def test_from_arrays_takes_string_and_tuple_labels():
    images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4)
    strings = np.array(["dog", "cat", "dog", "eel", "cat", "eel"])
    store = ImageStore.from_arrays(images, strings)
    assert store.class_names == ["cat", "dog", "eel"] and store.class_sizes.tolist() == [2, 2, 2]
    assert store.images[:, 0, 0, 0].tolist() == [16, 64, 0, 32, 48, 80]  # grouped by class, order kept inside
    tuples = [("Greek", 1), ("Latin", 2), ("Greek", 1), ("Greek", 2), ("Latin", 2), ("Greek", 2)]
    assert ImageStore.from_arrays(images, tuples).class_names == ["Greek/1", "Greek/2", "Latin/2"]
    mixed = ImageStore.from_arrays(images, [1, "a", 1, "a", 2, 2])  # not comparable: by type name, then text
    assert mixed.class_names == ["1", "2", "a"]
    named = ImageStore.from_arrays(images, list(strings), class_names={"cat": "Cat", "dog": "Dog", "eel": "Eel"})
    assert named.class_names == ["Cat", "Dog", "Eel"]
    assert ImageStore.from_arrays(images, [5, 3, 5, 3, 5, 3]).class_names == ["3", "5"]  # integers as before
    with pytest.raises(KMLError, match="labels must be integers or other hashable values, got torch.float64"):
        ImageStore.from_arrays(images, [0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    with pytest.raises(KMLError, match="labels must be hashable"):
        ImageStore.from_arrays(images, [[0], [1], [0], [1], [0], [1]])
    with pytest.raises(KMLError, match=r"need one label per image \(6\), got 5 labels"):
        ImageStore.from_arrays(images, ["a"] * 5)


def test_split_by_class_cuts_whole_classes_seeded_like_a_folder(tmp_path):
    names = [f"c{c:02d}" for c in range(20)]
    labels = np.repeat(np.array(names), 3)
    images = np.arange(60 * 4, dtype=np.uint8).reshape(60, 2, 2)
    parts = split_by_class(images, labels)
    seen = {split: set(part[1].tolist()) for split, part in parts.items()}
    assert [len(seen[s]) for s in ("train", "val", "test")] == [14, 3, 3] and set().union(*seen.values()) == set(names)
    assert all(len(x) == len(y) == 3 * len(seen[s]) for s, (x, y) in parts.items())
    assert all(isinstance(x, np.ndarray) and list(y) == [labels[i] for i in x[:, 0, 0] // 4] for x, y in parts.values())
    folder = class_folders(tmp_path / "same", names)  # the same names as class folders: the same split
    assert split_names(folder, tmp_path / "data") == {s: sorted(v) for s, v in seen.items()}

    again = split_by_class(torch.from_numpy(images), list(labels), fractions=(0.5, 0.25, 0.25), seed=4)
    assert isinstance(again["val"][0], torch.Tensor) and isinstance(again["val"][1], list)
    assert [len(set(y)) for _, y in again.values()] == [10, 5, 5]
    assert {s: set(y) for s, (_, y) in again.items()} != seen
    stores = {s: ImageStore.from_arrays(x, y, mode="mine", split=s) for s, (x, y) in again.items()}
    assert [store.num_classes for store in stores.values()] == [10, 5, 5]
    with pytest.raises(KMLError, match="split fractions must be three non-negative numbers"):
        split_by_class(images, labels, fractions=(1, 1))


# ------------------------------------------------------------------ 3. a failed conversion leaves no half cache
def test_a_failed_folder_conversion_leaves_no_cache_and_keeps_a_previous_one(tmp_path):
    folder = class_folders(tmp_path / "pics", [f"c{c}" for c in range(10)])
    data = tmp_path / "data"
    (folder / "c9" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(KMLError, match="cannot decode image c9/broken.png .*nothing was cached"):
        load_folder(folder, "train", data, progress=False)
    assert [p.name for p in (data / "cache").iterdir() if not p.name.endswith(".lock")] == []  # no half cache

    (folder / "c9" / "broken.png").unlink()
    first = load_folder(folder, "train", data, progress=False)
    marker = (data / "cache" / cache_name(folder) / "dataset.json").read_text()
    (folder / "c3" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(KMLError, match="cannot decode image c3/broken.png"):
        load_folder(folder, "train", data, progress=False)
    assert (data / "cache" / cache_name(folder) / "dataset.json").read_text() == marker  # the previous cache, whole
    assert sorted(p.name for p in (data / "cache").iterdir() if not p.name.endswith(".lock")) == [cache_name(folder)]
    (folder / "c3" / "broken.png").unlink()
    assert load_folder(folder, "train", data, progress=False).class_names == first.class_names


# ------------------------------------------------------------------ 4. errors name kml-download
def test_errors_name_kml_download_not_the_repository_script(tmp_path):
    with pytest.raises(KMLError, match=r"; run: kml-download --datasets fc100 --root"):
        load_store("fc100", "train", tmp_path)
    with pytest.raises(KMLError, match=r"'folder:/x' needs no download: .*kml-train --modes folder:/x"):
        resolve_datasets(["folder:/x"])
    with pytest.raises(KMLError, match=r"'shapes' needs no download"):
        resolve_datasets(["shapes"])
    recorded = {"mode": "cub", "split": "test", "made": {"split_rule": "a"}, "classes": "1"}
    with pytest.raises(KMLError, match=r"\(kml-download --datasets cub --force"):
        check_same_cache(recorded, {**recorded, "made": {"split_rule": "b"}})
    # no message in the data layer or kml-download names the script that only runs from the repository root
    for path in [*(KML / "data").rglob("*.py"), KML / "cli" / "download.py"]:
        strings = re.findall(r'f?"[^"\n]*python download\.py[^"\n]*"', path.read_text())
        assert not [s for s in strings if "prog" not in s], (path, strings)


# ------------------------------------------------------------------ 5. synthetic splits from one distribution
def nearest_centroid_accuracy(store: ImageStore, episodes: int = 400, ways: int = 5, queries: int = 5) -> float:
    """5-way 1-shot accuracy of the nearest support image on raw pixels (centred, unit norm): how hard a split is."""
    g = torch.Generator().manual_seed(0)
    x = store.images.float().flatten(1)
    x = x - x.mean(1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)
    per = int(store.class_sizes[0])
    labels = torch.arange(ways).repeat_interleave(queries)
    correct = 0
    for _ in range(episodes):
        classes = torch.randperm(store.num_classes, generator=g)[:ways]
        rows = classes.view(-1, 1) * per + torch.stack(
            [torch.randperm(per, generator=g)[: 1 + queries] for _ in classes]
        )
        guess = torch.cdist(x[rows[:, 1:]].reshape(-1, x.shape[1]), x[rows[:, 0]]).argmin(1)
        correct += int((guess == labels).sum())
    return 100 * correct / (episodes * ways * queries)


def test_shapes_val_and_test_are_equally_hard():
    # generator version 1 drew the shapes palette per split: on seed 0 this statistic was 81.4% on val, 60.9% on test
    assert synthetic.GENERATOR_VERSIONS == {"glyphs": 1, "textures": 1, "shapes": 2}
    val, test = (synthetic.generate_store("shapes", split) for split in ("val", "test"))
    accuracy = {split: nearest_centroid_accuracy(store) for split, store in (("val", val), ("test", test))}
    assert abs(accuracy["val"] - accuracy["test"]) < 5, accuracy


def test_a_shapes_cache_of_generator_version_1_is_generated_again(tmp_path):
    old = synthetic.generate_store("shapes", "val", classes=4, images_per_class=2)
    old.info = {**old.info, "generator_version": 1}
    old.save(tmp_path / "cache" / "shapes" / "val")
    again = synthetic.load_synthetic("shapes", "val", tmp_path)
    assert again.info["generator_version"] == 2 and again.num_classes == 64
    recorded = {"mode": "shapes", "split": "test", "made": {**again.info, "generator_version": 1}, "classes": "x"}
    with pytest.raises(KMLError, match="generator version 2, the run had version 1"):
        check_same_cache(recorded, again.identity())
