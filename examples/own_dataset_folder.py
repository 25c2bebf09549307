"""Meta-train on your own image folder, ``root/<class>/<image>.png``, then evaluate on held-out classes.

Any folder of class folders is a kml mode: ``folder:PATH``. It is converted once into a cached store under
the data root (images squashed to 84x84; grey stays grey unless any image is colour) and its classes are
split 70 / 15 / 15 % into meta-train / meta-val / meta-test (a folder laid out as
``root/train|val|test/<class>/`` keeps its own split). Tasks then draw N of a split's classes.

    python examples/own_dataset_folder.py --folder ~/my_images      # your folder
    python examples/own_dataset_folder.py                           # a generated demo folder (a few minutes on a CPU)
    python examples/own_dataset_folder.py --tiny                    # seconds: the smoke test

The same run from the command line: ``kml-train --modes folder:~/my_images``, ``kml-eval --checkpoint ...``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kml.runtime import configure_threads

configure_threads()  # before torch loads: one thread per CPU this process may use

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from kml.config import LearnerConfig  # noqa: E402
from kml.config.run import RunConfig  # noqa: E402
from kml.data.modes import load_stores  # noqa: E402
from kml.evaluation import average, evaluate  # noqa: E402
from kml.training.trainer import Trainer  # noqa: E402


def write_demo_folder(root: Path, classes: int, per_class: int, side: int, seed: int = 0) -> Path:
    """A folder of ``classes`` class folders of ``per_class`` PNGs: each class a coloured blob pattern.

    An image is its class's two random ellipses (colour, position, size) jittered a little, on noise.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for c in range(classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        blobs = [(rng.uniform(0.25, 0.75, 2), rng.uniform(0.08, 0.25, 2), rng.uniform(0, 255, 3)) for _ in range(2)]
        for i in range(per_class):
            image = rng.uniform(0, 60, (side, side, 3))
            for centre, radius, colour in blobs:
                cy, cx = centre + rng.normal(0, 0.04, 2)
                inside = ((yy - cy) / radius[0]) ** 2 + ((xx - cx) / radius[1]) ** 2 < 1
                image[inside] = colour + rng.normal(0, 15, 3)
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--folder", type=Path, help="your image folder root/<class>/*.png (default: generate a demo one)"
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="where the converted store is cached (default: data, or a temp folder for the demo folder)",
    )
    parser.add_argument("--train-dir", default="train_dir", help="where the run folder is written")
    parser.add_argument("--steps", type=int, default=300, help="outer (meta-training) steps")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="a few steps on a tiny generated folder (the smoke test)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kml-folder-") as scratch:
        scratch = Path(scratch)
        demo = args.folder is None
        if demo:  # 20 classes -> 14 / 3 / 3 train / val / test classes
            classes, per_class, side = (20, 6, 24) if args.tiny else (60, 20, 48)
            args.folder = write_demo_folder(scratch / "my_images", classes, per_class, side)
            print(f"wrote a demo folder of {classes} classes x {per_class} images at {args.folder}")
        # your folder's cache is kept (the checkpoint names it, for kml-eval); the demo's goes with the temp folder
        data_root = args.data_root or (str(scratch / "data") if demo else "data")
        ways, shots, queries = (3, 1, 2) if args.tiny else (args.ways, args.shots, 5)
        steps = 4 if args.tiny else args.steps
        config = RunConfig(
            modes=[f"folder:{args.folder}"],
            ways=ways,
            shots=shots,
            queries=queries,
            meta_batch=2 if args.tiny else 4,
            steps=steps,
            image_size=16 if args.tiny else 32,  # folder stores are 84x84; conformed once to this size at load
            data_root=data_root,
            train_dir=args.train_dir,
            run_name="own_folder",
            device="auto",
            val_every=steps,
            val_episodes=4 if args.tiny else 100,
            checkpoint_every=steps,
            log_every=2 if args.tiny else 50,
            learner=LearnerConfig(
                algorithm="maml",
                modulation="kml",
                base_channels=4 if args.tiny else 32,
                encoder_channels=4 if args.tiny else 32,
                inner_steps=1 if args.tiny else 5,
                eval_inner_steps=1 if args.tiny else 5,
            ),
        )
        trainer = Trainer.create(config, overwrite=True, progress=not args.tiny)
        checkpoint = trainer.fit()
        print(f"trained {trainer.step} steps; checkpoint {checkpoint}")

        # Meta-test: classes the learner never saw, a fixed set of seeded episodes (what kml-eval runs).
        config = trainer.config  # resolved: the image size the run trained at
        test_stores = load_stores(config.modes, "test", data_root, config.image_size, 3, trainer.device)
        results = evaluate(
            trainer.learner, test_stores, ways, shots, queries, episodes=6 if args.tiny else 300, progress=False
        )
        summary = average(results)
        print(
            f"{ways}-way {shots}-shot on {test_stores[0].num_classes} held-out classes: "
            f"{summary.accuracy:.1f}% +- {summary.ci95:.1f} (chance {100 / ways:.0f}%)"
        )
        if not demo:
            print(f"evaluate it again: kml-eval --checkpoint {checkpoint} --data-root {data_root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
