"""Meta-learners, batched over the tasks of an episode.

* :class:`MAML` and :class:`ProtoNet` (:mod:`kml.algorithms.maml`, :mod:`kml.algorithms.protonet`): any
  ``nn.Module``, with ``torch.func`` (``functional_call``, ``grad``, ``vmap``);
* :class:`MetaLearner` (:mod:`kml.algorithms.learner`): kml's own networks from a :class:`kml.config.LearnerConfig`
  (every paper method, ``build_learner(config)``), with the task-packed fast path.
"""

from kml.algorithms.learner import LearnerOutput, MetaLearner, build_learner
from kml.algorithms.maml import MAML
from kml.algorithms.protonet import ProtoNet

__all__ = ["MAML", "LearnerOutput", "MetaLearner", "ProtoNet", "build_learner"]
