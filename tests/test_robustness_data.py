"""Data and downloads, round two (issue 23 items 1, 2, 11, 19, 20): crafted archives, a fake mirror on
127.0.0.1 (silent, trickling), symlinked class folders, a read-only data root.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import socket
import stat
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fixtures_datasets as fx
import pytest
from PIL import Image
from test_training import one_line_error

from kml.data.sources import folder as folder_source
from kml.data.sources import prepare
from kml.data.sources.base import Context
from kml.data.sources.extract import safe_extract
from kml.data.sources.folder import load_folder
from kml.errors import KMLError

prepare_module = importlib.import_module("kml.data.sources.prepare")  # the package exports its function by that name
FAST = {"progress": False, "backoff": 0.01, "workers": 2}
AIRCRAFT = "fgvc-aircraft-2013b.tar.gz"


def place(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def with_tar_members(archive: bytes, extra: dict[str, bytes]) -> bytes:
    """The tar.gz ``archive`` with ``extra`` top-level members appended."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive)) as source,
        tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as bundle,
    ):
        for member in source:
            bundle.addfile(member, source.extractfile(member) if member.isfile() else None)
        for name, data in extra.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return out.getvalue()


def with_zip_members(archive: bytes, extra: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(out, "w") as bundle:
        for info in source.infolist():
            bundle.writestr(info, source.read(info))
        for name, data in extra.items():
            bundle.writestr(name, data)
    return out.getvalue()


# ------------------------------------------------------------------ 1, 2: what an archive may write and delete
def test_cleanup_ignores_markers_inside_the_archive_and_deletes_only_what_kml_extracted(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    hostile = json.dumps({"archive": AIRCRAFT, "entries": [str(victim), "../../../victim", ".."]}).encode()
    archive = with_tar_members(
        fx.aircraft_archive()[AIRCRAFT],
        {
            ".extracted-evil.json": hostile,  # the marker name kml used to trust
            f".extracted-{AIRCRAFT}.json": hostile,
            f".kml-extracted-{AIRCRAFT}.json": hostile,  # kml's record name now: lands inside extracted/, unread
        },
    )
    root, raw = tmp_path / "data", tmp_path / "data" / "raw" / "aircraft"
    place(raw, {AIRCRAFT: archive, "notes.txt": b"mine"})
    rows = prepare(["aircraft"], root, mirrors=[fx.dead_url()], cleanup=True, **FAST)
    assert rows[0].status == "converted" and rows[0].classes == {"train": 70, "val": 15, "test": 15}
    assert (victim / "precious.txt").read_text() == "keep me"
    assert (raw / AIRCRAFT).read_bytes() == archive and (raw / "notes.txt").read_bytes() == b"mine"
    assert sorted(p.name for p in raw.iterdir()) == [AIRCRAFT, "notes.txt"]  # extracted/ and its record are gone


def test_cleanup_leaves_an_extraction_folder_that_links_elsewhere(tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "file").write_text("x")
    ctx = Context("aircraft", tmp_path / "data", "published")
    ctx.raw_dir.mkdir(parents=True)
    ctx.extract_dir.symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger="kml.data.sources"):
        prepare_module._cleanup(ctx)
    assert (elsewhere / "file").read_text() == "x" and ctx.extract_dir.is_symlink()
    assert "left" in caplog.text and "not a folder kml made" in caplog.text


def test_a_tar_member_named_like_the_archive_cannot_replace_it(tmp_path):
    archive = with_tar_members(fx.aircraft_archive()[AIRCRAFT], {AIRCRAFT: b"x" * 32})
    raw = tmp_path / "raw" / "aircraft"
    place(raw, {AIRCRAFT: archive})
    rows = prepare(["aircraft"], tmp_path, mirrors=[fx.dead_url()], checksums={AIRCRAFT: fx.md5(archive)}, **FAST)
    assert rows[0].status == "converted"
    assert (raw / AIRCRAFT).read_bytes() == archive  # the member went to extracted/, not over the archive
    assert (raw / "extracted" / AIRCRAFT).read_bytes() == b"x" * 32


def test_a_zip_member_named_like_the_other_archive_cannot_replace_it(tmp_path):
    files = fx.omniglot_archives(drawers=1)
    evaluation = files["images_evaluation.zip"]
    files["images_background.zip"] = with_zip_members(files["images_background.zip"], {"images_evaluation.zip": b"y"})
    raw = tmp_path / "raw" / "omniglot"
    place(raw, files)
    checksums = {name: fx.md5(data) for name, data in files.items()}
    rows = prepare(["omniglot"], tmp_path, mirrors=[fx.dead_url()], checksums=checksums, **FAST)
    assert rows[0].status == "converted" and rows[0].classes == {"train": 1000, "val": 100, "test": 523}
    assert (raw / "images_evaluation.zip").read_bytes() == evaluation  # the user's file, untouched
    assert not list(raw.glob("*.bad"))


def test_safe_extract_refuses_a_member_that_would_replace_its_own_archive(tmp_path):
    archive = tmp_path / "bundle.tar.gz"
    archive.write_bytes(with_tar_members(fx._tar_gz({"a/b.txt": b"b"}), {"bundle.tar.gz": b"tiny"}))
    original = archive.read_bytes()
    with pytest.raises(KMLError, match="member 'bundle.tar.gz' would replace the archive"):
        safe_extract(archive, tmp_path, progress=False)
    assert archive.read_bytes() == original


# ------------------------------------------------------------------ 11: folder-mode fingerprints
def _image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_folder_cache_follows_linked_class_folders_and_rewritten_images(tmp_path):
    folder, outside = tmp_path / "pictures", tmp_path / "elsewhere" / "linked"
    for split, classes in (("train", ("a", "b")), ("test", ("x", "y"))):
        for c, name in enumerate(classes):
            for k in range(2):
                _image(folder / split / name / f"{k}.png", (40 * c, 10 * k, 0))
    for k in range(2):
        _image(outside / f"{k}.png", (0, 0, 200))
    (folder / "train" / "linked").symlink_to(outside, target_is_directory=True)
    data = tmp_path / "data"
    store = load_folder(folder, "train", data, side=8, progress=False)
    linked = store.class_names.index("linked")
    assert store.num_classes == 3 and int(store.class_sizes[linked]) == 2

    _image(outside / "2.png", (0, 0, 200))  # an image added inside the linked class folder
    store = load_folder(folder, "train", data, side=8, progress=False)
    assert int(store.class_sizes[store.class_names.index("linked")]) == 3

    _image(folder / "train" / "a" / "0.png", (255, 255, 255))  # same name, new contents
    store = load_folder(folder, "train", data, side=8, progress=False)
    assert store.class_images(store.class_names.index("a"))[0, :, 4, 4].tolist() == [255, 255, 255]


def test_folder_fingerprint_survives_a_link_back_up_the_tree(tmp_path):
    folder = tmp_path / "loop"
    _image(folder / "c0" / "0.png", (1, 2, 3))
    (folder / "c0" / "up").symlink_to(folder, target_is_directory=True)
    assert folder_source._fingerprint(folder) == folder_source._fingerprint(folder)  # finishes, and is stable


# ------------------------------------------------------------------ 20: read-only roots, flags, checksums
@pytest.fixture(scope="module")
def fc100_root(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("fc100")
    files = fx.cifar100_archive()
    with fx.ArchiveServer(files) as server:
        prepare(["fc100"], root, mirrors=[server.url], checksums={n: fx.md5(d) for n, d in files.items()}, **FAST)
    return root, files


@contextlib.contextmanager
def read_only(root: Path, monkeypatch, *modules):
    """``root`` without write permission; for root (who writes through it) the lock a writer needs is refused too."""
    paths = [root, *root.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths if not p.is_symlink()}
    for path, mode in modes.items():
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0:

        def refuse(directory):
            raise KMLError(f"cannot write the cache folder {Path(directory).parent}: Read-only file system")

        for module in modules:
            monkeypatch.setattr(module, "locked", refuse)
    try:
        yield
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_a_complete_cache_is_used_from_a_read_only_data_root(fc100_root, monkeypatch, capsys, download_cli):
    root, _ = fc100_root
    with read_only(root, monkeypatch, prepare_module):
        assert download_cli.main(["--datasets", "fc100", "--root", str(root), "--quiet"]) == 0
    assert "cached" in capsys.readouterr().out


def test_a_folder_mode_cache_is_used_from_a_read_only_data_root(tmp_path, monkeypatch):
    folder = tmp_path / "pictures"
    for split in ("train", "val", "test"):
        for c in range(2):
            _image(folder / split / f"{split}{c}" / "0.png", (100 * c, 0, 0))
    data = tmp_path / "data"
    assert load_folder(folder, "val", data, side=8, progress=False).num_classes == 2
    with read_only(data, monkeypatch, folder_source):
        assert load_folder(folder, "val", data, side=8, progress=False).num_classes == 2


def test_a_synthetic_cache_is_used_from_a_read_only_data_root(tmp_path, monkeypatch):
    from kml.data import synthetic

    data = tmp_path / "data"
    first = synthetic.load_synthetic("glyphs", "val", data)
    with read_only(data, monkeypatch, synthetic):
        again = synthetic.load_synthetic("glyphs", "val", data)
    assert again.num_classes == first.num_classes and bool((again.images == first.images).all())


def test_an_unwritable_root_names_the_download_flag(tmp_path, capsys, download_cli):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        download_cli.main(["--datasets", "fc100", "--root", str(blocker / "data"), "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot write the cache folder {blocker / 'data' / 'cache'}" in err
    assert "pass --root a writable data root" in err and "--data-root" not in err


def test_a_malformed_checksum_is_refused_before_anything_runs(tmp_path, capsys, download_cli):
    err = one_line_error(
        capsys, cli=download_cli, argv=["--datasets", "fc100", "--root", str(tmp_path), "--checksum", "x=xyz"]
    )
    assert "--checksum 'x=xyz': bad checksum 'xyz'" in err
    assert not (tmp_path / "cache").exists()
    with pytest.raises(KMLError, match="bad checksum 'xyz'"):
        prepare(["fc100"], tmp_path, checksums={"cifar-100-python.tar.gz": "xyz"}, **FAST)


def test_a_checksum_that_verified_nothing_is_said(fc100_root, caplog, capsys, download_cli):
    root, files = fc100_root
    argv = ["--datasets", "fc100", "--root", str(root), "--quiet"]
    md5 = fx.md5(files["cifar-100-python.tar.gz"])
    with caplog.at_level(logging.WARNING, logger="kml.data.sources"):
        assert download_cli.main([*argv, "--checksum", f"cifar-100-python.tar.gz={md5}"]) == 0
    assert "cached" in capsys.readouterr().out
    (warning,) = [r.getMessage() for r in caplog.records if "--checksum" in r.getMessage()]
    assert "--checksum cifar-100-python.tar.gz was not used" in warning and "--force" in warning
    assert "\n" not in warning


# ------------------------------------------------------------------ 19: a mirror that makes no progress
class SlowMirror:
    """127.0.0.1: ``silent`` accepts and never answers; otherwise headers, then one byte every ``every`` s (6 s at most)."""

    def __init__(self, silent: bool = False, every: float = 0.2):
        self.stop = threading.Event()
        if silent:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(8)  # the kernel completes the connection; nobody ever reads or answers
            self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
            self.httpd = None
            return
        stop = self.stop

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                started = time.monotonic()
                with contextlib.suppress(OSError):
                    while not stop.is_set() and time.monotonic() - started < 6:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        stop.wait(every)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def __enter__(self) -> SlowMirror:
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.httpd is None:
            self.sock.close()
        else:
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.mark.parametrize("silent", [False, True], ids=["one-byte-at-a-time", "silent"])
def test_a_mirror_that_makes_no_progress_fails_within_the_timeout(tmp_path, silent):
    with SlowMirror(silent=silent) as mirror, pytest.raises(KMLError) as error:
        started = time.monotonic()
        prepare(["fc100"], tmp_path, mirrors=[mirror.url], timeout=1, **FAST)
    elapsed = time.monotonic() - started
    message = str(error.value)
    assert elapsed < 4, f"{elapsed:.1f} s: the stalled mirror was waited on or retried"
    assert f"{mirror.url}/cifar-100-python.tar.gz: no progress" in message and "--timeout" in message
    assert "download it by hand and place cifar-100-python.tar.gz" in message and "\n" not in message
    assert f"in {tmp_path / 'raw' / 'fc100'}/" in message


def test_download_timeout_flag(tmp_path, capsys, download_cli):
    err = one_line_error(
        capsys, cli=download_cli, argv=["--datasets", "fc100", "--root", str(tmp_path), "--timeout", "0"]
    )
    assert "--timeout must be a finite number > 0" in err
    with SlowMirror(silent=True) as mirror, pytest.raises(SystemExit):
        download_cli.main(["--datasets", "fc100", "--root", str(tmp_path), "--mirror", mirror.url, "--timeout", "1"])
    assert "no progress" in capsys.readouterr().err


def test_folder_fingerprint_ignores_permission_changes(tmp_path):
    folder = tmp_path / "pics"
    _image(folder / "c0" / "0.png", (1, 2, 3))
    before = folder_source._fingerprint(folder)
    (folder / "c0" / "0.png").chmod(0o600)  # changes ctime, not the image
    assert folder_source._fingerprint(folder) == before
