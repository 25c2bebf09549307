"""Meta-learning methods, each written once over any ``nn.Module`` and batched over the tasks of an episode.

* :class:`MAML` and :class:`ProtoNet` (:mod:`kml.algorithms.maml`, :mod:`kml.algorithms.protonet`): the methods;
* :mod:`kml.algorithms.backends`: how the tasks of a meta-batch run (kml's packed layout, or ``vmap``);
* :func:`build_learner` (:mod:`kml.algorithms.learner`): every paper method from a :class:`kml.config.LearnerConfig`;
* :mod:`kml.algorithms.contract`: :class:`LearnerOutput` and the :class:`Learner` protocol;
* :mod:`kml.algorithms.reference`: the per-task loops the tests hold every backend to.
"""

from kml.algorithms.contract import Learner, LearnerOutput
from kml.algorithms.learner import build_learner
from kml.algorithms.maml import MAML
from kml.algorithms.protonet import ProtoNet

__all__ = ["MAML", "Learner", "LearnerOutput", "ProtoNet", "build_learner"]
