"""Cached image store: the only thing the episode samplers read.

One store holds the images of one mode and one split, converted once from
the raw files. On disk a store is a folder::

    <root>/cache/<mode>/<split>/
        images.npy      uint8 [num_images, C, H, W], images grouped by class
        manifest.json   format version, class names and offsets, source info

The manifest is written last, so a folder without one is an interrupted
conversion and is never mistaken for a complete cache. Loading is one memory
map of ``images.npy``; resizing to the common side length and channel count
of a mixture happens once, in :meth:`ImageStore.conformed`, never per episode.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kml.data.arrays import images_first, label_indices, names_of_labels
from kml.data.splits import (
    DEFAULT_SPLIT_FRACTIONS,
    DEFAULT_SPLIT_SEED,
    SPLITS,
    check_fractions,
    normalised_fractions,
    split_by_class,
    split_classes,
)
from kml.errors import KMLError, setting

__all__ = [
    "cache_dir",
    "check_fractions",
    "check_same_cache",
    "DEFAULT_SPLIT_FRACTIONS",
    "DEFAULT_SPLIT_SEED",
    "FORMAT_VERSION",
    "IMAGES_FILE",
    "ImageStore",
    "locked",
    "MANIFEST_FILE",
    "normalised_fractions",
    "split_by_class",
    "split_classes",
    "SPLITS",
]

FORMAT_VERSION = 1
IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.json"


# manifest info entries that report one split's conversion outcome, not how the cache was made
_OUTCOME_KEYS = ("skipped", "skipped_images", "dropped_classes")


def check_same_cache(recorded: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse, in one line, a cache made otherwise than the one a run recorded (both :meth:`ImageStore.identity`).

    Another split of the same cache is compared on how it was made only (its classes differ by design).
    """
    made, was = now["made"], recorded.get("made", {})
    changed = [key for key in sorted(set(made) | set(was)) if made.get(key) != was.get(key)]
    key = changed[0] if changed else None
    if changed:
        difference = f"{key}: the run's {was.get(key)!r}, now {made.get(key)!r}"
        fix = f" --split {was[key]}" if key == "split" and isinstance(was.get(key), str) else ""
    elif recorded.get("split") == now["split"] and recorded.get("classes") != now["classes"]:
        difference, fix = f"its {now['split']} classes or their images differ", ""
    else:
        return
    if key == "generator_version" and now["made"].get("source") == "synthetic":
        raise KMLError(
            f"the {now['mode']} cache is not the one this run was trained on: this kml generates {now['mode']} with "
            f"generator version {made.get(key)}, the run had version {was.get(key)} (its classes differ); evaluate "
            f"the run with the kml version that trained it, or train it again"
        )
    if now["made"].get("source") == "synthetic" or "folder" in now["mode"].split(":", 1)[0]:
        remedy = "delete that mode's cache folder to rebuild it"  # generated or folder modes: kml-download has none
    else:
        remedy = f"kml-download --datasets {now['mode']} --force{fix}, with the options that give the run's value"
    raise KMLError(
        f"the {now['mode']} cache is not the one this run was trained on ({difference}); make it again as the run "
        f"had it ({remedy}) or point {setting('data_root')} at the run's cache"
    )


def check_run_caches(recorded: dict[str, Any] | None, stores: Sequence[ImageStore]) -> None:
    """Refuse stores whose caches were made otherwise than those a run trained on (its checkpoint's ``data``,
    recorded since kml 0.3): a split converted again could put training classes into the test split."""
    if not recorded:
        return
    for store in stores:
        for identity in recorded.get(store.split) or recorded.get("train", []):
            if identity.get("mode") == store.mode:
                check_same_cache(identity, store.identity())


def cache_dir(root: str | os.PathLike, mode: str, split: str) -> Path:
    """Folder of the cached store of ``mode``/``split`` under a data root."""
    return Path(root) / "cache" / mode / split


