"""kml-results: the statistics of the table, and a tiny end-to-end run that resumes instead of retraining."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kml.cli import results as results_cli
from kml.errors import KMLError
from kml.results import table
from kml.results.published import published_rows
from kml.results.runs import Method, Setup


def frame(accuracy) -> pd.DataFrame:
    """Episodes of methods a/b, seeds 0-2, modes x/y, 4 episodes each; ``accuracy(method, seed, mode, episode)``."""
    return pd.DataFrame(
        [
            {"setup": "5w1s", "method": m, "seed": s, "mode": mode, "episode": e, "accuracy": accuracy(m, s, mode, e)}
            for m in ("a", "b")
            for s in range(3)
            for mode in ("x", "y")
            for e in range(4)
        ]
    )


def test_summary_means_over_seeds_with_t_intervals_and_episode_intervals():
    episodes = frame(lambda m, s, mode, e: 60 + 10 * s + (e % 2) * 4 + (5 if mode == "y" else 0))
    rows = table.summary(episodes).set_index(["method", "mode"])
    x = rows.loc[("a", "x")]
    assert x["accuracy"] == pytest.approx(72.0) and x["seeds"] == 3
    assert x["ci95_seeds"] == pytest.approx(4.303 * 10 / math.sqrt(3))  # seed means 62, 72, 82: t with 2 dof
    assert x["ci95_episodes"] == pytest.approx(1.96 * pd.Series([0, 4, 0, 4]).std() / 2)
    average = rows.loc[("a", "average")]
    assert average["accuracy"] == pytest.approx(74.5)  # modes weigh the same
    assert average["ci95_episodes"] == pytest.approx(math.sqrt(2) * x["ci95_episodes"] / 2)


def test_paired_differences_see_a_constant_gap_exactly():
    episodes = frame(lambda m, s, mode, e: 50 + 7 * s + 3 * e + (5 if m == "b" else 0))
    diff = table.paired_differences(episodes, "a").set_index("mode")
    assert set(diff["method"]) == {"b"} and set(diff.index) == {"x", "y", "average"}
    for mode in ("x", "y", "average"):  # the seed and episode noise cancel when paired
        assert diff.loc[mode, "difference"] == pytest.approx(5.0)
        assert diff.loc[mode, "ci95_seeds"] == pytest.approx(0.0, abs=1e-9)
        assert diff.loc[mode, "ci95_episodes"] == pytest.approx(0.0, abs=1e-9)


def test_unpaired_noise_shows_in_the_difference_intervals():
    episodes = frame(lambda m, s, mode, e: 50 + (7 * s + 3 * e if m == "b" else 0))
    diff = table.paired_differences(episodes, "a").set_index("mode")
    assert diff.loc["x", "difference"] == pytest.approx(7 + 4.5)
    assert diff.loc["x", "ci95_seeds"] > 0 and diff.loc["x", "ci95_episodes"] > 0


def test_method_and_setup_specifications():
    assert Method.parse("kml-maml") == Method("kml-maml", "kml-maml", {})
    bare = Method.parse("bare=kml-maml,kml_form=bare,steps=40,identity_init=false")
    assert bare == Method("bare", "kml-maml", {"kml_form": "bare", "steps": 40, "identity_init": False})
    assert Setup.parse("20w5s") == Setup(20, 5) and Setup.parse("5w1s").tag == "5w1s"
    for bad in ("no-such-recipe", "x=kml-maml,steps", "a/b=kml-maml"):
        with pytest.raises(KMLError):
            Method.parse(bad)
    for bad in ("5w", "1w1s", "5w0s"):
        with pytest.raises(KMLError):
            Setup.parse(bad)


def test_published_rows_match_only_the_published_setups():
    five = ["omniglot", "miniimagenet", "fc100", "cub", "aircraft"]
    assert published_rows(five, 5, 1)["kml-protonet-released"] == 56.72
    assert published_rows(["miniimagenet", "omniglot"], 5, 5)["mmaml"] == 78.73
    assert published_rows(["glyphs", "textures", "shapes"], 5, 1) == {}


TINY = [
    "image_size=16",
    "base_channels=4",
    "encoder_channels=4",
    "meta_batch=3",
    "queries=2",
    "inner_steps=1",
    "eval_inner_steps=1",
    "val_every=3",
    "val_episodes=3",
    "checkpoint_every=3",
    "encoder_hidden=8",
]


def test_kml_results_runs_tabulates_and_then_reuses(tmp_path, capsys):
    argv = [
        "--methods",
        "kml-maml",
        "ablation=kml-maml,kml_form=bare",
        "protonet",
        "--seeds",
        "0",
        "1",
        "--steps",
        "3",
        "--episodes",
        "4",
        "--out",
        str(tmp_path / "out"),
        "--data-root",
        str(tmp_path / "data"),
        "--no-progress",
        "--set",
        *TINY,
    ]
    assert results_cli.main(argv) == 0
    first = capsys.readouterr().out
    assert first.count("trained, step 3") == 6
    summary = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(summary) == 3 * 4  # methods x (3 synthetic modes + average)
    assert set(summary["seeds"]) == {2}
    differences = pd.read_csv(tmp_path / "out" / "differences.csv")
    assert set(differences["method"]) == {"ablation", "protonet"} and set(differences["baseline"]) == {"kml-maml"}
    assert "| ablation |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
    config = (tmp_path / "out" / "runs" / "5w1s" / "ablation" / "seed1" / "config.json").read_text()
    assert '"kml_form": "bare"' in config and '"recipe": "kml-maml@1"' in config
    # again: every run and evaluation is reused; then a longer budget resumes each run from its checkpoint
    assert results_cli.main(argv) == 0
    assert capsys.readouterr().out.count("reused, step 3") == 6
    assert results_cli.main([*argv[: argv.index("--steps")], "--steps", "6", *argv[argv.index("--steps") + 2 :]]) == 0
    assert capsys.readouterr().out.count("resumed, step 6") == 6
    # other settings for the same run folders: refused in one line, nothing retrained
    with pytest.raises(SystemExit):
        results_cli.main([*argv, "queries=3"])
    assert "trained with other settings (queries)" in capsys.readouterr().err
