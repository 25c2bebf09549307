"""Meta-learners: MAML-style inner loops and prototypical heads over one shared task model.

``build_learner(config)`` is the one entry point; every paper method is a
:class:`kml.config.LearnerConfig` (see its module docstring for the table).
"""

from kml.algorithms.learner import LearnerOutput, MetaLearner, build_learner

__all__ = ["LearnerOutput", "MetaLearner", "build_learner"]
