"""Built-in procedural modes: no download, generated on CPU in seconds.

Three modes that look and behave differently, like the real benchmark mix:

- ``glyphs``: pen-stroke characters (Omniglot-like, grey, bright strokes on black);
  a class is a set of 2-4 Bezier strokes.
- ``textures``: oriented colour gratings; a class is a pair of gratings
  (orientation, frequency, colour) over a base colour.
- ``shapes``: coloured star-shaped polygons on a coloured background; a class
  is an outline plus a foreground and background colour.

Every image of a class is a fresh draw of per-image variation (position,
scale, rotation, jitter of the class parameters, pixel noise), so 5-way
1-shot is learnable but far from trivial. Classes of different splits come
from different seeds, so splits never share a class; what every class of a mode
shares (the ``shapes`` colour palette) comes from the mode's seed alone, so the
classes of every split are draws from one distribution.

``GENERATOR_VERSIONS`` says which generator made a mode's cache; a cache of an
older version is generated again. ``shapes`` is at version 2: version 1 drew its
8-colour palette per split, so each split had its own colours and its own
difficulty (seed 0: raw-pixel nearest-centroid accuracy 81% on val, 61% on test).
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import torch

from kml.data.store import SPLITS, ImageStore, cache_dir, locked
from kml.errors import KMLError

__all__ = [
    "generate_store",
    "GENERATOR_VERSION",
    "GENERATOR_VERSIONS",
    "IMAGES_PER_CLASS",
    "load_synthetic",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_MODES",
    "SYNTHETIC_SIDE",
]

SYNTHETIC_MODES = ("glyphs", "textures", "shapes")
SYNTHETIC_CLASSES = {"train": 256, "val": 64, "test": 64}
IMAGES_PER_CLASS = 20
SYNTHETIC_SIDE = 32
# per mode: a change to one mode's generator regenerates that mode's caches only
GENERATOR_VERSIONS = {"glyphs": 1, "textures": 1, "shapes": 2}
GENERATOR_VERSION = max(GENERATOR_VERSIONS.values())  # the newest of them (kml 0.2: every mode at 1)
_CHUNK = 256


def _seed(mode: str, split: str, seed: int, what: str) -> int:
    return zlib.crc32(f"{mode}/{split}/{seed}/{what}".encode()) & 0x7FFFFFFF


def _grid(side: int) -> torch.Tensor:
    """``[side*side, 2]`` pixel centres in ``[-1, 1]`` (x, y)."""
    axis = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)


def _uniform(g: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=g) * (high - low) + low


def _affine(points: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate, scale and shift ``[B, P, 2]`` points by per-image ``[B]``, ``[B]``, ``[B, 2]``."""
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [B, 2, 2]
    return (points @ rotation.transpose(1, 2)) * scale.view(-1, 1, 1) + shift.view(-1, 1, 2)


def _glyphs(
    classes: int,
    per_class: int,
    side: int,
    g_class: torch.Generator,
    g_image: torch.Generator,
    _g_mode: torch.Generator,  # what all classes of the mode share: nothing here
) -> torch.Tensor:
    strokes_max, samples = 4, 20
    control = _uniform(g_class, -0.65, 0.65, classes, strokes_max, 3, 2)
    strokes = torch.randint(2, strokes_max + 1, (classes,), generator=g_class)
    t = torch.linspace(0, 1, samples).view(1, 1, samples, 1)
    grid = _grid(side)
    out = []
    n = classes * per_class
    for start in range(0, n, _CHUNK):
        idx = torch.arange(start, min(n, start + _CHUNK)) // per_class
        b = len(idx)
        ctrl = control[idx] + 0.07 * torch.randn(b, strokes_max, 3, 2, generator=g_image)
        p0, p1, p2 = ctrl[:, :, 0:1], ctrl[:, :, 1:2], ctrl[:, :, 2:3]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # [b, S, samples, 2]
        unused = torch.arange(strokes_max).view(1, -1, 1, 1) >= strokes[idx].view(-1, 1, 1, 1)
        curve = curve.masked_fill(unused, 10.0)  # park unused strokes far away
        points = _affine(
            curve.reshape(b, -1, 2),
            _uniform(g_image, -0.25, 0.25, b),
            _uniform(g_image, 0.8, 1.1, b),
            _uniform(g_image, -0.12, 0.12, b, 2),
        )
        width = _uniform(g_image, 0.06, 0.1, b).view(-1, 1)
        dist2 = torch.cdist(grid.expand(b, -1, -1), points).pow(2).amin(dim=2)  # [b, HW]
        ink = torch.exp(-dist2 / (2 * width**2))
        ink = ink + 0.06 * torch.randn(b, side * side, generator=g_image)
        out.append(ink.view(b, 1, side, side))
    return torch.cat(out)


