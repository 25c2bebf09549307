"""Tiny archives in the exact raw layouts of the five benchmarks, and a loopback HTTP server.

Each builder returns ``{file name: bytes}`` with the same folder names, file
names, text files and pickle formats as the real archive, but few, tiny
images. Class counts are the real ones (1623 Omniglot characters, 100
CIFAR-100 classes, 200 birds, 100 aircraft variants, 100 mini-ImageNet
classes), so the split rules are checked at their real sizes; every image
encodes who it is so decoding can be checked pixel by pixel.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image

from kml.data.sources import aircraft as aircraft_source
from kml.data.sources.miniimagenet import WNIDS


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as bundle:
        folders = sorted({"/".join(name.split("/")[:i]) for name in members for i in range(1, name.count("/") + 1)})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            bundle.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            bundle.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return out.getvalue()


# ------------------------------------------------------------------ Omniglot
OMNIGLOT_SIDE = 105  # the real PNGs are 105 x 105, 1-bit


def omniglot_character_png() -> bytes:
    """White page, one black square 'stroke' in the middle (rows/cols 30..74)."""
    image = Image.new("1", (OMNIGLOT_SIDE, OMNIGLOT_SIDE), 1)
    image.paste(0, (30, 30, 75, 75))
    return _png(image)


def omniglot_archives(drawers: int = 2) -> dict[str, bytes]:
    """images_background.zip (30 alphabets, 964 characters) and images_evaluation.zip (20, 659)."""
    png = omniglot_character_png()
    archives, character_id = {}, 0
    for top, alphabets, characters in (("images_background", 30, 964), ("images_evaluation", 20, 659)):
        members = {}
        for a in range(alphabets):
            count = characters // alphabets + (a < characters % alphabets)
            for c in range(count):
                character_id += 1
                for d in range(drawers):
                    folder = f"{top}/{top[7:].title()}_Alphabet_{a:02d}/character{c + 1:02d}"
                    members[f"{folder}/{character_id:04d}_{d + 1:02d}.png"] = png
        archives[f"{top}.zip"] = _zip(members)
    return archives


# ------------------------------------------------------------------ CIFAR-100
def cifar_pixels(fine: int, coarse: int, index: int) -> np.ndarray:
    """uint8 [3, 32, 32]: red = fine label (pixel (0,1) = 1), green = superclass, blue = row + index."""
    image = np.empty((3, 32, 32), dtype=np.uint8)
    image[0] = fine
    image[0, 0, 1] = 1
    image[1] = coarse
    image[2] = (np.arange(32)[:, None] + index * 40) % 256
    return image


def cifar100_archive(train_per_class: int = 2, test_per_class: int = 1) -> dict[str, bytes]:
    """cifar-100-python.tar.gz; fine class f belongs to superclass f % 20 (5 fine classes each)."""
    members = {}
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, fine, coarse = [], [], []
        for index in range(per_class):
            for f in range(100):
                offset = 0 if part == "train" else train_per_class
                images.append(cifar_pixels(f, f % 20, index + offset).reshape(-1))
                fine.append(f)
                coarse.append(f % 20)
        batch = {
            b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
            b"batch_label": f"{part}ing batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": coarse,
            b"data": np.stack(images),
        }
        members[f"cifar-100-python/{part}"] = pickle.dumps(batch, protocol=2)
    meta = {
        b"fine_label_names": [f"class_{f:02d}".encode() for f in range(100)],
        b"coarse_label_names": [f"super_{c:02d}".encode() for c in range(20)],
    }
    members["cifar-100-python/meta"] = pickle.dumps(meta, protocol=2)
    members["cifar-100-python/file.txt~"] = b""
    return {"cifar-100-python.tar.gz": _tar_gz(members)}


# ------------------------------------------------------------------ CUB
CUB_CLASSES = [f"{i:03d}.Bird_{i:03d}" for i in range(1, 201)]  # real pattern: 001.Black_footed_Albatross


def cub_colour(class_index: int) -> tuple[int, int, int]:
    return ((class_index * 37) % 200 + 20, (class_index * 91) % 200 + 20, (class_index * 53) % 200 + 20)


def cub_archive(per_class: int = 2, corrupt: str | None = None) -> dict[str, bytes]:
    """CUB_200_2011.tgz; class i's photos are a solid colour; ``corrupt`` names one image to garble."""
    members = {"attributes.txt": b"1 has_bill_shape::curved\n"}
    classes, images, labels, split, boxes = [], [], [], [], []
    image_id = 0
    for c, name in enumerate(CUB_CLASSES):
        classes.append(f"{c + 1} {name}")
        for k in range(per_class):
            image_id += 1
            rel = f"{name}/{name.split('.', 1)[1]}_{k + 1:04d}_{image_id}.jpg"
            data = _jpeg(Image.new("RGB", (30, 24), cub_colour(c)))
            members[f"CUB_200_2011/images/{rel}"] = b"not a jpeg at all" if rel == corrupt else data
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {k % 2}")
            boxes.append(f"{image_id} 1.0 1.0 20.0 15.0")
    for name, lines in (
        ("classes.txt", classes),
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("bounding_boxes.txt", boxes),
    ):
        members[f"CUB_200_2011/{name}"] = ("\n".join(lines) + "\n").encode()
    members["CUB_200_2011/README"] = b"CUB-200-2011 (tiny test copy)\n"
    return {"CUB_200_2011.tgz": _tar_gz(members)}


