"""Pictures of episodes: what a learner is shown in one task.

matplotlib is imported inside the functions only, so that ``import kml.data.plots`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kml.data.episode import Episode
from kml.data.modes import mode_label
from kml.errors import KMLError

__all__ = ["plot_episode"]

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure, SubFigure


def _as_pictures(images: torch.Tensor) -> Any:
    """``[n, C, H, W]`` uint8 or float in [0, 1] -> numpy ``[n, H, W, C]`` float in [0, 1] (C = 1 or 3)."""
    images = images.detach().cpu()
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    return images.permute(0, 2, 3, 1).numpy()


def plot_episode(
    episode: Episode,
    task: int = 0,
    max_classes: int | None = None,
    figure: Figure | SubFigure | None = None,
    image_inches: float = 0.9,
    title: str | None = None,
) -> Figure | SubFigure:
    """Draw one task of an episode as an image grid: one row per class, support images then query images.

    Args:
        episode: any :class:`~kml.data.episode.Episode` (uint8 or float images, grey or RGB, on any device).
        task: which task of the meta-batch to draw.
        max_classes: draw only the first ``max_classes`` labels (default: all N).
        figure: a matplotlib ``Figure`` (or ``SubFigure``) to draw into; by default a new
            ``matplotlib.figure.Figure`` is made, not registered with pyplot (no window, no
            global state: save it with ``fig.savefig(path)``; in Jupyter, show it with ``display(fig)``
            or as a cell's last expression).
        image_inches: size of one image in inches (for the default figure).
        title: the figure title (default: task, mode name and N-way K-shot).

    Row ``n`` is label ``n`` (the class ``episode.classes[task, n]`` of the task's mode store); the
    support images are on the left under "support", the query images on the right under "query".

    Returns:
        the figure drawn into.
    """
    if not -episode.num_tasks <= task < episode.num_tasks:
        raise KMLError(f"task {task} is out of range: the episode has {episode.num_tasks} tasks")
    task = task % episode.num_tasks
    ways, shots, queries = episode.ways, episode.shots, episode.queries
    rows = ways if max_classes is None else max(1, min(int(max_classes), ways))
    support_y, query_y = episode.support_y[task].cpu(), episode.query_y[task].cpu()
    support = _as_pictures(episode.support_x[task])
    query = _as_pictures(episode.query_x[task])
    support_of = [torch.nonzero(support_y == n).flatten().tolist() for n in range(rows)]
    query_of = [torch.nonzero(query_y == n).flatten().tolist() for n in range(rows)]
    classes = episode.classes[task].cpu().tolist()
    turns = episode.turns[task].cpu().tolist() if episode.turns is not None else None
    if figure is None:
        figure = _new_figure(image_inches, shots + queries + (0.4 if queries else 0), rows)
    groups = [("support", shots, support, support_of)] + ([("query", queries, query, query_of)] if queries else [])
    panels = figure.subfigures(
        1, len(groups), width_ratios=[count for _, count, _, _ in groups], wspace=0.04, squeeze=False
    )[0]
    for column, (name, count, pictures, members) in enumerate(groups):
        axes = _draw_panel(panels[column], name, rows, count, pictures, members)
        if column == 0:  # the row labels go left of the support images
            for n in range(rows):
                axes[n, 0].set_ylabel(_row_label(n, classes, turns), rotation=0, ha="right", va="center", fontsize=8)
    default_title = f"task {task}: {_mode_name(episode, task)}, {ways}-way {shots}-shot, {queries} queries per class"
    figure.suptitle(title if title is not None else default_title, fontsize=11)
    return figure


def _mode_name(episode: Episode, task: int) -> str:
    """The name of the task's mode (``mode <index>`` when the episode does not name it)."""
    mode_index = int(episode.mode[task])
    if not 0 <= mode_index < len(episode.mode_names):
        return f"mode {mode_index}"
    return mode_label(episode.mode_names[mode_index])  # a folder mode's short name, not its path


def _new_figure(image_inches: float, columns: float, rows: int) -> Figure:
    """A figure not registered with pyplot, sized for ``rows`` x ``columns`` images."""
    from matplotlib.figure import Figure

    return Figure(figsize=(image_inches * columns + 1.4, image_inches * rows + 0.9), layout="constrained")


def _draw_panel(
    panel: Figure | SubFigure, name: str, rows: int, count: int, pictures: Any, members: list[list[int]]
) -> Any:
    """Draw ``count`` images per row (``pictures[members[n]]`` in row n) under the title ``name``; return the axes."""
    panel.suptitle(name, fontsize=10)
    axes = panel.subplots(rows, count, squeeze=False)
    for n in range(rows):
        for k in range(count):
            ax = axes[n, k]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if k >= len(members[n]):
                continue
            picture = pictures[members[n][k]]
            if picture.shape[-1] == 1:
                ax.imshow(picture[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
            else:
                ax.imshow(picture)
    return axes


def _row_label(n: int, classes: list[int], turns: list[int] | None) -> str:
    """Row ``n``'s label: the kml label, the store class and any rotation."""
    label = f"label {n}\nclass {classes[n]}"
    if turns is not None and turns[n]:
        label += f"\n{90 * turns[n]}°"
    return label