@dataclass
class ImageStore:
    """Images of one mode and split, grouped by class.

    Attributes:
        images: uint8 ``[num_images, C, H, W]``; class ``c`` owns rows
            ``class_offsets[c]:class_offsets[c + 1]``.
        class_offsets: int64 ``[num_classes + 1]``, on the same device as ``images``.
        class_names: one name per class, in store order.
        mode: canonical mode name (``omniglot``, ``glyphs``, ``folder:/data/x`` ...).
        split: ``train``, ``val`` or ``test``.
        info: free-form provenance written to the manifest (source, checksum, split rule).
    """

    images: torch.Tensor
    class_offsets: torch.Tensor
    class_names: list[str]
    mode: str
    split: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise KMLError(
                f"store {self.mode}/{self.split}: images must be uint8 [N, C, H, W], "
                f"got {self.images.dtype} {list(self.images.shape)}"
            )
        if len(self.class_names) + 1 != len(self.class_offsets):
            raise KMLError(
                f"store {self.mode}/{self.split}: {len(self.class_names)} class names "
                f"but {len(self.class_offsets) - 1} class offsets"
            )
        if int(self.class_offsets[-1]) != len(self.images):
            raise KMLError(
                f"store {self.mode}/{self.split}: class offsets end at {int(self.class_offsets[-1])} "
                f"but there are {len(self.images)} images"
            )

    # ------------------------------------------------------------------ build
    @classmethod
    def from_class_arrays(
        cls,
        class_images: Sequence[np.ndarray | torch.Tensor],
        class_names: Sequence[str],
        mode: str,
        split: str,
        info: dict[str, Any] | None = None,
    ) -> ImageStore:
        """Build a store from one uint8 array per class, each ``[n_c, C, H, W]`` (or ``[n_c, H, W]`` grey)."""
        if len(class_images) != len(class_names):
            raise KMLError(f"store {mode}/{split}: {len(class_images)} image groups for {len(class_names)} classes")
        if not class_images:
            raise KMLError(f"store {mode}/{split}: no classes")
        tensors: list[torch.Tensor] = []
        for name, images in zip(class_names, class_images):
            images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
            if images.dim() == 3:
                images = images.unsqueeze(1)
            if images.dtype != torch.uint8:
                raise KMLError(f"store {mode}/{split}: class {name!r} images are {images.dtype}, expected uint8")
            if tensors and images.shape[1:] != tensors[0].shape[1:]:
                raise KMLError(
                    f"store {mode}/{split}: mismatched image sizes, class {name!r} has "
                    f"{list(images.shape[1:])} but class {class_names[0]!r} has {list(tensors[0].shape[1:])}"
                )
            tensors.append(images)
        sizes = torch.tensor([len(t) for t in tensors], dtype=torch.int64)
        offsets = torch.zeros(len(tensors) + 1, dtype=torch.int64)
        offsets[1:] = sizes.cumsum(0)
        return cls(torch.cat(tensors), offsets, list(class_names), mode, split, dict(info or {}))

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | Sequence[Hashable],
        mode: str = "arrays",
        split: str = "train",
        class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
        channels_last: bool | None = None,
        info: dict[str, Any] | None = None,
    ) -> ImageStore:
        """Build a store from in-memory images and one label per image (nothing is written to disk).

        Args:
            images: uint8 ``[num_images, H, W, C]`` (channels last, as PIL/numpy images come),
                ``[num_images, C, H, W]`` (channels first) or ``[num_images, H, W]`` (grey); C is 1 or 3.
                The layout is read from where the size-1-or-3 axis is; ``channels_last`` forces it
                when both could be (e.g. ``[n, 3, 5, 3]``).
            labels: one label per image: integers (any values, need not be ``0..classes-1``) or any
                hashable values, e.g. strings or tuples (a numpy string array, a list); every distinct
                value is a class, and classes are ordered by value (values that cannot be compared with
                each other, such as a mix of strings and integers, by type name, then text). Floats and
                booleans are refused: they are usually images or masks passed by mistake.
            mode, split: the store's mode name (distinct per mode in a mixture) and split.
            class_names: names of the classes, in label order, or a mapping label -> name
                (default: the label values as text; a tuple's parts joined by ``/``).

        Images of a class keep their relative order. To hold out classes for validation and test,
        :func:`split_by_class` cuts the arrays by class, one part per split.
        """
        where = f"store {mode}/{split}"
        array = images_first(images, channels_last, where)
        if len(array) == 0:
            raise KMLError(f"{where}: no images")
        label_tensor, values = label_indices(labels, len(array), where)
        if values is None:  # integer labels: their distinct values, sorted
            distinct, counts = torch.unique(label_tensor, return_counts=True)
            values = [int(v) for v in distinct]
        else:
            counts = torch.bincount(label_tensor, minlength=len(values))
        order = torch.argsort(label_tensor, stable=True)
        names = names_of_labels(class_names, values, where)
        offsets = torch.zeros(len(values) + 1, dtype=torch.int64)
        offsets[1:] = counts.cumsum(0)
        grouped = array.index_select(0, order).contiguous()
        return cls(grouped, offsets, names, mode, split, {"source": "arrays", **(info or {})})

    # ------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_sizes(self) -> torch.Tensor:
        """int64 ``[num_classes]``: images per class."""
        return self.class_offsets[1:] - self.class_offsets[:-1]

    @property
    def labels(self) -> torch.Tensor:
        """int64 ``[num_images]``: class index of every image."""
        return torch.repeat_interleave(torch.arange(self.num_classes, device=self.images.device), self.class_sizes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def class_images(self, index: int) -> torch.Tensor:
        """uint8 ``[n_c, C, H, W]``: the images of class ``index``."""
        return self.images[int(self.class_offsets[index]) : int(self.class_offsets[index + 1])]

    def to(self, device: str | torch.device) -> ImageStore:
        return ImageStore(
            self.images.to(device), self.class_offsets.to(device), self.class_names, self.mode, self.split, self.info
        )

    def conformed(self, side: int, channels: int, chunk: int = 2048) -> ImageStore:
        """Return a copy at ``side`` x ``side`` pixels with ``channels`` channels (done once, at load).

        Grey is tiled to RGB; RGB is averaged to grey. Resizing is antialiased bilinear.
        """
        if channels not in (1, 3):
            raise KMLError(f"channels must be 1 or 3, got {channels}")
        c, h, w = self.image_shape
        if (h, w) == (side, side) and c == channels:
            return self
        out = torch.empty((len(self.images), channels, side, side), dtype=torch.uint8, device=self.device)
        for start in range(0, len(self.images), chunk):
            batch = self.images[start : start + chunk].to(self.device).float()
            if (h, w) != (side, side):
                batch = F.interpolate(batch, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            if c == 1 and channels == 3:
                batch = batch.expand(-1, 3, -1, -1)
            elif c == 3 and channels == 1:
                batch = batch.mean(dim=1, keepdim=True)
            out[start : start + chunk] = batch.round().clamp_(0, 255).to(torch.uint8)
        return ImageStore(out, self.class_offsets, self.class_names, self.mode, self.split, self.info)

    def identity(self) -> dict[str, Any]:
        """What a run records of this store's cache: how it was made (the manifest's info, less one split's
        outcome: source, split rule, preprocessing, side) and a digest of its classes and their image counts."""
        made = {key: value for key, value in self.info.items() if key not in _OUTCOME_KEYS}
        if isinstance(made.get("sources"), dict):  # where an archive came from (URL, path) is not what it holds
            made["sources"] = {
                name: entry.get("checksum") if isinstance(entry, dict) else entry
                for name, entry in made["sources"].items()
            }
        classes = json.dumps([self.class_names, self.class_offsets.tolist()]).encode()
        return {
            "mode": self.mode,
            "split": self.split,
            "made": json.loads(json.dumps(made, default=str)),  # plain values: a checkpoint loads them weights-only
            "classes": hashlib.blake2b(classes, digest_size=8).hexdigest(),
        }

    # ------------------------------------------------------------------ disk
    def manifest(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "mode": self.mode,
            "split": self.split,
            "image_shape": list(self.image_shape),
            "num_images": len(self.images),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "class_offsets": self.class_offsets.tolist(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **{"info": self.info},
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the store atomically: into a temporary folder, renamed into place when complete."""
        directory = Path(directory)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            np.save(tmp / IMAGES_FILE, self.images.cpu().numpy())
            (tmp / MANIFEST_FILE).write_text(json.dumps(self.manifest(), indent=1))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise KMLError(
                f"could not write cache {directory}: {error.strerror or error}; pass --data-root a writable folder"
            ) from None
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True, rebuild: str | None = None) -> ImageStore:
        """Load a store saved by :meth:`save` (a memory map of the images by default).

        ``rebuild`` is the advice of every error, a command that rebuilds this cache (its caller knows the mode).
        """
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        rebuild = rebuild or f"delete {directory} and rebuild it (rm -r {directory}, then rerun)"
        if not manifest_path.is_file():
            raise KMLError(f"no complete cache at {directory} (missing {MANIFEST_FILE}); {rebuild}")
        try:
            manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise KMLError(
                f"corrupt cache manifest {manifest_path} ({str(error).splitlines()[0]}); {rebuild}"
            ) from None
        except OSError as error:
            raise KMLError(f"cannot read cache manifest {manifest_path}: {error.strerror or error}") from None
        problem = _manifest_problem(manifest)
        if problem:
            raise KMLError(f"corrupt cache manifest {manifest_path} ({problem}); {rebuild}")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise KMLError(
                f"cache {directory} has format version {version}, this kml reads version {FORMAT_VERSION}; {rebuild}"
            )
        images_path = directory / IMAGES_FILE
        try:
            array = np.load(images_path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError) as error:  # EOFError: a 0-byte file
            reason = (error.strerror if isinstance(error, OSError) else None) or str(error) or type(error).__name__
            raise KMLError(f"corrupt cache file {images_path} ({reason}); {rebuild}") from None
        expected = (manifest["num_images"], *manifest["image_shape"])
        if array.shape != tuple(expected) or array.dtype != np.uint8:
            raise KMLError(
                f"corrupt cache file {images_path}: holds {array.dtype} {list(array.shape)}, "
                f"manifest says uint8 {list(expected)}; {rebuild}"
            )
        with warnings.catch_warnings():  # a read-only memory map is fine: stores are never written in place
            warnings.simplefilter("ignore", UserWarning)
            images = torch.from_numpy(array)
        try:
            return cls(
                images,
                torch.tensor(manifest["class_offsets"], dtype=torch.int64),
                list(manifest["class_names"]),
                manifest["mode"],
                manifest["split"],
                manifest.get("info", {}),
            )
        except KMLError as error:  # offsets that do not fit the images
            raise KMLError(f"corrupt cache {directory}: {error}; {rebuild}") from None


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a manifest's structure, or ``None`` (checked before any field is used)."""
    if not isinstance(manifest, dict):
        return f"a {type(manifest).__name__}, not a mapping"
    kinds = {
        "format_version": int,
        "mode": str,
        "split": str,
        "image_shape": list,
        "num_images": int,
        "class_names": list,
        "class_offsets": list,
    }
    missing = [key for key in kinds if key not in manifest]
    if missing:
        return f"missing {', '.join(missing)}"
    wrong = [
        key for key, kind in kinds.items() if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool)
    ]
    if wrong:
        return f"{', '.join(wrong)} of the wrong type"
    if len(manifest["image_shape"]) != 3 or not all(isinstance(v, int) and v > 0 for v in manifest["image_shape"]):
        return f"image_shape {manifest['image_shape']} is not three positive integers"
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in manifest["class_offsets"]):
        return "class_offsets are not integers"
    if "info" in manifest and not isinstance(manifest["info"], dict):
        return "info is not a mapping"
    return None


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<directory>.lock`` (POSIX): one converter per cache at a time.

    Several processes (e.g. the ranks of a distributed run) may ask for the same cache at
    once; the first converts or generates it, the others wait and reuse it.
    """
    directory = Path(directory)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        handle = open(directory.parent / f".{directory.name}.lock", "a")
    except OSError as error:
        raise KMLError(
            f"cannot write the cache folder {directory.parent}: {error.strerror or error}; pass --data-root a writable folder"
        ) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
