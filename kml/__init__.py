"""kml: multimodal few-shot meta-learning with Kernel ModuLation.

The public API, in the order data flows::

    stores = kml.load_stores(["glyphs", "textures"], "train", "data", 32)     # cached images per mode
    sampler = kml.MixtureSampler(stores, ways=5, shots=1, queries=15, meta_batch=4)
    learner = kml.MAML(kml.modulate(my_cnn, "kml"))                          # or kml.ProtoNet(...), kml.build_learner(config)
    kml.Trainer(learner, sampler, torch.optim.Adam(learner.parameters()), run_dir="train_dir/x").fit(1000)
    kml.evaluate(learner, test_stores, ways=5, shots=1, queries=15, episodes=600)

Importing ``kml`` is light: each name loads its module on first use (torch included), and the heavy
optional libraries (matplotlib, pandas, torchvision) load only in the functions that draw or tabulate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kml._lazy import lazy_exports
from kml._version import __version__
from kml.errors import KMLError

# public name -> the module that defines it
_LAZY = {
    # learners
    "MAML": "kml.algorithms.maml",
    "ProtoNet": "kml.algorithms.protonet",
    "Learner": "kml.algorithms.contract",
    "LearnerOutput": "kml.algorithms.contract",
    "build_learner": "kml.algorithms.learner",
    # models
    "modulate": "kml.models.modulate",
    "ModulatedModel": "kml.models.modulate",
    "TaskConditionedModel": "kml.models.modulate",
    "ResNet12": "kml.models.resnet12",
    "TaskEncoder": "kml.models.encoder",
    # configuration
    "LearnerConfig": "kml.config.learner",
    "RunConfig": "kml.config.run",
    "recipe": "kml.config.recipes",
    # data
    "Episode": "kml.data.episode",
    "EpisodeSampler": "kml.data.sampler",
    "MixtureSampler": "kml.data.sampler",
    "ImageStore": "kml.data.store",
    "load_stores": "kml.data.modes",
    "plot_episode": "kml.data.plots",
    # training and evaluation
    "Trainer": "kml.training.trainer",
    "evaluate": "kml.evaluation",
    "task_transference": "kml.transference.analyzer",
}

__all__ = ["KMLError", "__version__", *sorted(_LAZY)]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from kml.algorithms.contract import Learner, LearnerOutput
    from kml.algorithms.learner import build_learner
    from kml.algorithms.maml import MAML
    from kml.algorithms.protonet import ProtoNet
    from kml.config.learner import LearnerConfig
    from kml.config.recipes import recipe
    from kml.config.run import RunConfig
    from kml.data.episode import Episode
    from kml.data.modes import load_stores
    from kml.data.plots import plot_episode
    from kml.data.sampler import EpisodeSampler, MixtureSampler
    from kml.data.store import ImageStore
    from kml.evaluation import evaluate
    from kml.models.encoder import TaskEncoder
    from kml.models.modulate import ModulatedModel, TaskConditionedModel, modulate
    from kml.models.resnet12 import ResNet12
    from kml.training.trainer import Trainer
    from kml.transference.analyzer import task_transference


__getattr__ = lazy_exports(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