def _textures(
    classes: int,
    per_class: int,
    side: int,
    g_class: torch.Generator,
    g_image: torch.Generator,
    _g_mode: torch.Generator,  # what all classes of the mode share: nothing here
) -> torch.Tensor:
    gratings = 2
    angle = _uniform(g_class, 0, math.pi, classes, gratings)
    freq = _uniform(g_class, 1.5, 6.0, classes, gratings)
    colour = torch.rand(classes, gratings, 3, generator=g_class)
    base = torch.rand(classes, 3, generator=g_class) * 0.5
    grid = _grid(side)  # [HW, 2]
    out = []
    n = classes * per_class
    for start in range(0, n, _CHUNK):
        idx = torch.arange(start, min(n, start + _CHUNK)) // per_class
        b = len(idx)
        theta = angle[idx] + 0.15 * torch.randn(b, gratings, generator=g_image)
        f = freq[idx] * _uniform(g_image, 0.85, 1.15, b, gratings)
        phase = _uniform(g_image, 0, 2 * math.pi, b, gratings)
        direction = torch.stack([theta.cos(), theta.sin()], -1)  # [b, G, 2]
        wave = 0.5 + 0.5 * torch.sin(math.pi * f.unsqueeze(-1) * (direction @ grid.T) + phase.unsqueeze(-1))  # [b,G,HW]
        contrast = _uniform(g_image, 0.6, 1.0, b, gratings, 1, 1)
        col = colour[idx] + 0.08 * torch.randn(b, gratings, 3, generator=g_image)
        image = base[idx].view(b, 3, 1) + (contrast * col.unsqueeze(-1) * wave.unsqueeze(2)).sum(1) * 0.6
        image = image + 0.08 * torch.randn(b, 3, side * side, generator=g_image)
        out.append(image.view(b, 3, side, side))
    return torch.cat(out)


