"""Intervals, paired comparisons, old tables and the linearisation warning of transference, against closed forms
and hand computations (no model)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest

from kml.errors import KMLError
from kml.transference.aggregate import load_records, mode_matrix, mode_pair_stats
from kml.transference.analyzer import COLUMNS, REQUIRED_COLUMNS
from kml.transference.compare import paired_comparison
from kml.transference.diagnostics import linearisation, linearisation_warning
from kml.transference.runs import find_run
from kml.transference.stats import mean_estimate, paired_t_test, t_cdf, t_interval, t_quantile, t_two_sided_p


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantiles_match_closed_forms(p):
    # df 1 (Cauchy) and df 2 have closed-form quantiles; bisection to double precision, relative 1e-12
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)
    assert t_quantile(1 - p, 5) == -t_quantile(p, 5)
    # large df: the normal quantile plus two Cornish-Fisher terms (the third is ~1e-13 at df 1e4)
    z, df = statistics.NormalDist().inv_cdf(p), 1e4
    expansion = z + z * (z**2 + 1) / (4 * df) + z * (5 * z**4 + 16 * z**2 + 3) / (96 * df**2)
    assert t_quantile(p, df) == pytest.approx(expansion, abs=1e-10)


def test_t_cdf_and_p_values_match_closed_forms():
    for t in (0.1, 1.0, 3.0, 40.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)
        assert t_cdf(-t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-14)
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-12)


@pytest.mark.parametrize("df", [3, 10, 30])
def test_t_cdf_matches_quadrature_of_the_density(df):
    """Against Gauss-Legendre quadrature of the t density (64 nodes on each of 64 panels: exact to rounding)."""

    def density(t: float) -> float:
        log = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - (df + 1) / 2 * math.log1p(t * t / df)
        return math.exp(log) / math.sqrt(df * math.pi)

    nodes, weights = np.polynomial.legendre.leggauss(64)
    for t in (0.5, 2.0, 4.0):
        edges = np.linspace(0.0, t, 65)
        area = sum(
            (b - a) / 2 * sum(w * density((a + b) / 2 + (b - a) / 2 * x) for x, w in zip(nodes, weights))
            for a, b in zip(edges[:-1], edges[1:])
        )
        assert t_cdf(t, df) == pytest.approx(0.5 + area, abs=1e-14)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-15)


def test_interval_of_independent_values_is_the_textbook_one():
    values = [0.3, -0.1, 0.25, 0.05, 0.2]
    estimate = t_interval(values)
    half = t_quantile(0.975, 4) * statistics.stdev(values) / math.sqrt(5)
    assert (estimate.low, estimate.high) == pytest.approx(
        (statistics.mean(values) - half, statistics.mean(values) + half)
    )
    assert estimate.n == estimate.count == 5
    assert math.isnan(t_interval([1.0]).low) and t_interval([]).n == 0


def test_clustered_interval_counts_each_unit_once():
    # Equal-sized units: the interval of the unit means, whatever the spread inside a unit.
    units = [0, 0, 1, 1, 2, 2]
    values = [0.1, 0.3, 0.5, 0.5, -0.2, 0.0]
    means = [0.2, 0.5, -0.1]
    clustered, of_means = mean_estimate(values, units), t_interval(means)
    assert clustered.n == 3 and clustered.count == 6
    assert (clustered.mean, clustered.low, clustered.high) == pytest.approx(
        (of_means.mean, of_means.low, of_means.high)
    )
    # treating the six values as independent would make the interval narrower than the units allow
    assert t_interval(values).high - t_interval(values).low < clustered.high - clustered.low


def test_paired_test_against_a_hand_computation():
    a, b = [0.1, 0.2, 0.0, 0.3], [0.15, 0.3, 0.05, 0.32]
    differences = [y - x for x, y in zip(a, b)]
    test = paired_t_test(a, b)
    t = statistics.mean(differences) / (statistics.stdev(differences) / 2)
    assert test.t == pytest.approx(t) and test.mean == pytest.approx(statistics.mean(differences))
    assert test.p == pytest.approx(t_two_sided_p(t, 3)) and 0 < test.p < 0.05
    with pytest.raises(KMLError, match="as many values in both"):
        paired_t_test(a, b[:3])


def records(rows, **extra) -> pd.DataFrame:
    """A transference table from (step, batch, i, j, mode_i, mode_j, Z, self_pair) tuples."""
    frame = pd.DataFrame(
        [
            {
                "step": s, "batch": batch, "task_i": i, "task_j": j, "mode_i": mi, "mode_j": mj,
                "classes_i": f"{i}", "classes_j": f"{j}", "loss_j": 1.0, "loss_j_after": 1 - z, "rate": 0.1,
                "self_pair": sp, "Z": z, "lookahead": "sgd", "step_norm_i": 1.0, "grad_norm_i": 1.0,
                "Z_linear": z, "linear_error": 0.0,
            }
            for s, batch, i, j, mi, mj, z, sp in rows
        ]
    )  # fmt: skip
    return frame.assign(**extra)


ROWS = [
    (1, 0, 0, 1, "a", "b", 0.2, False),
    (1, 0, 0, 2, "a", "b", 0.4, False),
    (1, 1, 0, 1, "a", "b", -0.1, False),
    (1, 1, 0, 2, "a", "b", 0.1, False),
    (1, 2, 0, 1, "a", "b", 0.0, False),
    (1, 2, 0, 2, "a", "b", 0.3, False),
    (1, 0, 1, 0, "b", "a", -0.3, False),
    (1, 0, 0, 0, "a", "a", 0.9, True),
]


def test_mode_pair_interval_is_over_meta_batches():
    stats = mode_pair_stats(records(ROWS)).set_index(["mode_i", "mode_j"])
    cell = stats.loc[("a", "b")]
    # three meta-batches of two pairs each: the t interval of the three batch means 0.3, 0.0, 0.15
    expected = t_interval([0.3, 0.0, 0.15])
    assert cell["count"] == 6 and cell["n"] == 3
    assert (cell["mean"], cell["ci_low"], cell["ci_high"]) == pytest.approx(
        (expected.mean, expected.low, expected.high)
    )
    assert stats.loc[("b", "a"), "n"] == 1 and math.isnan(stats.loc[("b", "a"), "ci_low"])  # one unit: no interval


def test_matrix_has_empty_cells_with_zero_counts():
    frame = records(ROWS)
    counts = mode_matrix(frame, "count")
    assert counts.loc["a", "b"] == 6 and counts.loc["b", "a"] == 1
    assert counts.loc["a", "a"] == 0 and counts.loc["b", "b"] == 0  # the self pair is left out; no b -> b pair
    means = mode_matrix(frame)
    assert math.isnan(means.loc["a", "a"]) and math.isnan(means.loc["b", "b"])
    with pytest.raises(KMLError, match="unknown statistic 'median'"):
        mode_matrix(frame, "median")


def test_paired_comparison_on_identical_episodes():
    a = records(ROWS)
    shift = {0: 0.1, 1: 0.3, 2: 0.2}  # B's Z = A's + a per-batch shift: the paired difference is the shift's mean
    b = a.assign(Z=a["Z"] + a["batch"].map(shift))
    cell = paired_comparison(a, b).set_index(["mode_i", "mode_j"]).loc[("a", "b")]
    expected = t_interval([0.1, 0.3, 0.2])
    assert cell["difference"] == pytest.approx(0.2) and cell["n"] == 3 and cell["count"] == 6
    assert (cell["ci_low"], cell["ci_high"]) == pytest.approx((expected.low, expected.high))
    assert cell["p"] == pytest.approx(expected.p)
    with pytest.raises(KMLError, match="episodes differ \\(classes_i"):
        paired_comparison(a, b.assign(classes_i="9"))
    with pytest.raises(KMLError, match="share no recorded episode"):
        paired_comparison(a, b.assign(step=99))


def test_tables_written_before_the_diagnostics_still_load(tmp_path):
    old = records(ROWS)[list(REQUIRED_COLUMNS)]
    old.to_csv(tmp_path / "transference.csv", index=False)
    frame = load_records(tmp_path)
    assert list(frame.columns) == list(COLUMNS) and (frame["lookahead"] == "sgd").all()
    assert frame["Z_linear"].isna().all()
    assert linearisation_warning(frame) is None  # nothing to check, nothing claimed
    assert mode_matrix(frame).loc["a", "b"] == pytest.approx(0.15)
    pd.DataFrame({"step": [1]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(KMLError, match="lacks transference columns"):
        load_records(tmp_path / "other.csv")


def test_linearisation_warning_names_the_step_and_a_smaller_rate():
    frame = records(ROWS)
    assert linearisation(frame["Z"], frame["Z_linear"]) == 0 and linearisation_warning(frame) is None
    # measured Z far from its first-order prediction at step 1: sum|Z - Z_lin| / sum|Z_lin| = 4
    bent = frame.assign(Z_linear=frame["Z"] / 5)
    assert linearisation(bent["Z"], bent["Z_linear"]) == pytest.approx(4.0)
    message = linearisation_warning(bent, bound=0.5)
    assert message.startswith("linearisation error above 0.5 at step 1: ")
    assert "--rate 0.0063 brings the ratio under the bound" in message  # 0.1 * 0.5 / (2 * 4) = 0.00625
    assert linearisation_warning(bent, bound=5.0) is None


def test_find_run_from_the_repository_root_or_below(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    run = root / "train_dir" / "run-1"
    run.mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    (root / "notebooks").mkdir()
    records(ROWS).to_csv(run / "transference.csv", index=False)
    monkeypatch.chdir(root / "notebooks")  # where jupyter execute runs a notebook's kernel
    monkeypatch.delenv("KML_RUN_DIR", raising=False)
    assert find_run() == root / "train_dir" / "run-1"  # the newest run of the root's train_dir
    monkeypatch.setenv("KML_RUN_DIR", "train_dir/run-1")
    assert find_run() == run
    assert find_run(run / "transference.csv") == run / "transference.csv"
    with pytest.raises(KMLError, match="no run with transference.csv at train_dir/missing"):
        find_run("train_dir/missing")
    np.testing.assert_equal(load_records(find_run())["Z"].to_numpy(), records(ROWS)["Z"].to_numpy())
