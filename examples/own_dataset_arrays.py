"""Meta-train on datasets held in memory as arrays: uint8 images and one integer label per image.

``ImageStore.from_arrays(images, labels, mode=..., split=...)`` takes images ``[n, H, W, C]``, ``[n, C, H, W]``
or ``[n, H, W]`` (grey) and any integer labels, groups them by class and returns the store the samplers
read; nothing is written to disk. Few-shot learning is tested on *classes* never seen in training, so the
classes (not the images) are split into meta-train / meta-val / meta-test, one store each.

This script builds two such datasets (stand-ins for your own arrays: replace ``make_stripes`` /
``make_dots`` with e.g. ``np.load``), mixes them with :class:`MixtureSampler`, meta-trains KML + MAML with a
plain PyTorch loop and evaluates on the held-out classes of each dataset.

    python examples/own_dataset_arrays.py          # a few minutes on a CPU
    python examples/own_dataset_arrays.py --tiny   # seconds: the smoke test
"""

from __future__ import annotations

import argparse

from kml.runtime import configure_threads

configure_threads()  # before torch loads: one thread per CPU this process may use

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kml.algorithms.learner import build_learner  # noqa: E402
from kml.config import LearnerConfig  # noqa: E402
from kml.data.sampler import MixtureSampler  # noqa: E402
from kml.data.store import ImageStore  # noqa: E402
from kml.evaluation import average, evaluate  # noqa: E402


def make_stripes(classes: int, per_class: int, side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB gratings, channels last: images uint8 ``[classes * per_class, side, side, 3]``, labels ``[...]`` (shuffled)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    images, labels = [], []
    for c in range(classes):
        angle, frequency, colour = rng.uniform(0, np.pi), rng.uniform(2, 6), rng.uniform(0, 1, 3)
        for _ in range(per_class):
            a = angle + rng.normal(0, 0.1)
            wave = np.sin(2 * np.pi * frequency * (xx * np.cos(a) + yy * np.sin(a)) + rng.uniform(0, 2 * np.pi))
            image = (0.5 + 0.5 * wave)[..., None] * colour + rng.normal(0, 0.05, (side, side, 3))
            images.append((image.clip(0, 1) * 255).astype(np.uint8))
            labels.append(c)
    order = rng.permutation(len(labels))  # arrays need not be grouped by class
    return np.stack(images)[order], np.array(labels)[order]


def make_dots(classes: int, per_class: int, side: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Grey dot patterns: images uint8 ``[classes * per_class, side, side]``, labels ``[...]`` (1000 + class)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    images, labels = [], []
    for c in range(classes):
        dots = rng.uniform(0.2, 0.8, (rng.integers(2, 5), 2))
        for _ in range(per_class):
            image = rng.uniform(0, 0.2, (side, side))
            for cy, cx in dots + rng.normal(0, 0.03, dots.shape):
                image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.004)
            images.append((image.clip(0, 1) * 255).astype(np.uint8))
            labels.append(1000 + c)  # any integers will do
    return np.stack(images), np.array(labels)


def split_by_class(
    images: np.ndarray,
    labels: np.ndarray,
    mode: str,
    side: int,
    fractions: tuple[float, float] = (0.7, 0.15),
    seed: int = 0,
) -> dict[str, ImageStore]:
    """One store per split, the classes (not the images) shuffled and cut by ``fractions`` (the rest: test).

    Every store is brought to ``side`` x ``side`` RGB (``conformed``): the modes of a mixture share one shape.
    """
    classes = np.random.default_rng(seed).permutation(np.unique(labels))
    cut = np.cumsum([round(f * len(classes)) for f in fractions])
    parts = {"train": classes[: cut[0]], "val": classes[cut[0] : cut[1]], "test": classes[cut[1] :]}
    stores = {}
    for split, chosen in parts.items():
        keep = np.isin(labels, chosen)
        stores[split] = ImageStore.from_arrays(images[keep], labels[keep], mode=mode, split=split).conformed(side, 3)
    return stores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="outer (meta-training) steps")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a few steps on tiny arrays (the smoke test)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # 1. Your arrays -> one store per split and dataset (mode).
    classes, per_class, side = (20, 6, 16) if args.tiny else (60, 20, 32)
    datasets = {
        "stripes": make_stripes(classes, per_class, side),  # [n, H, W, 3]
        "dots": make_dots(classes, per_class, side),  # [n, H, W]
    }
    stores = {mode: split_by_class(images, labels, mode, side) for mode, (images, labels) in datasets.items()}
    for mode, split_stores in stores.items():
        print(mode, {split: store.num_classes for split, store in split_stores.items()}, "classes per split")
    modes = list(stores)
    train = [stores[mode]["train"].to(args.device) for mode in modes]
    test = [stores[mode]["test"].to(args.device) for mode in modes]

    # 2. Episodes: every meta-batch mixes tasks of both modes (Episode.mode says which).
    ways, shots, queries = (3, 1, 2) if args.tiny else (args.ways, args.shots, 5)
    sampler = MixtureSampler(train, ways, shots, queries, meta_batch=2 if args.tiny else 4, seed=0, dtype=torch.uint8)

    # 3. A learner: KML-modulated MAML, sized for these images.
    config = LearnerConfig(
        algorithm="maml",
        modulation="kml",
        num_modes=len(modes),
        ways=ways,
        in_channels=3,
        image_size=side,
        base_channels=4 if args.tiny else 32,
        encoder_channels=4 if args.tiny else 32,
        inner_steps=1 if args.tiny else 5,
        eval_inner_steps=1 if args.tiny else 5,
    )
    learner = build_learner(config).to(args.device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

    # 4. Meta-train: one outer step per meta-batch.
    steps = 3 if args.tiny else args.steps
    learner.train()
    for step in range(1, steps + 1):
        episode = sampler.sample().to_float()  # uint8 -> float in [0, 1] next to the learner
        output = learner(episode)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        if step % max(1, steps // 10) == 0 or step == steps:
            print(
                f"step {step}: loss {output.loss.item():.3f}, accuracy {100 * output.task_accuracy.mean().item():.1f}%"
            )

    # 5. Meta-test on classes never trained on: fixed seeded episodes per mode.
    results = evaluate(learner, test, ways, shots, queries, episodes=4 if args.tiny else 300, progress=False)
    for result in [*results, average(results)]:
        print(f"{result.mode:>8s} {result.accuracy:5.1f}% +- {result.ci95:.1f}  (chance {100 / ways:.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
