"""Your own training loop: kml's sampler and learner, your optimizer, schedule and logging.

    python examples/own_training_loop.py            # 300 outer steps on the synthetic modes (no download)
    python examples/own_training_loop.py --tiny     # a few steps (what the test suite runs)

A learner is an ordinary ``nn.Module``: ``learner(episode).loss`` is the meta-batch's mean query loss after
each task's inner loop, differentiable with respect to every meta-parameter, so any optimizer, schedule,
gradient accumulation or logging fits around it.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import kml


def feature_extractor() -> nn.Module:
    """Images [B, 3, 28, 28] -> features [B, 64]."""
    block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]  # noqa: E731
    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a few steps at a small size (what the test suite runs)")
    parser.add_argument("--data-root", default="data", help="where the synthetic modes are generated and cached")
    args = parser.parse_args()
    steps, episodes = (5, 10) if args.tiny else (300, 200)
    torch.manual_seed(0)

    modes = ["glyphs", "textures", "shapes"]
    sampler = kml.MixtureSampler(
        kml.load_stores(modes, "train", args.data_root, 28), ways=5, shots=1, queries=5, meta_batch=4, seed=0
    )
    learner = kml.ProtoNet(kml.modulate(feature_extractor(), "film", encoder_channels=8))  # MProtoNet on your network
    optimizer = torch.optim.AdamW(learner.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    for step in range(1, steps + 1):
        episode = sampler.sample()  # a float Episode: support_x [T, N*K, C, H, W], ...
        output = learner(episode)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 5) == 0:
            print(f"step {step}: loss {output.loss.item():.3f}, accuracy {output.task_accuracy.mean().item():.2%}")

    results = kml.evaluate(
        learner,
        kml.load_stores(modes, "test", args.data_root, 28),
        ways=5,
        shots=1,
        queries=5,
        episodes=episodes,
        progress=False,
    )
    for result in results:
        print(f"{result.mode}: {result.accuracy:.2f} ± {result.ci95:.2f} %")


if __name__ == "__main__":
    main()
