"""Real-dataset layer: download, verify, extract and convert tiny copies of the five benchmarks.

Every archive is built in its exact raw layout (tests/fixtures_datasets.py),
served from a loopback HTTP server (with and without Range support, with a
transient 503, with a connection cut halfway) and run through the same code
``download.py`` runs. Only the expected checksums differ (the tiny copies are
not the real archives), passed the way a user passes them for a mirror's copy.
"""

from __future__ import annotations

import errno
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import fixtures_datasets as fx
import numpy as np
import pytest
import torch
from PIL import Image

from kml.data.modes import load_store, load_stores
from kml.data.sampler import MixtureSampler
from kml.data.sources import fetch, prepare
from kml.data.sources.extract import safe_extract
from kml.data.sources.folder import load_folder
from kml.data.store import ImageStore, cache_dir
from kml.errors import KMLError

FAST = {"progress": False, "backoff": 0.01, "workers": 2}


def checksums(files: dict[str, bytes]) -> dict[str, str]:
    return {name: fx.md5(data) for name, data in files.items()}


def stores(root: Path, mode: str) -> dict[str, ImageStore]:
    return {split: ImageStore.load(cache_dir(root, mode, split)) for split in ("train", "val", "test")}


def counts(loaded: dict[str, ImageStore]) -> tuple[int, int, int]:
    return tuple(loaded[s].num_classes for s in ("train", "val", "test"))


def expected_split(names: list[str], seed: int = 123) -> dict[str, list[str]]:
    order = list(names)
    np.random.RandomState(seed).shuffle(order)
    n_train, n_val = int(0.7 * len(order)), int(0.15 * len(order))
    return {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}


def place(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


# ------------------------------------------------------------------ Omniglot
@pytest.fixture(scope="module")
def omniglot_files() -> dict[str, bytes]:
    return fx.omniglot_archives()


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory, omniglot_files):
    """Omniglot downloaded through a Range server that hangs up halfway through each first response."""
    root = tmp_path_factory.mktemp("omniglot")
    with fx.ArchiveServer(omniglot_files, ranges=True, cut_first=True) as server:
        rows = prepare(["omniglot"], root, mirrors=[server.url], checksums=checksums(omniglot_files), **FAST)
    return root, rows, server.requests


def test_omniglot_resumes_with_range_and_follows_the_published_split(omniglot_root, omniglot_files):
    root, rows, requests = omniglot_root
    for name in ("images_background.zip", "images_evaluation.zip"):
        served = [r for r in requests if r[0] == name]
        assert [status for _, _, status in served] == [200, 206], served  # cut halfway, then resumed
        assert served[1][1].startswith("bytes=") and int(served[1][1][6:-1]) > 0
        assert (root / "raw" / "omniglot" / name).is_file() and not (
            root / "raw" / "omniglot" / (name + ".part")
        ).exists()
    loaded = stores(root, "omniglot")
    assert counts(loaded) == (1000, 100, 523)  # published: first 1100 sorted (minus 100 for val) / last 523
    assert rows[0].classes == {"train": 1000, "val": 100, "test": 523} and rows[0].status == "converted"
    assert all(int(s.class_sizes.min()) == 2 for s in loaded.values())
    # sorted by path: all 964 background characters first, then the evaluation ones
    assert loaded["train"].class_names[0] == "Background_Alphabet_00/character01"
    assert loaded["test"].class_names[-1].startswith("Evaluation_Alphabet_19/")
    assert sum(n.startswith("Background") for n in loaded["train"].class_names) == 964
    # grey at 28, inverted: the black square stroke is bright, the white page is black
    image = loaded["train"].images[0]
    assert image.shape == (1, 28, 28)
    assert int(image[0, 14, 14]) == 255 and int(image[0, 0, 0]) == 0
    info = loaded["test"].info
    assert info["split"] == "published" and "1100" in info["split_rule"] and info["side"] == 28
    for name in ("images_background.zip", "images_evaluation.zip"):
        assert info["sources"][name]["verified"] is True
        assert info["sources"][name]["checksum"] == fx.md5(omniglot_files[name])
    marker = json.loads((root / "cache" / "omniglot" / "dataset.json").read_text())
    assert marker["options"] == {"variant": "published"} and marker["splits"]["test"]["classes"] == 523