# ------------------------------------------------------------------ FGVC-Aircraft
AIRCRAFT_VARIANTS = sorted(
    "A340-300 A318 Falcon_2000 F-16A/B F/A-18 C-130 MD-80 BAE_146-200 777-200 747-400 Cessna_172 An-12 A330-300 "
    "A321 Fokker_100 Fokker_50 DHC-1 Fokker_70 A340-200 DC-6 747-200 Il-76 747-300 Model_B200 Saab_340 Cessna_560 "
    "Dornier_328 E-195 ERJ_135 747-100 737-600 C-47 DR-400 ATR-72 A330-200 727-200 737-700 PA-28 ERJ_145 737-300 "
    "767-300 737-500 737-200 DHC-6 Falcon_900 DC-3 Eurofighter_Typhoon Challenger_600 Hawk_T1 A380 777-300 E-190 "
    "DHC-8-100 Cessna_525 Metroliner EMB-120 Tu-134 Embraer_Legacy_600 Gulfstream_IV Tu-154 MD-87 A300B4 A340-600 "
    "A340-500 MD-11 707-320 Cessna_208 Global_Express A319 DH-82 737-900 757-300 767-200 A310 A320 BAE_146-300 "
    "CRJ-900 DC-10 DC-8 DC-9-30 DHC-8-300 Gulfstream_V SR-20 Tornado Yak-42 737-400 737-800 757-200 767-400 ATR-42 "
    "BAE-125 Beechcraft_1900 Boeing_717 CRJ-200 CRJ-700 E-170 L-1011 MD-90 Saab_2000 Spitfire".split()
)
AIRCRAFT_VARIANTS = [v.replace("_", " ") for v in AIRCRAFT_VARIANTS]  # real names contain spaces and slashes
AIRCRAFT_BOX = (11, 6, 40, 30)  # xmin ymin xmax ymax, 1-based inclusive: the red area
AIRCRAFT_SIZE = (60, 50)  # width, height; the bottom 20 rows are the green copyright banner


def aircraft_photo() -> bytes:
    image = Image.new("RGB", AIRCRAFT_SIZE, (0, 0, 255))
    xmin, ymin, xmax, ymax = AIRCRAFT_BOX
    image.paste((255, 0, 0), (xmin - 1, ymin - 1, xmax, ymax))
    image.paste((0, 255, 0), (0, AIRCRAFT_SIZE[1] - aircraft_source.BANNER, AIRCRAFT_SIZE[0], AIRCRAFT_SIZE[1]))
    return _jpeg(image)