def _shapes(
    classes: int,
    per_class: int,
    side: int,
    g_class: torch.Generator,
    g_image: torch.Generator,
    g_mode: torch.Generator,
) -> torch.Tensor:
    vertices_max = 7
    # colours come from a small palette, so the outline, not the colour, tells many classes apart; the palette is
    # the mode's (g_mode: the same in every split), so held-out classes use the colours training classes use
    palette = torch.rand(8, 3, generator=g_mode)
    vertices = torch.randint(3, vertices_max + 1, (classes,), generator=g_class)
    radii = _uniform(g_class, 0.35, 1.0, classes, vertices_max)
    foreground = palette[torch.randint(0, 8, (classes,), generator=g_class)]
    background = palette[torch.randint(0, 8, (classes,), generator=g_class)] * 0.6
    grid = _grid(side)
    out = []
    n = classes * per_class
    for start in range(0, n, _CHUNK):
        idx = torch.arange(start, min(n, start + _CHUNK)) // per_class
        b = len(idx)
        v = vertices[idx].float().view(-1, 1)
        rotation = _uniform(g_image, -0.5, 0.5, b).view(-1, 1)
        scale = _uniform(g_image, 0.45, 0.75, b).view(-1, 1)
        centre = _uniform(g_image, -0.2, 0.2, b, 1, 2)
        rel = grid.unsqueeze(0) - centre  # [b, HW, 2]
        rho = rel.norm(dim=-1)
        alpha = torch.remainder(torch.atan2(rel[..., 1], rel[..., 0]) - rotation, 2 * math.pi)
        # star-shaped outline: radius interpolated linearly between the class's vertex radii
        position = alpha / (2 * math.pi) * v
        lower = position.floor().long()
        frac = position - lower
        r = radii[idx] + 0.05 * torch.randn(b, vertices_max, generator=g_image)
        lower_r = r.gather(1, torch.remainder(lower, v.long()))
        upper_r = r.gather(1, torch.remainder(lower + 1, v.long()))
        outline = (lower_r * (1 - frac) + upper_r * frac) * scale
        inside = torch.sigmoid((outline - rho) / 0.03).unsqueeze(1)  # [b, 1, HW]
        fg = (foreground[idx] + 0.08 * torch.randn(b, 3, generator=g_image)).unsqueeze(-1)
        bg = (background[idx] + 0.08 * torch.randn(b, 3, generator=g_image)).unsqueeze(-1)
        image = inside * fg + (1 - inside) * bg + 0.06 * torch.randn(b, 3, side * side, generator=g_image)
        out.append(image.view(b, 3, side, side))
    return torch.cat(out)


_RENDERERS = {"glyphs": _glyphs, "textures": _textures, "shapes": _shapes}


def generate_store(
    mode: str,
    split: str,
    seed: int = 0,
    side: int = SYNTHETIC_SIDE,
    classes: int | None = None,
    images_per_class: int = IMAGES_PER_CLASS,
) -> ImageStore:
    """Generate the store of a synthetic ``mode`` for ``split`` (deterministic in ``seed``)."""
    if mode not in _RENDERERS:
        raise ValueError(f"unknown synthetic mode {mode!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    classes = SYNTHETIC_CLASSES[split] if classes is None else classes
    g_class = torch.Generator().manual_seed(_seed(mode, split, seed, "classes"))
    g_image = torch.Generator().manual_seed(_seed(mode, split, seed, "images"))
    g_mode = torch.Generator().manual_seed(_seed(mode, "all-splits", seed, "palette"))  # the same in every split
    images = _RENDERERS[mode](classes, images_per_class, side, g_class, g_image, g_mode)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    per_class = images.view(classes, images_per_class, *images.shape[1:])
    names = [f"{mode}-{split}-{c:04d}" for c in range(classes)]
    info = {"source": "synthetic", "generator_version": GENERATOR_VERSIONS[mode], "seed": seed}
    return ImageStore.from_class_arrays(list(per_class), names, mode, split, info)


def _cached(directory: Path, mode: str) -> ImageStore | None:
    """The store cached in ``directory`` by this generator version of ``mode``, or None (absent, damaged or older)."""
    if not (directory / "manifest.json").is_file():
        return None
    try:
        store = ImageStore.load(directory)
    except KMLError:  # a damaged cache of generated images: generate them again
        return None
    return store if store.info.get("generator_version") == GENERATOR_VERSIONS[mode] else None


def load_synthetic(mode: str, split: str, root: str | os.PathLike | None = None, seed: int = 0) -> ImageStore:
    """The synthetic store, generated once and cached under ``root`` (in memory only when ``root`` is None)."""
    if root is None:
        return generate_store(mode, split, seed)
    directory = cache_dir(root, mode if seed == 0 else f"{mode}-seed{seed}", split)
    store = _cached(directory, mode)  # a complete cache is read without the lock: a read-only data root works
    if store is not None:
        return store
    with locked(directory):  # the ranks of a torchrun job: one generates, the others load its cache
        store = _cached(directory, mode)
        if store is not None:
            return store
        store = generate_store(mode, split, seed)
        store.save(directory)
    return store
