"""Task transference of your own learner: does a meta-update on one mode's task help another mode's task?

    python examples/transference_custom_learner.py            # train briefly, analyse 10 meta-batches
    python examples/transference_custom_learner.py --tiny     # a few steps (what the test suite runs)

``Z(i->j) = 1 - L_j(Theta - eta * grad L_i(Theta)) / L_j(Theta)`` for every pair of tasks in a meta-batch
(kml.transference). The analyzer only needs a learner that maps an episode to per-task query losses
(``learner(episode).task_loss``), so it works on any ``kml.MAML`` / ``kml.ProtoNet`` of any model. Writes the
mode-by-mode mean of Z as a CSV table and a heatmap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import kml
from kml.transference import result_rows
from kml.transference.aggregate import mode_matrix
from kml.transference.plots import heatmap


def small_cnn(ways: int) -> nn.Module:
    """Images [B, 3, 28, 28] -> logits [B, ways]."""
    block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]  # noqa: E731
    return nn.Sequential(*block(3, 16), *block(16, 16), *block(16, 16), nn.Flatten(), nn.Linear(16 * 3 * 3, ways))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a few steps at a small size (what the test suite runs)")
    parser.add_argument("--data-root", default="data", help="where the synthetic modes are generated and cached")
    parser.add_argument("--out", default="train_dir/transference-example", help="folder for the table and the heatmap")
    args = parser.parse_args()
    steps, batches = (3, 2) if args.tiny else (200, 10)
    torch.manual_seed(0)

    modes = ["glyphs", "textures", "shapes"]
    sampler = kml.MixtureSampler(
        kml.load_stores(modes, "train", args.data_root, 28), ways=5, shots=1, queries=5, meta_batch=6, seed=0
    )
    learner = kml.MAML(
        kml.modulate(small_cnn(5), "kml", encoder_channels=8), inner_lr=0.1, inner_steps=1, first_order=True
    )
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        learner(sampler.sample()).loss.backward()
        optimizer.step()

    rows = []
    for batch in range(batches):  # Z for every ordered pair of tasks in each meta-batch
        result = kml.task_transference(learner, sampler.sample(), rate=1e-3)
        rows += result_rows(result, step=steps, batch=batch, include_self=False)

    import pandas as pd

    records = pd.DataFrame(rows)
    matrix = mode_matrix(records, modes=modes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    matrix.to_csv(out / "mode_matrix.csv")
    heatmap(records, title="mean Z(source -> target)").savefig(out / "heatmap.png", dpi=100)
    print(matrix.round(4).to_string())
    print(f"wrote {out / 'mode_matrix.csv'} and {out / 'heatmap.png'}")


if __name__ == "__main__":
    main()
