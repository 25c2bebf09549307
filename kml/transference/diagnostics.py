"""Is a transference measurement in the linear regime? The check behind the warning of kml-transference.

To first order ``L_j(Theta + Delta_i) = L_j + <g_j, Delta_i>``, so ``Z(i->j) ~ Z_linear = -<g_j, Delta_i> / L_j``
(``eta <g_i, g_j> / L_j`` for the SGD lookahead). The rest, ``Z - Z_linear``, is curvature: of order
``|Delta_i|^2`` while ``Z_linear`` is of order ``|Delta_i|``, so their ratio shrinks in proportion to the rate.
The records of one step are summarised by

    ``linearisation = sum |Z - Z_linear| / sum |Z_linear|``   (over every recorded pair, self pairs included)

and above :data:`LINEAR_BOUND` the step is past the linear regime: Z then says what one whole step does (an
overshoot, a kink crossed) rather than how the tasks' gradients align. Where the loss is smooth at that scale the
ratio falls in proportion to the rate, and ``rate * bound / (2 * linearisation)`` brings it to half the bound;
where it is not (ReLU kinks, BatchNorm over a few support images), the ratio falls more slowly, and only a
measurement at the smaller rate tells.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["LINEAR_BOUND", "linearisation", "linearisation_by_step", "linearisation_warning"]

# Curvature terms at least half the size of the first-order ones: Z no longer reads as gradient alignment.
LINEAR_BOUND = 0.5


def linearisation(z: np.ndarray, z_linear: np.ndarray) -> float:
    """``sum |z - z_linear| / sum |z_linear|`` over the finite pairs (NaN when there are none)."""
    z, z_linear = np.asarray(z, dtype=float), np.asarray(z_linear, dtype=float)
    finite = np.isfinite(z) & np.isfinite(z_linear)
    scale = np.abs(z_linear[finite]).sum()
    if not finite.any():
        return math.nan
    error = np.abs(z[finite] - z_linear[finite]).sum()
    return float(error / scale) if scale > 0 else (0.0 if error == 0 else math.inf)


def linearisation_by_step(records: pd.DataFrame) -> pd.DataFrame:
    """Per recorded step: the lookahead, its rate, the median step norm and :func:`linearisation` (tables without
    the diagnostic columns, written before kml recorded them, give an empty frame)."""
    if "Z_linear" not in records or records["Z_linear"].isna().all():
        return pd.DataFrame(columns=["step", "lookahead", "rate", "step_norm", "linearisation"])
    rows = []
    for step, frame in records.groupby("step", sort=True):
        rows.append(
            {
                "step": step,
                "lookahead": str(frame["lookahead"].iloc[0]) if "lookahead" in frame else "sgd",
                "rate": float(frame["rate"].iloc[0]),
                "step_norm": float(frame["step_norm_i"].median()) if "step_norm_i" in frame else math.nan,
                "linearisation": linearisation(frame["Z"], frame["Z_linear"]),
            }
        )
    return pd.DataFrame(rows)


def linearisation_warning(records: pd.DataFrame, bound: float = LINEAR_BOUND) -> str | None:
    """One line naming the steps whose :func:`linearisation` exceeds ``bound`` and the rate that, on a smooth loss,
    would not; or None."""
    table = linearisation_by_step(records)
    over = table[table["linearisation"] > bound]
    if over.empty:
        return None
    worst = over.loc[over["linearisation"].idxmax()]
    steps = ", ".join(str(int(s)) for s in over["step"][:6]) + (" ..." if len(over) > 6 else "")
    suggested = worst["rate"] * bound / (2 * worst["linearisation"]) if np.isfinite(worst["linearisation"]) else 0.0
    return (
        f"linearisation error above {bound:g} at step {steps}: sum|Z - Z_linear| / sum|Z_linear| = "
        f"{worst['linearisation']:.3g} at step {int(worst['step'])} ({worst['lookahead']} lookahead, rate "
        f"{worst['rate']:.3g}, median step norm {worst['step_norm']:.3g}): Z there is the whole step's effect more "
        f"than gradient alignment; if the loss is smooth at that scale, --rate {suggested:.2g} brings the ratio "
        f"under the bound (measure again to check)"
    )