def aircraft_archive() -> dict[str, bytes]:
    """fgvc-aircraft-2013b.tar.gz: one trainval photo per variant, and a test photo for every third."""
    data = "fgvc-aircraft-2013b/data"
    photo = aircraft_photo()
    members, trainval, test, boxes = {}, [], [], []
    image_id = 34309
    for v, variant in enumerate(AIRCRAFT_VARIANTS):
        for listing in [trainval] + ([test] if v % 3 == 0 else []):
            image_id += 1
            members[f"{data}/images/{image_id:07d}.jpg"] = photo
            listing.append(f"{image_id:07d} {variant}")
            boxes.append(f"{image_id:07d} " + " ".join(map(str, AIRCRAFT_BOX)))
    members[f"{data}/variants.txt"] = ("\n".join(AIRCRAFT_VARIANTS) + "\n").encode()
    members[f"{data}/images_variant_trainval.txt"] = ("\n".join(trainval) + "\n").encode()
    members[f"{data}/images_variant_test.txt"] = ("\n".join(test) + "\n").encode()
    members[f"{data}/images_box.txt"] = ("\n".join(boxes) + "\n").encode()
    members[f"{data}/families.txt"] = b"Boeing 707\n"
    members["fgvc-aircraft-2013b/README.md"] = b"# FGVC-Aircraft Benchmark (tiny test copy)\n"
    return {"fgvc-aircraft-2013b.tar.gz": _tar_gz(members)}


# ------------------------------------------------------------------ mini-ImageNet
def mini_colour(split: str, c: int, k: int) -> tuple[int, int, int]:
    return ({"train": 10, "val": 120, "test": 200}[split] + c, 3 * c % 256, 50 + k)


def miniimagenet_pickles(per_class: int = 2) -> dict[str, bytes]:
    """learn2learn's mini-imagenet-cache-{train,validation,test}.pkl: image_data [N,84,84,3], class_dict."""
    files = {}
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        images, class_dict = [], {}
        for c, wnid in enumerate(WNIDS[split]):
            class_dict[wnid] = list(range(len(images), len(images) + per_class))
            for k in range(per_class):
                images.append(np.full((84, 84, 3), mini_colour(split, c, k), dtype=np.uint8))
        files[f"mini-imagenet-cache-{name}.pkl"] = pickle.dumps(
            {"image_data": np.stack(images), "class_dict": class_dict}, protocol=4
        )
    return files


def miniimagenet_images_zip() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """MMAML's mini-imagenet.zip (images/<wnid><8 digits>.jpg, 100 x 90 here) and the three csv files."""
    members, csvs = {}, {}
    for split, wnids in WNIDS.items():
        rows = ["filename,label"]
        for c, wnid in enumerate(wnids):
            filename = f"{wnid}{c * 600 + 5:08d}.jpg"
            members[f"images/{filename}"] = _jpeg(Image.new("RGB", (100, 90), mini_colour(split, c, 0)))
            rows.append(f"{filename},{wnid}")
        csvs[f"{split}.csv"] = ("\n".join(rows) + "\n").encode()
    return {"mini-imagenet.zip": _zip(members)}, csvs


# ------------------------------------------------------------------ server
class ArchiveServer:
    """Serves ``files`` on 127.0.0.1 from a thread.

    ``ranges``: honour ``Range: bytes=N-`` (206) or ignore it (200, whole file).
    ``fail_first``: answer the first N requests of each file with 503.
    ``cut_first``: send only half of the first successful body of each file, then hang up.
    ``requests`` records ``(file, range header, status)``.
    """

    def __init__(self, files: dict[str, bytes], ranges: bool = True, fail_first: int = 0, cut_first: bool = False):
        self.files, self.ranges, self.cut_first = dict(files), ranges, cut_first
        self.failures = {name: fail_first for name in files}
        self.cut_done: set[str] = set()
        self.requests: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                name = unquote(urlsplit(self.path).path).lstrip("/")
                wanted = self.headers.get("Range")
                if name not in server.files:
                    server.requests.append((name, wanted, 404))
                    self.send_error(404)
                    return
                if server.failures[name] > 0:
                    server.failures[name] -= 1
                    server.requests.append((name, wanted, 503))
                    self.send_error(503, "try again")
                    return
                data, start, status = server.files[name], 0, 200
                if server.ranges and wanted and wanted.startswith("bytes=") and wanted.endswith("-"):
                    start = int(wanted[6:-1])
                    if start >= len(data):
                        server.requests.append((name, wanted, 416))
                        self.send_error(416)
                        return
                    status = 206
                body = data[start:]
                server.requests.append((name, wanted, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.cut_first and name not in server.cut_done:
                    server.cut_done.add(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> ArchiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def dead_url() -> str:
    """A loopback URL where nothing listens (the port is bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"