def test_converted_omniglot_trains_through_the_mixture_sampler(omniglot_root):
    root, _, _ = omniglot_root
    (store,) = load_stores(["omniglot"], "train", root)
    assert store.image_shape == (3, 28, 28)  # grey tiled to 3 channels at load
    sampler = MixtureSampler([store], ways=5, shots=1, queries=1, meta_batch=4, rotate=True, seed=0)
    episode = sampler.sample()
    assert episode.support_x.shape == (4, 5, 3, 28, 28) and episode.query_x.shape == (4, 5, 3, 28, 28)
    assert episode.mode_names == ("omniglot",) and float(episode.support_x.max()) == 1.0


def test_offline_archives_placed_by_hand_and_the_vinyals_split(tmp_path):
    omniglot_files = fx.omniglot_archives(drawers=1)
    place(tmp_path / "raw" / "omniglot", omniglot_files)
    rows = prepare(
        ["omniglot"],
        tmp_path,
        mirrors=[fx.dead_url()],
        checksums=checksums(omniglot_files),
        split_variant="vinyals",
        **FAST,
    )
    assert rows[0].classes == {"train": 1200, "val": 100, "test": 323}
    assert stores(tmp_path, "omniglot")["val"].info["split"] == "vinyals"
    again = prepare(["omniglot"], tmp_path, mirrors=[fx.dead_url()], split_variant="vinyals", **FAST)
    assert again[0].status == "cached"


def test_no_network_and_no_archive_says_where_to_put_it(tmp_path):
    dead = fx.dead_url()
    with pytest.raises(KMLError) as error:
        prepare(["omniglot"], tmp_path, mirrors=[dead], **FAST)
    message = str(error.value)
    assert "images_background.zip" in message and str(tmp_path / "raw" / "omniglot") in message
    assert dead in message and "\n" not in message
    assert not (tmp_path / "cache" / "omniglot").exists()


def test_torchvision_omniglot_folder_is_reused_without_network(tmp_path):
    for name, data in fx.omniglot_archives(drawers=1).items():
        safe_extract(_write(tmp_path / name, data), tmp_path / "omniglot-py", progress=False)
    rows = prepare(["omniglot"], tmp_path, mirrors=[fx.dead_url()], **FAST)
    assert rows[0].classes["test"] == 523
    assert "torchvision" in stores(tmp_path, "omniglot")["train"].info["sources"]["reused"]["origin"]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ FC100
def test_fc100_survives_a_transient_503_and_keeps_exact_colours(tmp_path):
    files = fx.cifar100_archive()
    with fx.ArchiveServer(files, ranges=False, fail_first=1) as server:
        prepare(["FC100"], tmp_path, mirrors=[server.url], checksums=checksums(files), **FAST)
    assert [status for _, _, status in server.requests] == [503, 200]
    loaded = stores(tmp_path, "fc100")
    assert counts(loaded) == (60, 20, 20)
    superclasses = {"train": {1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19}, "val": {8, 11, 13, 16}, "test": {0, 7, 12, 14}}
    for split, store in loaded.items():
        assert store.image_shape == (3, 32, 32) and int(store.class_sizes.min()) == 3  # train + test pooled
        for c, name in enumerate(store.class_names):
            coarse, fine = (int(part.split("_")[1]) for part in name.split("/"))
            assert coarse in superclasses[split] and fine % 20 == coarse
            images = store.class_images(c)
            for index in range(3):  # exact bytes: no scaling, no transposition
                assert torch.equal(images[index], torch.from_numpy(fx.cifar_pixels(fine, coarse, index)))
    assert "pooled" in loaded["val"].info["split_rule"]


def test_torchvision_cifar_folder_is_reused(tmp_path):
    files = fx.cifar100_archive()
    safe_extract(_write(tmp_path / "x.tar.gz", files["cifar-100-python.tar.gz"]), tmp_path, progress=False)
    (tmp_path / "x.tar.gz").unlink()
    rows = prepare(["fc100"], tmp_path, mirrors=[fx.dead_url()], **FAST)
    assert rows[0].classes == {"train": 60, "val": 20, "test": 20}


