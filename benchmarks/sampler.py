"""Episode sampling throughput: kml's device-side sampler vs a published-style DataLoader.

The reference follows the published MMAML/KML data pipelines: a torch
DataLoader whose batch sampler picks N classes and K+Q images per class, and a
Dataset that opens, decodes and transforms one JPEG with PIL per
``__getitem__``. Both read the same images (synthetic classes written as
84x84 JPEG files for the reference, a cached uint8 store for kml).

    python benchmarks/sampler.py            # published setup: 5-way 1-shot 15-query, 84x84x3, meta-batch 10
    python benchmarks/sampler.py --smoke    # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 - kml's thread policy, before torch loads
import torch
from published_style import task_loader

from kml.data.sampler import MixtureSampler
from kml.data.synthetic import generate_store
from kml.runtime import tune_cpu_allocator


def bench_reference(store, args, folder: Path) -> float:
    per_class = args.shots + args.queries
    loader = task_loader(
        store, folder, args.ways, args.shots, args.queries, args.meta_batches * args.meta_batch, args.side, args.workers
    )
    start = time.perf_counter()
    drawn = 0
    meta_batch = []
    for images, _ in loader:  # one task per loader batch; stack meta_batch of them as the published loop does
        meta_batch.append(images.view(args.ways, per_class, *images.shape[1:]))
        if len(meta_batch) == args.meta_batch:
            torch.stack(meta_batch)
            meta_batch = []
            drawn += args.meta_batch
    return drawn / (time.perf_counter() - start)


def bench_kml(store, args, dtype: torch.dtype) -> float:
    sampler = MixtureSampler(
        [store.to(args.device)], args.ways, args.shots, args.queries, args.meta_batch, seed=0, dtype=dtype
    )
    sampler.sample()  # warm-up
    batches = args.meta_batches * 20
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        episode = sampler.sample()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    del episode
    return batches * args.meta_batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=10)
    parser.add_argument("--side", type=int, default=84, help="image side length")
    parser.add_argument(
        "--classes", type=int, default=64, help="classes in the benchmark split (mini-ImageNet train: 64)"
    )
    parser.add_argument(
        "--meta-batches", type=int, default=20, help="meta-batches timed for the reference (kml: 20x more)"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI")
    args = parser.parse_args()
    tune_cpu_allocator()  # as kml-train does
    if args.smoke:
        args.classes, args.meta_batches, args.workers = 8, 2, 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    store = generate_store("shapes", "train", classes=args.classes).conformed(args.side, 3)
    with tempfile.TemporaryDirectory() as folder:
        reference = bench_reference(store, args, Path(folder))
    ours = bench_kml(store, args, torch.float32)
    raw = bench_kml(store, args, torch.uint8)
    print(
        f"setup: {args.ways}-way {args.shots}-shot {args.queries}-query, {args.side}x{args.side}x3, "
        f"meta-batch {args.meta_batch}, device {args.device}, reference workers {args.workers}"
    )
    print(f"{'sampler':<30}{'tasks/s':>12}{'meta-batches/s':>16}")
    print(f"{'reference (DataLoader + PIL)':<30}{reference:>12.1f}{reference / args.meta_batch:>16.2f}")
    print(f"{'kml, float32 episodes':<30}{ours:>12.1f}{ours / args.meta_batch:>16.2f}")
    print(f"{'kml, uint8 episodes':<30}{raw:>12.1f}{raw / args.meta_batch:>16.2f}")
    print(f"ratio kml / reference: float32 {ours / reference:.1f}x, uint8 {raw / reference:.1f}x")


if __name__ == "__main__":
    main()
