"""Your own model, meta-trained by kml: MAML with Kernel ModuLation on any CNN.

    python examples/own_model.py                # ResNet-12-like user network, 500 steps on the synthetic modes
    python examples/own_model.py --tiny         # a few steps (what the test suite runs)

``kml.modulate(model, "kml")`` puts a task encoder and a KML generator on every conv layer of ``model``
(identity at the start, so the modulated model begins as ``model``); ``kml.MAML`` meta-learns it with
every task of a meta-batch adapted at once; ``kml.Trainer`` runs the loop with checkpoints, exact resume
(run it again with ``--resume``), Ctrl-C safety, metrics.csv and validation.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import kml


class MyBlock(nn.Module):
    """A residual block as a user would write it: [B, cin, H, W] -> [B, cout, H/2, W/2]."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.body(x) + self.skip(x)))


class MyNet(nn.Module):
    """Images [B, 3, H, W] -> logits [B, ways]."""

    def __init__(self, ways: int, width: int = 32) -> None:
        super().__init__()
        self.blocks = nn.Sequential(MyBlock(3, width), MyBlock(width, 2 * width), MyBlock(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(dim=(2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a few steps at a small size (what the test suite runs)")
    parser.add_argument("--data-root", default="data", help="where the synthetic modes are generated and cached")
    parser.add_argument("--run-dir", default="train_dir/own-model", help="the run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    args = parser.parse_args()
    steps, width, side = (4, 8, 16) if args.tiny else (500, 32, 28)
    torch.manual_seed(0)

    modes = ["glyphs", "textures", "shapes"]
    sampler = kml.MixtureSampler(
        kml.load_stores(modes, "train", args.data_root, side), ways=5, shots=1, queries=5, meta_batch=4, seed=0
    )
    learner = kml.MAML(
        kml.modulate(MyNet(ways=5, width=width), "kml", encoder_channels=width // 2), inner_lr=0.05, inner_steps=2
    )
    trainer = kml.Trainer(
        learner,
        sampler,
        torch.optim.Adam(learner.parameters(), lr=1e-3),
        run_dir=args.run_dir,
        val_stores=kml.load_stores(modes, "val", args.data_root, side),
        steps=steps,
        val_every=max(2, steps // 5),
        val_episodes=10 if args.tiny else 100,
        checkpoint_every=max(2, steps // 5),
        log_every=1 if args.tiny else 25,
        resume=args.resume,
        overwrite=not args.resume,
        progress=not args.tiny,
    )
    print(f"checkpoint: {trainer.fit()}")
    results = kml.evaluate(
        learner,
        kml.load_stores(modes, "test", args.data_root, side),
        ways=5,
        shots=1,
        queries=5,
        episodes=10 if args.tiny else 300,
        progress=False,
    )
    for result in results:
        print(f"{result.mode}: {result.accuracy:.2f} ± {result.ci95:.2f} %")


if __name__ == "__main__":
    main()
