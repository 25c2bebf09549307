"""Student-t intervals and paired tests for transference cells, with no dependency beyond the standard library.

The t distribution with ``df`` degrees of freedom has, for ``t >= 0``,
``P(|T| > t) = I_x(df / 2, 1 / 2)`` with ``x = df / (df + t^2)`` and ``I`` the regularised incomplete beta
function (Abramowitz & Stegun 26.7.1 with 26.5.27); ``I`` is evaluated by its continued fraction (modified
Lentz, as in Numerical Recipes' ``betacf``), quantiles by bisection on that CDF. The 95% interval of a mean of
``n`` values is ``mean +- t_{0.975, n-1} * s / sqrt(n)`` (``s``: the sample standard deviation, ddof 1); values
that share a sampling unit (the pairs of one meta-batch share its tasks) count as one unit
(:func:`mean_estimate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kml.errors import KMLError

__all__ = ["MeanEstimate", "mean_estimate", "paired_t_test", "t_cdf", "t_interval", "t_quantile", "t_two_sided_p"]

_TINY = 1e-300


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (converges fast for ``x < (a + 1) / (a + b + 2)``)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            return h
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` for ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # the fraction converges on one side of the mean; the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) covers the other
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise KMLError(f"degrees of freedom must be positive, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * t_two_sided_p(t, df)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection to double precision)."""
    if not 0.0 < p < 1.0:
        raise KMLError(f"a quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return 0.5 * (low + high)


@dataclass(frozen=True)
class MeanEstimate:
    """A mean with its two-sided t interval and the t test of ``mean = 0``.

    ``n``: the independent units (clusters) behind the interval; ``count``: the values. ``low``, ``high``, ``t``
    and ``p`` are NaN when ``n < 2``.
    """

    mean: float
    low: float
    high: float
    se: float
    t: float
    p: float
    n: int
    count: int


def mean_estimate(values: Sequence[float], units: Sequence[object] | None = None, level: float = 0.95) -> MeanEstimate:
    """The mean of ``values`` with a t interval that treats each unit (values sharing a ``units`` label) as one
    independent draw; ``units=None``: every value is its own.

    With ``N`` values in ``U`` units, ``mean = sum y / N`` and ``se^2 = U / (U - 1) * sum_u (sum_{k in u} (y_k -
    mean))^2 / N^2`` (the cluster-robust variance of a mean), ``U - 1`` degrees of freedom. One value per unit
    gives the textbook ``s / sqrt(n)``; equal-sized units give the t interval of the unit means.
    """
    data = [float(v) for v in values]
    labels = list(range(len(data))) if units is None else list(units)
    if len(labels) != len(data):
        raise KMLError(f"one unit label per value: got {len(labels)} labels for {len(data)} values")
    count = len(data)
    if count == 0:
        return MeanEstimate(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0)
    mean = math.fsum(data) / count
    residuals: dict[object, list[float]] = {}
    for label, value in zip(labels, data):
        residuals.setdefault(label, []).append(value - mean)
    n = len(residuals)
    if n < 2:
        return MeanEstimate(mean, math.nan, math.nan, math.nan, math.nan, math.nan, n, count)
    se = math.sqrt(n / (n - 1) * math.fsum(math.fsum(r) ** 2 for r in residuals.values())) / count
    if se == 0.0:  # every unit at the mean: no spread to test against
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    return MeanEstimate(mean, mean - half, mean + half, se, t, t_two_sided_p(t, n - 1), n, count)


def t_interval(values: Sequence[float], level: float = 0.95) -> MeanEstimate:
    """``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)`` of ``values`` (independent draws)."""
    return mean_estimate(values, None, level)


def paired_t_test(
    a: Sequence[float], b: Sequence[float], units: Sequence[object] | None = None, level: float = 0.95
) -> MeanEstimate:
    """Paired t test of ``b - a`` (equal lengths, pair k of ``a`` and ``b`` measured on the same unit ``units[k]``):
    the mean difference, its interval, ``t`` and the two-sided ``p``."""
    if len(a) != len(b):
        raise KMLError(f"a paired test needs as many values in both, got {len(a)} and {len(b)}")
    return mean_estimate([float(y) - float(x) for x, y in zip(a, b)], units, level)
