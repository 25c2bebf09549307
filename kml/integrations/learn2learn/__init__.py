"""kml inside the learn2learn ecosystem, and learn2learn's data inside kml.

learn2learn is optional: it is imported inside the functions that need it, and
a missing or broken install raises a one-line :class:`~kml.errors.KMLError`
with the install command (``python -m kml.integrations.install_learn2learn``,
which rebuilds learn2learn 0.2.0 for current Python).

learn2learn data as kml data
    :func:`store_from_dataset` turns a learn2learn dataset (a ``MetaDataset``,
    the ``.dataset`` of a ``Taskset``, or any dataset of ``(image, label)``
    pairs) into a kml :class:`~kml.data.store.ImageStore`, one mode and split;
    :func:`stores_from_tasksets` does the three splits of a learn2learn
    benchmark (``learn2learn.vision.benchmarks.get_tasksets(...)``), and
    :func:`export_folder` writes stores as an image folder, so that the data
    is a named kml mode (``folder:PATH``) for ``kml-train``, the trainer and
    evaluation. kml's samplers then draw the tasks.
    :class:`TasksetSampler` instead lets learn2learn draw the tasks (with all
    its task transforms) and hands them to kml learners as
    :class:`~kml.data.episode.Episode` meta-batches.
    :func:`dataset_from_store` goes the other way: a kml store as a learn2learn
    ``MetaDataset``.

kml models inside learn2learn
    :class:`ModulatedBackbone` is a kml backbone with one task's modulation
    fixed: an ``nn.Module`` mapping images to logits whose only parameters are
    the backbone's, so ``learn2learn.algorithms.MAML`` can ``clone()`` and
    ``adapt()`` it. :func:`task_module` builds it from a learner and a support
    set; :func:`maml_forward` runs a whole kml meta-batch through
    learn2learn's MAML (its per-task clone/adapt loop) and returns the same
    :class:`~kml.algorithms.LearnerOutput` as the learner's own batched forward.

kml episodes in learn2learn's form
    :func:`episode_to_tasks` gives per task ``((support_x, support_y),
    (query_x, query_y))``, what ``learn2learn.data.partition_task`` returns;
    :func:`episode_to_batches` gives per task the concatenated ``(data,
    labels)`` a learn2learn ``Taskset`` yields, with a support mask, in the
    layout ``partition_task`` splits or the interleaved one of learn2learn's
    example scripts (support at even positions); :func:`episode_from_tasks`
    reads such tasks back.

Layout: :mod:`~kml.integrations.learn2learn.library` (the import), :mod:`~kml.integrations.learn2learn.stores`
(learn2learn datasets <-> kml stores), :mod:`~kml.integrations.learn2learn.episodes` (learn2learn tasks <->
kml episodes) and :mod:`~kml.integrations.learn2learn.maml` (kml models in learn2learn's MAML); every
public name is importable from here.
"""

from __future__ import annotations

from kml.integrations.learn2learn.episodes import (
    TasksetSampler,
    episode_from_tasks,
    episode_to_batches,
    episode_to_tasks,
)
from kml.integrations.learn2learn.library import INSTALL_COMMAND, require_learn2learn
from kml.integrations.learn2learn.maml import ModulatedBackbone, maml_forward, task_module
from kml.integrations.learn2learn.stores import (
    SPLIT_NAMES,
    dataset_from_store,
    export_folder,
    store_from_dataset,
    stores_from_tasksets,
    taskset_from_store,
)

__all__ = [
    "dataset_from_store",
    "episode_from_tasks",
    "episode_to_batches",
    "episode_to_tasks",
    "export_folder",
    "INSTALL_COMMAND",
    "maml_forward",
    "ModulatedBackbone",
    "require_learn2learn",
    "SPLIT_NAMES",
    "store_from_dataset",
    "stores_from_tasksets",
    "task_module",
    "taskset_from_store",
    "TasksetSampler",
]
