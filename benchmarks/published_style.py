"""A KML training step written the way the published code is written, as the speed reference.

Per-task Python loop, a torch DataLoader that decodes one JPEG with PIL per
``__getitem__``, and a per-task modulated forward with ``F.conv2d``: task
encoder on the support set -> rank-1 kernel modulation per conv layer ->
4 stride-2 conv blocks with batch-statistics BatchNorm -> prototypes ->
squared Euclidean logits. Only the speed of this code is used; kml's own
learner is what is tested for correctness.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms


class FolderImages(Dataset):
    """Published style: one file opened, decoded and transformed per item."""

    def __init__(self, paths: list[Path], labels: list[int], side: int) -> None:
        self.paths, self.labels = paths, labels
        self.transform = transforms.Compose([transforms.Resize((side, side)), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(Image.open(self.paths[index]).convert("RGB")), self.labels[index]


class TaskBatches(Sampler):
    """Indices of one task (N classes x K+Q images, class-major) per loader batch."""

    def __init__(self, class_indices: list[list[int]], ways: int, per_class: int, tasks: int, seed: int = 0) -> None:
        self.class_indices, self.ways, self.per_class, self.tasks = class_indices, ways, per_class, tasks
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return self.tasks

    def __iter__(self):
        for _ in range(self.tasks):
            batch = []
            for c in self.rng.sample(range(len(self.class_indices)), self.ways):
                batch += self.rng.sample(self.class_indices[c], self.per_class)
            yield batch


def write_image_folder(store, folder: Path) -> tuple[list[Path], list[int], list[list[int]]]:
    """Write a kml store's images as JPEG files, one folder per class (what the published loaders read)."""
    paths, labels, class_indices = [], [], []
    for c in range(store.num_classes):
        class_indices.append([])
        for i, image in enumerate(store.class_images(c)):
            path = folder / f"c{c:04d}" / f"{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            array = image.permute(1, 2, 0).numpy()
            Image.fromarray(array if array.shape[2] == 3 else array[..., 0]).save(path, quality=95)
            class_indices[-1].append(len(paths))
            paths.append(path)
            labels.append(c)
    return paths, labels, class_indices


def task_loader(
    store, folder: Path, ways: int, shots: int, queries: int, tasks: int, side: int, workers: int
) -> DataLoader:
    paths, labels, class_indices = write_image_folder(store, folder)
    return DataLoader(
        FolderImages(paths, labels, side),
        batch_sampler=TaskBatches(class_indices, ways, shots + queries, tasks),
        num_workers=workers,
    )


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU())


class PublishedStyleKML(nn.Module):
    """KML + ProtoNet as the released code computes it: one task at a time."""

    def __init__(self, channels: int = 32, encoder_channels: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        widths = [in_channels, channels, 2 * channels, 4 * channels, 8 * channels]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.bn = nn.ModuleList()
        for cin, cout in zip(widths[:-1], widths[1:]):
            conv = nn.Conv2d(cin, cout, 3, 2, 1)
            self.weights.append(conv.weight)
            self.biases.append(conv.bias)
            self.bn.append(nn.BatchNorm2d(cout, track_running_stats=False))
        enc = [in_channels, encoder_channels, 2 * encoder_channels, 4 * encoder_channels, 8 * encoder_channels]
        self.encoder = nn.Sequential(*[conv_block(a, b) for a, b in zip(enc[:-1], enc[1:])])
        embedding = enc[-1]
        self.factor_out = nn.ModuleList(nn.Linear(embedding, cout) for cout in widths[1:])
        self.factor_in = nn.ModuleList(nn.Linear(embedding, cin * 9) for cin in widths[:-1])
        self.bias_shift = nn.ModuleList(nn.Linear(embedding, cout) for cout in widths[1:])

    def task_loss(self, support_x, support_y, query_x, query_y, ways: int):
        embedding = self.encoder(support_x).mean(dim=(0, 2, 3))

        def features(x):
            for layer, weight in enumerate(self.weights):
                v, u = self.factor_out[layer](embedding), self.factor_in[layer](embedding)
                modulated = weight * (1 + torch.outer(v, u).view_as(weight))
                x = F.conv2d(x, modulated, self.biases[layer] + self.bias_shift[layer](embedding), stride=2, padding=1)
                x = F.relu(self.bn[layer](x))
            return x.flatten(1)

        support, query = features(support_x), features(query_x)
        prototypes = torch.stack([support[support_y == c].mean(0) for c in range(ways)])
        logits = -torch.cdist(query, prototypes).pow(2)
        loss = F.cross_entropy(logits, query_y)
        accuracy = (logits.argmax(1) == query_y).float().mean()
        return loss, accuracy


def published_style_step(
    model, optimizer, tasks: list[tuple[torch.Tensor, torch.Tensor]], ways: int, shots: int, device
) -> float:
    """One outer step over a meta-batch: a Python loop over tasks, loss summed, one Adam step."""
    optimizer.zero_grad()
    total = 0.0
    for images, _ in tasks:
        images = images.to(device).view(ways, -1, *images.shape[1:])
        support_x = images[:, :shots].reshape(-1, *images.shape[2:])
        query_x = images[:, shots:].reshape(-1, *images.shape[2:])
        support_y = torch.arange(ways, device=device).repeat_interleave(shots)
        query_y = torch.arange(ways, device=device).repeat_interleave(images.shape[1] - shots)
        loss, accuracy = model.task_loss(support_x, support_y, query_x, query_y, ways)
        (loss / len(tasks)).backward()
        total += loss.item() / len(tasks)  # the published loop logs every task's loss with .item()
        accuracy.item()
    optimizer.step()
    return total
