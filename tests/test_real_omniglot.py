"""Real data in the loop: Omniglot's own handwriting through download.py's Omniglot path, then training on it.

tests/fixtures/omniglot-small/ holds the two small background sets Omniglot's authors publish (MIT, see its
LICENSE and README): 242 distinct real characters x 20 drawers. Here they are repackaged into the layout of
the real archives (``images_background.zip``: small1's 5 alphabets; ``images_evaluation.zip``: small2's
alphabets that small1 lacks, since Greek and Latin are in both), served on loopback, and converted with the
``lake`` split (background alphabets for training, evaluation alphabets held out for testing). ProtoNet and
MAML then meta-train briefly on them and must beat a stated accuracy on characters of alphabets they never saw.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import fixtures_datasets as fx
import numpy as np
import pytest
from PIL import Image

from kml.cli import evaluate as eval_cli
from kml.cli import train as train_cli
from kml.data.modes import load_stores
from kml.data.sources import prepare
from kml.data.sources.omniglot import small_archives
from kml.data.store import ImageStore, cache_dir, split_classes

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "omniglot-small"
BACKGROUND = {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}
EVALUATION = {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
# Held-out-alphabet accuracy a 300-step CPU run must beat (5-way 1-shot, 200 fixed test episodes, chance 20%).
# Measured with these settings on 2026-11-29: ProtoNet 71.1%, MAML 65.5% (`pytest tests/test_real_omniglot.py -s`
# prints them); the bounds leave about 10 points for platform rounding, not for a broken pipeline.
MIN_ACCURACY = {"protonet": 60.0, "maml": 55.0}


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    files = small_archives(FIXTURE / "images_background_small1.zip", FIXTURE / "images_background_small2.zip")
    root = tmp_path_factory.mktemp("real")
    with fx.ArchiveServer(files, ranges=True) as server:
        rows = prepare(
            ["omniglot"],
            root,
            split_variant="omniglot=lake",
            mirrors=[server.url],
            checksums={name: fx.md5(data) for name, data in files.items()},
            progress=False,
            workers=2,
        )
    assert [row.status for row in rows] == ["converted"]
    return root


def test_real_archives_convert_with_held_out_alphabets(real_root):
    stores = {split: ImageStore.load(cache_dir(real_root, "omniglot", split)) for split in ("train", "val", "test")}
    alphabets = {split: {name.split("/")[0] for name in store.class_names} for split, store in stores.items()}
    assert alphabets == {"train": BACKGROUND - {"Latin"}, "val": {"Latin"}, "test": EVALUATION}
    assert [store.num_classes for store in stores.values()] == [110, 26, 106]  # 242 distinct characters
    assert all(len(store.images) == 20 * store.num_classes for store in stores.values())  # every drawer
    # each stored image is the real PNG, Lanczos to 28 px and inverted (strokes bright), pixel for pixel
    with zipfile.ZipFile(FIXTURE / "images_background_small2.zip") as archive:
        png = archive.read("images_background_small2/Tagalog/character01/0893_01.png")
    expected = 255 - np.asarray(Image.open(io.BytesIO(png)).convert("L").resize((28, 28), Image.LANCZOS))
    test = stores["test"]
    index = test.class_names.index("Tagalog/character01")
    stored = test.images[int(test.class_offsets[index])].squeeze(0).numpy()
    assert np.abs(stored.astype(int) - expected.astype(int)).max() <= 1
    assert 0.05 < (stored > 128).mean() < 0.5  # real pen strokes, not a blank or filled square


@pytest.mark.parametrize("algorithm", ["protonet", "maml"])
def test_short_training_on_real_omniglot_beats_the_stated_held_out_accuracy(algorithm, real_root, tmp_path):
    flags = [
        "--modes",
        "omniglot",
        "--data-root",
        str(real_root),
        "--image-size",
        "28",
        "--algorithm",
        algorithm,
        "--modulation",
        "none",
        "--steps",
        "300",
        "--meta-batch",
        "4",
        "--queries",
        "5",
        "--base-channels",
        "16",
        *(["--inner-steps", "1", "--eval-inner-steps", "3", "--inner-lr", "0.4"] if algorithm == "maml" else []),
        "--lr",
        "0.003",
        "--val-every",
        "300",
        "--val-episodes",
        "20",
        "--checkpoint-every",
        "300",
        "--no-progress",
        "--train-dir",
        str(tmp_path),
        "--run-name",
        algorithm,
    ]
    assert train_cli.main(flags) == 0
    output = tmp_path / "eval.json"
    checkpoint = tmp_path / algorithm / "checkpoints" / "last.pt"
    assert (
        eval_cli.main(["--checkpoint", str(checkpoint), "--episodes", "200", "--output", str(output), "--no-progress"])
        == 0
    )
    result = json.loads(output.read_text())
    accuracy = next(row["accuracy"] for row in result["results"] if row["mode"] == "omniglot")
    print(f"{algorithm}: {accuracy:.2f}% on held-out alphabets")
    assert accuracy > MIN_ACCURACY[algorithm], result


def test_omniglots_own_nested_folders_are_a_folder_mode(tmp_path):
    """Omniglot as its authors ship it, ``<alphabet>/<character>/*.png`` (two alphabets of the small set, extracted
    as they are), is a folder mode: a class per character folder, named by its path, split by the folder rule."""
    alphabets = ("Greek", "Latin")
    with zipfile.ZipFile(FIXTURE / "images_background_small1.zip") as archive:
        members = [m for m in archive.namelist() if m.split("/")[1:2] and m.split("/")[1] in alphabets]
        archive.extractall(tmp_path, members)
    folder = tmp_path / "images_background_small1"
    characters = sorted(f"{d.parent.name}/{d.name}" for d in folder.glob("*/*") if d.is_dir())
    assert len(characters) == 50
    stores = {
        split: load_stores([f"omniglot-own=folder:{folder}"], split, tmp_path / "data", 28, 1, progress=False)[0]
        for split in ("train", "val", "test")
    }
    expected = split_classes(characters)  # sorted paths, RandomState(123), 70/15/15 %: 35 / 7 / 8
    assert {split: store.class_names for split, store in stores.items()} == expected
    assert all(len(store.images) == 20 * store.num_classes for store in stores.values())  # every drawer
    train = stores["train"]
    name = train.class_names[0]
    png = sorted((folder / name).glob("*.png"))[0]
    # stored at 84 (Lanczos, as they are: black strokes on white), brought to 28 at load
    stored = ImageStore.load(next((tmp_path / "data" / "cache").glob("folder-images_background_small1-*")) / "train")
    reference = np.asarray(Image.open(png).convert("L").resize((84, 84), Image.LANCZOS))
    assert np.abs(stored.class_images(0)[0, 0].numpy().astype(int) - reference.astype(int)).max() <= 1
    assert train.mode == f"omniglot-own=folder:{folder}" and train.image_shape == (1, 28, 28)
