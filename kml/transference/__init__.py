"""Task-level transference: how a meta-update on one task changes the loss on another.

``Z(i->j) = 1 - L_j(Theta - eta * grad L_i(Theta)) / L_j(Theta)``, where ``L``
is a task's post-adaptation query loss (inner loop included). ``Z > 0``: a
step on task i helps task j; ``Z < 0``: it hurts. The paper's ratio is
``LR = 1 - Z``.

- :mod:`kml.transference.analyzer`: computing Z for all pairs of tasks (batched);
- :mod:`kml.transference.aggregate`: tidy tables and mode-by-mode matrices (pandas);
- :mod:`kml.transference.plots`: heatmaps, curves, distributions (matplotlib);
- :mod:`kml.transference.recorder`: recording during training.
"""

from kml.transference.analyzer import PARAMETER_GROUPS, TransferenceResult, result_rows, task_transference

__all__ = ["PARAMETER_GROUPS", "TransferenceResult", "result_rows", "task_transference"]