def test_mirrors_from_the_environment_and_an_interrupted_reconversion(tmp_path, monkeypatch):
    files = fx.cifar100_archive()
    with fx.ArchiveServer(files) as server:
        monkeypatch.setenv("KML_MIRROR", f"{fx.dead_url()},{server.url}")
        prepare(["fc100"], tmp_path, checksums=checksums(files), **FAST)
    before = stores(tmp_path, "fc100")["train"].images.clone()
    calls = []

    def interrupted(self, directory):
        calls.append(directory)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, directory)

    original = ImageStore.save
    monkeypatch.setattr(ImageStore, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(["fc100"], tmp_path, force=True, checksums=checksums(files), **FAST)  # offline: the archive is in raw/
    monkeypatch.setattr(ImageStore, "save", original)
    assert torch.equal(stores(tmp_path, "fc100")["train"].images, before)  # the old cache is untouched
    assert not list((tmp_path / "cache").glob(".fc100.*-*"))  # no staging folder left behind


# ------------------------------------------------------------------ CUB
def test_cub_through_a_server_without_ranges(tmp_path):
    files = fx.cub_archive()
    with fx.ArchiveServer(files, ranges=False, cut_first=True) as server:
        prepare(["bird"], tmp_path, mirrors=[server.url], checksums=checksums(files), **FAST)
    assert [status for _, _, status in server.requests] == [200, 200]  # cut, then the whole file again
    loaded = stores(tmp_path, "cub")
    assert counts(loaded) == (140, 30, 30)
    split = expected_split(sorted(fx.CUB_CLASSES))
    for name, store in loaded.items():
        assert store.class_names == split[name]
        assert store.image_shape == (3, 84, 84)
        for c in (0, len(store.class_names) - 1):
            colour = fx.cub_colour(fx.CUB_CLASSES.index(store.class_names[c]))
            mean = store.class_images(c).float().mean(dim=(0, 2, 3))
            assert torch.allclose(mean, torch.tensor(colour, dtype=torch.float32), atol=6)


def test_corrupt_image_stops_naming_the_file_or_is_skipped(tmp_path):
    bad = "007.Bird_007/Bird_007_0002_14.jpg"
    files = fx.cub_archive(corrupt=bad)
    place(tmp_path / "raw" / "cub", files)
    with pytest.raises(KMLError, match=r"CUB_200_2011/images/007\.Bird_007/Bird_007_0002_14\.jpg"):
        prepare(["cub"], tmp_path, mirrors=[fx.dead_url()], checksums=checksums(files), **FAST)
    assert not (tmp_path / "cache" / "cub").exists()  # nothing half-written that looks complete
    assert not list((tmp_path / "cache").glob(".cub.staging-*"))
    with pytest.warns(UserWarning, match="Bird_007_0002_14"):
        prepare(["cub"], tmp_path, mirrors=[fx.dead_url()], checksums=checksums(files), on_corrupt="skip", **FAST)
    loaded = stores(tmp_path, "cub")
    total_skipped = sum(s.info["skipped_images"] for s in loaded.values())
    assert total_skipped == 1 and sum(len(s.images) for s in loaded.values()) == 399


def test_checksum_mismatch_keeps_the_file_aside(tmp_path):
    files = fx.cub_archive()
    wrong = "md5:" + "0" * 32
    with fx.ArchiveServer(files) as server, pytest.raises(KMLError) as error:
        prepare(["cub"], tmp_path, mirrors=[server.url], checksums={"CUB_200_2011.tgz": wrong}, **FAST)
    message = str(error.value)
    assert wrong in message and fx.md5(files["CUB_200_2011.tgz"]) in message
    raw = tmp_path / "raw" / "cub"
    assert (raw / "CUB_200_2011.tgz.bad").read_bytes() == files["CUB_200_2011.tgz"]
    assert not (raw / "CUB_200_2011.tgz").exists() and not (raw / "CUB_200_2011").exists()
    assert not (tmp_path / "cache" / "cub").exists()


def test_built_in_checksum_rejects_a_wrong_file_placed_by_hand(tmp_path):
    place(tmp_path / "raw" / "cub", fx.cub_archive())  # not the real archive: the real md5 must reject it
    with pytest.raises(KMLError, match="97eceeb196236b17998738112f37df78"):
        prepare(["cub"], tmp_path, mirrors=[fx.dead_url()], **FAST)
    assert (tmp_path / "raw" / "cub" / "CUB_200_2011.tgz.bad").exists()


# ------------------------------------------------------------------ Aircraft
def test_aircraft_crop_split_and_recorded_checksum(tmp_path):
    files = fx.aircraft_archive()
    with fx.ArchiveServer(files) as server:
        prepare(["fgvc-aircraft"], tmp_path, mirrors=[server.url], **FAST)  # no checksum known: recorded
    loaded = stores(tmp_path, "aircraft")
    assert counts(loaded) == (70, 15, 15)
    split = expected_split(fx.AIRCRAFT_VARIANTS)  # variants.txt order, then RandomState(123)
    assert all(loaded[s].class_names == split[s] for s in split)
    assert "F/A-18" in sum((s.class_names for s in loaded.values()), [])
    assert sum(len(s.images) for s in loaded.values()) == 134
    image = loaded["train"].images[0].float()
    assert image[0].mean() > 240 and image[1:].mean() < 15  # cropped to the red box
    source = loaded["train"].info["sources"]["fgvc-aircraft-2013b.tar.gz"]
    assert source["checksum"] == fx.md5(files["fgvc-aircraft-2013b.tar.gz"]) and source["verified"] is False
    assert "bounding box" in loaded["train"].info["crop"]
    prepare(["aircraft"], tmp_path, mirrors=[fx.dead_url()], crop=False, **FAST)  # another option: reconverted offline
    whole = stores(tmp_path, "aircraft")["train"].images[0].float()
    assert whole[2, 2, 2] > 200  # the blue sky around the aircraft is back
    assert whole[1, -1].mean() < 60  # but not the green copyright banner


def test_truncated_archive_is_reported_as_corrupt(tmp_path):
    data = fx.aircraft_archive()["fgvc-aircraft-2013b.tar.gz"]
    files = {"fgvc-aircraft-2013b.tar.gz": data[: len(data) // 2]}
    with fx.ArchiveServer(files) as server, pytest.raises(KMLError, match="truncated or corrupt"):
        prepare(["aircraft"], tmp_path, mirrors=[server.url], **FAST)
    assert not (tmp_path / "cache" / "aircraft").exists()
    assert not (tmp_path / "raw" / "aircraft" / "fgvc-aircraft-2013b").exists()


# ------------------------------------------------------------------ mini-ImageNet
def test_miniimagenet_learn2learn_pickles_over_http(tmp_path):
    files = fx.miniimagenet_pickles()
    with fx.ArchiveServer(files) as server:
        prepare(["mini-imagenet"], tmp_path, mirrors=[fx.dead_url(), server.url], **FAST)  # first mirror is down
    loaded = stores(tmp_path, "miniimagenet")
    assert counts(loaded) == (64, 16, 20)
    for split, store in loaded.items():
        assert store.image_shape == (3, 84, 84) and int(store.class_sizes.min()) == 2
        wnids = sorted(fx.WNIDS[split])
        assert store.class_names == wnids
        c = wnids.index(fx.WNIDS[split][3])
        expected = torch.tensor(fx.mini_colour(split, 3, 1), dtype=torch.uint8)
        assert torch.equal(store.class_images(c)[1][:, 40, 40], expected)
    assert "learn2learn" in loaded["train"].info["layout"]


def test_miniimagenet_torchmeta_hdf5(tmp_path):
    h5py = pytest.importorskip("h5py")
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    for split, wnids in fx.WNIDS.items():
        (folder / f"{split}_labels.json").write_text(json.dumps(sorted(wnids)))
        with h5py.File(folder / f"{split}_data.hdf5", "w") as handle:
            group = handle.create_group("datasets")
            for c, wnid in enumerate(wnids):
                group.create_dataset(wnid, data=np.full((2, 84, 84, 3), fx.mini_colour(split, c, 0), dtype=np.uint8))
    prepare(["miniimagenet"], tmp_path, mirrors=[fx.dead_url()], **FAST)
    loaded = stores(tmp_path, "miniimagenet")
    assert counts(loaded) == (64, 16, 20) and "torchmeta" in loaded["val"].info["layout"]


def test_miniimagenet_images_zip_and_csv_placed_by_hand(tmp_path):
    archive, csvs = fx.miniimagenet_images_zip()
    place(tmp_path / "raw" / "miniimagenet", {**archive, **csvs})
    prepare(["miniimagenet"], tmp_path, mirrors=[fx.dead_url()], **FAST)
    loaded = stores(tmp_path, "miniimagenet")
    assert counts(loaded) == (64, 16, 20)
    store = loaded["test"]
    c = store.class_names.index(fx.WNIDS["test"][5])
    mean = store.class_images(c).float().mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(fx.mini_colour("test", 5, 0), dtype=torch.float32), atol=6)
    assert "csv" in store.info["layout"]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickles_cannot_run_code_and_web_pages_are_named(tmp_path):
    files = fx.miniimagenet_pickles(per_class=1)
    files["mini-imagenet-cache-train.pkl"] = pickle.dumps({"image_data": _Evil(tmp_path / "owned"), "class_dict": {}})
    place(tmp_path / "raw" / "miniimagenet", files)
    with pytest.raises(KMLError, match=r"refusing to load (posix|os)\.system"):
        prepare(["miniimagenet"], tmp_path, mirrors=[fx.dead_url()], **FAST)
    assert not (tmp_path / "owned").exists()
    page = tmp_path / "page"
    place(
        page / "raw" / "miniimagenet",
        {"mini-imagenet.zip": b"<!DOCTYPE html><html><body>Google Drive can't scan this file</body></html>"},
    )
    with pytest.raises(KMLError, match="is a web page, not an archive"):
        prepare(["miniimagenet"], page, mirrors=[fx.dead_url()], **FAST)


def test_miniimagenet_without_any_source_explains_the_manual_placement(tmp_path):
    with pytest.raises(KMLError, match="mini-imagenet.zip") as error:
        prepare(["miniimagenet"], tmp_path, mirrors=[fx.dead_url()], **FAST)
    assert "Google Drive" in str(error.value) and str(tmp_path / "raw" / "miniimagenet") in str(error.value)


# ------------------------------------------------------------------ archives and downloads
def test_extraction_refuses_escaping_members_and_links(tmp_path):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as bundle:
        info = tarfile.TarInfo("CUB_200_2011/../../evil.txt")
        info.size = 4
        bundle.addfile(info, io.BytesIO(b"evil"))
    files = {"CUB_200_2011.tgz": out.getvalue()}
    place(tmp_path / "data" / "raw" / "cub", files)
    with pytest.raises(KMLError, match=r"refusing to extract CUB_200_2011\.tgz: member .*evil\.txt"):
        prepare(["cub"], tmp_path / "data", mirrors=[fx.dead_url()], checksums=checksums(files), **FAST)
    assert not list(tmp_path.rglob("evil.txt"))

    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w") as bundle:
        info = tarfile.TarInfo("data/passwd")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        bundle.addfile(info)
    with pytest.raises(KMLError, match="is a link"):
        safe_extract(_write(tmp_path / "link.tar", link.getvalue()), tmp_path / "out", progress=False)
    absolute = io.BytesIO()
    with zipfile.ZipFile(absolute, "w") as bundle:
        bundle.writestr("/tmp/kml-absolute.txt", b"x")
    with pytest.raises(KMLError, match="points outside"):
        safe_extract(_write(tmp_path / "abs.zip", absolute.getvalue()), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "data").exists()


def test_download_resumes_a_partial_file_from_an_earlier_run(tmp_path):
    data = bytes(range(256)) * 400
    (tmp_path / "blob.bin.part").write_bytes(data[:1000])
    with fx.ArchiveServer({"blob.bin": data}) as server:
        url, got = fetch.download([f"{server.url}/blob.bin"], tmp_path / "blob.bin", fx.md5(data), progress=False)
    assert server.requests == [("blob.bin", "bytes=1000-", 206)]
    assert (tmp_path / "blob.bin").read_bytes() == data and got == fx.md5(data)


def test_disk_full_is_a_one_line_error(tmp_path, monkeypatch):
    def full(handle, chunk):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch, "_write", full)
    with fx.ArchiveServer({"blob.bin": b"x" * 10}) as server, pytest.raises(KMLError, match="disk full"):
        fetch.download([f"{server.url}/blob.bin"], tmp_path / "blob.bin", progress=False)


# ------------------------------------------------------------------ folder modes
def _image(path: Path, size: tuple[int, int], colour, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_folder_with_split_subfolders_grey_and_mixed_sizes(tmp_path):
    folder = tmp_path / "letters"
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        for c in range(n):
            for k in range(3):
                _image(folder / split / f"{split}-{c}" / f"{k}.png", (20 + 7 * k, 30), 40 + c, mode="L")
    store = load_store(f"folder:{folder}", "val", tmp_path / "data")
    assert store.num_classes == 2 and store.image_shape == (1, 84, 84) and store.mode == f"folder:{folder}"
    assert int(store.class_images(1)[2, 0, 40, 40]) == 41
    assert load_folder(folder, "train", tmp_path / "data").num_classes == 4


def test_folder_of_classes_gets_a_seeded_split(tmp_path):
    folder = tmp_path / "pets"
    names = [f"class{c:02d}" for c in range(20)]
    for c, name in enumerate(names):
        for k in range(2):
            _image(folder / name / f"{k}.jpg", (40, 32), (10 * c, 200, 50))
    (folder / "notes.txt").write_text("not an image")
    loaded = {s: load_folder(folder, s, tmp_path / "data", side=16) for s in ("train", "val", "test")}
    split = expected_split(names)
    assert {s: loaded[s].class_names for s in loaded} == split
    assert loaded["train"].image_shape == (3, 16, 16)
    assert (
        ImageStore.load(next((tmp_path / "data" / "cache").glob("folder-pets-*")) / "test")
        .info["split_rule"]
        .startswith("class folders sorted")
    )


def test_folder_with_too_few_classes(tmp_path):
    folder = tmp_path / "tiny"
    for c in range(4):
        _image(folder / f"c{c}" / "0.png", (8, 8), (c, c, c))
    with pytest.raises(KMLError, match=r"has 0 class\(es\) in split 'val'.*at least 2"):
        load_folder(folder, "val", tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KMLError, match="no class folders"):
        load_folder(tmp_path / "empty", "train", tmp_path / "data")


# ------------------------------------------------------------------ command line
def test_cli_help_unknown_dataset_and_summary_table(tmp_path, capsys, download_cli):
    cli = download_cli
    with pytest.raises(SystemExit) as exit_help:
        cli.main(["--help"])
    assert exit_help.value.code == 0 and "--datasets" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_bad:
        cli.main(["--datasets", "imagenet-1k", "--root", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_bad.value.code == 2 and err.count("\n") == 0
    assert "unknown dataset 'imagenet-1k'" in err and "omniglot, miniimagenet, fc100, cub, aircraft" in err
    files = fx.cifar100_archive()
    with fx.ArchiveServer(files) as server:
        args = [
            "--datasets",
            "FC100",
            "--root",
            str(tmp_path),
            "--mirror",
            server.url,
            "--quiet",
            "--checksum",
            f"cifar-100-python.tar.gz={fx.md5(files['cifar-100-python.tar.gz'])}",
        ]
        assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert "classes train/val/test" in table and "60/20/20" in table and "converted" in table and "KB" in table
    assert cli.main(["--datasets", "fc100", "--root", str(tmp_path), "--quiet"]) == 0
    assert "cached" in capsys.readouterr().out
