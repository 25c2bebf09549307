"""Task-level transference: how a meta-update on one task changes the loss on another.

``Z(i->j) = 1 - L_j(Theta + Delta_i) / L_j(Theta)``, where ``L`` is a task's post-adaptation query loss (inner
loop included) and ``Delta_i`` one outer step on task i's meta-gradient alone: plain SGD
(``-eta * grad L_i``) or the training optimiser's own next update from its state. ``Z > 0``: a step on task i
helps task j; ``Z < 0``: it hurts. The paper's ratio is ``LR = 1 - Z``.

- :mod:`kml.transference.analyzer`: Z for all pairs of tasks (batched), with diagnostics per pair;
- :mod:`kml.transference.lookahead`: the lookahead step (SGD, or Adam/AdamW/SGD from the optimiser's state);
- :mod:`kml.transference.diagnostics`: the linearisation check (Z against its first-order prediction);
- :mod:`kml.transference.stats`: t intervals and paired tests (standard library only);
- :mod:`kml.transference.aggregate`: tidy tables and mode-by-mode matrices with 95% intervals (pandas);
- :mod:`kml.transference.compare`: two runs compared pair by pair on identical episodes;
- :mod:`kml.transference.plots`: heatmaps, curves, histograms, the paper's LR figure (matplotlib);
- :mod:`kml.transference.recorder`: recording during training;
- :mod:`kml.transference.offline`: analysing saved checkpoints (the mixed and the paper's design);
- :mod:`kml.transference.runs`: finding runs and their checkpoints from any working directory;
- :mod:`kml.transference.outputs`: a table's figures and summary written beside it.
"""

from kml.transference.analyzer import PARAMETER_GROUPS, TransferenceResult, result_rows, task_transference
from kml.transference.lookahead import optimizer_lookahead

__all__ = ["PARAMETER_GROUPS", "TransferenceResult", "optimizer_lookahead", "result_rows", "task_transference"]
