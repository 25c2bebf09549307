"""Issue 23, evaluation side: kml-eval, kml-transference, kml-results and the settings they check.

Each test reproduces one case of the issue's sweep that broke (the item number is in the test's comment).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_training import one_line_error, tiny_args

from kml.algorithms import build_learner
from kml.cli import evaluate as eval_cli
from kml.cli import results as results_cli
from kml.cli import train as train_cli
from kml.cli import transference as transference_cli
from kml.config import LearnerConfig
from kml.config.checks import TRAIN_NUMBERS, check_run_combinations, check_values
from kml.config.recipes import recipe_values
from kml.config.run import RunConfig
from kml.data.modes import load_stores
from kml.data.sampler import MixtureSampler
from kml.errors import KMLError
from kml.evaluation import evaluate
from kml.training.checkpoint import load_checkpoint, save_checkpoint


def checkpoint_of(tmp: Path, name: str = "run") -> Path:
    return tmp / "train_dir" / name / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One 2-step tiny KML + MAML run shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("trained")
    assert train_cli.main(tiny_args(tmp, steps=2)) == 0
    return checkpoint_of(tmp)


def error_after_progress(capsys, argv, cli) -> str:
    """The one error line of a command whose progress bars precede it (kml-transference has no --no-progress)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    err = err[err.index("error: ") :].strip()
    assert "\n" not in err, err
    return err


def edited_checkpoint(source: Path, target: Path, edit) -> Path:
    """A copy of ``source`` with ``edit(state)`` applied, saved (with a fresh checksum) as ``target``."""
    state = {k: v for k, v in load_checkpoint(source).items() if k not in ("format", "version")}
    edit(state)
    save_checkpoint(target, state)
    return target


# ------------------------------------------------------------------ 6. the CSV beside the report
def test_eval_output_named_csv_is_refused_before_evaluating(trained, tmp_path, capsys):
    output = tmp_path / "out.csv"
    err = one_line_error(capsys, ["--checkpoint", str(trained), "--output", str(output)], eval_cli)
    assert "names the JSON report; give a .json name, the CSV goes beside it" in err
    assert not output.exists()


# ------------------------------------------------------------------ 8. Multi-MAML transference on a subset of modes
def test_transference_of_multi_maml_between_two_modes_is_zero(tmp_path):
    assert train_cli.main(tiny_args(tmp_path, "--modulation", "none", "--multi-maml", steps=2)) == 0
    output = tmp_path / "z.csv"
    argv = ["--checkpoint", str(checkpoint_of(tmp_path)), "--output", str(output)]
    paper = ["--source-mode", "shapes", "--target-mode", "textures", "--sources", "4", "--target-split", "train"]
    assert transference_cli.main([*argv, *paper]) == 0
    records = pd.read_csv(output)
    assert set(records["mode_i"]) == {"shapes"} and set(records["mode_j"]) == {"textures"}
    # one parameter set per mode: a step on shapes' set leaves textures' loss exactly as it was (was: Z = +0.02)
    assert (records["Z"].abs() < 1e-6).all(), records["Z"].describe()
    assert transference_cli.main([*argv, "--modes", "shapes", "textures", "--batches", "2"]) == 0
    records = pd.read_csv(output)
    across = records[records["mode_i"] != records["mode_j"]]
    assert len(across) and (across["Z"].abs() < 1e-6).all()
    within = records[(records["mode_i"] == records["mode_j"]) & ~records["self_pair"]]
    assert (within["Z"].abs() > 1e-6).any()  # the same mode's set does move


# ------------------------------------------------------------------ 10. a speed knob must not change the result
def test_evaluate_gives_the_same_episodes_for_any_tasks_per_batch(tmp_path):
    torch.manual_seed(0)
    config = LearnerConfig(
        ways=5, image_size=16, base_channels=4, encoder_channels=4, inner_steps=1, eval_inner_steps=1
    )
    learner = build_learner(config)
    stores = load_stores(["shapes", "textures"], "test", root=tmp_path, side=16)
    runs = {
        batch: evaluate(learner, stores, 5, 1, 3, 12, seed=3, tasks_per_batch=batch, progress=False)
        for batch in (1, 5, 10)
    }
    for batch in (5, 10):
        for ours, theirs in zip(runs[batch], runs[1]):
            assert ours.episode_accuracy == theirs.episode_accuracy, batch
            assert ours.loss == pytest.approx(theirs.loss, rel=1e-5)


def test_kml_eval_numbers_do_not_depend_on_tasks_per_batch(trained, tmp_path):
    reports = {}
    for batch in ("1", "5", "10"):
        output = tmp_path / f"{batch}.json"
        argv = ["--checkpoint", str(trained), "--episodes", "10", "--tasks-per-batch", batch, "--output", str(output)]
        assert eval_cli.main([*argv, "--no-progress"]) == 0
        reports[batch] = json.loads(output.read_text())["episode_accuracy"]
    assert reports["1"] == reports["5"] == reports["10"]  # was: 68.27 / 67.73 / 63.16


# ------------------------------------------------------------------ 12. settings that do nothing
@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ("--algorithm", "protonet", "--inner-steps", "7", "--inner-lr", "0.1"),
            "--inner-steps, --inner-lr have no effect for kml-protonet (--inner-steps needs MAML's inner loop;",
        ),
        (
            ("--modulation", "none", "--kml-form", "bare", "--encoder-hidden", "128"),
            "--kml-form, --encoder-hidden have no effect for maml (--kml-form needs KML modulation; "
            "--encoder-hidden needs a task encoder): drop them",
        ),
        (("--no-proto-refine",), "--no-proto-refine has no effect for kml-maml (--no-proto-refine needs ProtoNet's"),
    ],
    ids=["protonet-inner-loop", "unmodulated-encoder", "maml-refine"],
)
def test_settings_without_effect_are_refused(tmp_path, capsys, flags, message):
    assert message in one_line_error(capsys, tiny_args(tmp_path, *flags, steps=1))
    assert not (tmp_path / "train_dir" / "run").exists()


def test_recipe_overrides_without_a_recipe_are_refused(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"recipe_overrides": ["lr"]}))
    err = one_line_error(capsys, tiny_args(tmp_path, "--config", str(config), steps=1))
    assert "--recipe-overrides lists what a run changed of its --recipe, and there is no recipe: drop it" in err


def test_settings_without_effect_in_python_compare_with_the_defaults():
    def run(**learner):
        return RunConfig(modes=["shapes"], learner=LearnerConfig(**learner))

    with pytest.raises(KMLError, match=r"^inner_steps have no effect|^inner_steps has no effect"):
        check_run_combinations(run(algorithm="protonet", inner_steps=7))
    with pytest.raises(KMLError, match="proto_refine=False has no effect for kml-maml"):
        check_run_combinations(run(proto_refine=False))
    check_run_combinations(run(algorithm="protonet", inner_steps=5))  # the default: nothing was set
    check_run_combinations(run(algorithm="protonet", proto_refine=False))
    # a published recipe's own values stay (maml@1 records MMAML's encoder_hidden 128); an override does not
    fields = {name for name in LearnerConfig.__dataclass_fields__}
    values = recipe_values("maml", {"modes": ["shapes"]})
    learner = LearnerConfig(**{k: v for k, v in values.items() if k in fields})
    check_run_combinations(RunConfig(modes=["shapes"], learner=learner, recipe="maml@1", recipe_overrides=[]))
    with pytest.raises(KMLError, match="encoder_hidden has no effect for maml"):
        check_run_combinations(
            RunConfig(modes=["shapes"], learner=learner, recipe="maml@1", recipe_overrides=["encoder_hidden"])
        )


def test_kml_results_set_leaves_out_what_a_method_does_not_have(tmp_path, capsys):
    argv = [
        *("--methods", "protonet", "--seeds", "0", "--steps", "1", "--episodes", "2", "--no-progress"),
        *("--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "data")),
        *("--set", "image_size=16", "base_channels=4", "encoder_channels=4", "meta_batch=2", "queries=2"),
        *("inner_steps=1", "val_every=1", "val_episodes=2", "checkpoint_every=1", "encoder_hidden=8"),
    ]
    assert results_cli.main(argv) == 0
    config = json.loads((tmp_path / "out" / "runs" / "5w1s" / "protonet" / "seed0" / "config.json").read_text())
    assert config["learner"]["inner_steps"] == 5 and config["learner"]["encoder_hidden"] == 128  # the recipe's


# ------------------------------------------------------------------ 15. read-only checkpoint folder
def test_eval_beside_a_read_only_checkpoint_fails_before_evaluating(trained, capsys, monkeypatch):
    import kml.evaluation

    monkeypatch.setattr(kml.evaluation, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking"))
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != trained.parent and access(path, mode))
    err = one_line_error(capsys, ["--checkpoint", str(trained), "--no-progress"], eval_cli)
    assert f"{trained.parent} is not writable; pass --output FILE.json in a writable folder" in err


def test_eval_report_that_cannot_be_written_is_one_line(trained, tmp_path, capsys, monkeypatch):
    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_text", full)
    output = tmp_path / "report.json"
    argv = ["--checkpoint", str(trained), "--episodes", "2", "--no-progress", "--output", str(output)]
    err = one_line_error(capsys, argv, eval_cli)
    assert f"cannot write {output}: No space left on device; pass --output elsewhere" in err


# ------------------------------------------------------------------ 17 and 20. kml-results and its files
@pytest.fixture(scope="module")
def results_run(tmp_path_factory) -> tuple[list[str], Path]:
    tmp = tmp_path_factory.mktemp("results")
    argv = [
        *("--methods", "kml-maml", "--seeds", "1", "--steps", "2", "--episodes", "2", "--no-progress"),
        *("--out", str(tmp / "out"), "--data-root", str(tmp / "data")),
        *("--set", "image_size=16", "base_channels=4", "encoder_channels=4", "meta_batch=2", "queries=2"),
        *("inner_steps=1", "eval_inner_steps=1", "val_every=2", "val_episodes=2", "checkpoint_every=2"),
    ]
    assert results_cli.main(argv) == 0
    return argv, tmp / "out" / "runs" / "5w1s" / "kml-maml"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"results": [], "episode_accuracy": {}}'])
def test_broken_eval_report_is_evaluated_again(results_run, capsys, content):
    argv, runs = results_run
    report = runs / "seed1" / "results_eval.json"
    report.write_text(content)
    capsys.readouterr()
    assert results_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert f"warning: {report} is broken" in captured.err and "evaluating again" in captured.err
    assert "reused, step 2" in captured.out and "average" in json.loads(report.read_text())["results"][-1]["mode"]


def test_corrupt_request_file_is_one_line(results_run, capsys):
    argv, runs = results_run
    request = runs / "seed1.request.json"
    kept = request.read_text()
    request.write_text("{corrupt")
    try:
        err = one_line_error(capsys, argv, results_cli)
    finally:
        request.write_text(kept)
    assert f"{request} is corrupt (" in err and "delete both to train that run again, or use another --out" in err


def test_fewer_steps_than_a_run_has_are_refused(results_run, capsys):
    argv, runs = results_run
    at = argv.index("--steps")
    err = one_line_error(capsys, [*argv[:at], "--steps", "1", *argv[at + 2 :]], results_cli)
    assert f"{runs / 'seed1'} is trained to step 2, past the 1 steps asked; ask --steps 2 (or more)" in err


def test_kml_results_failure_before_the_run_folder_points_to_the_error(tmp_path, capsys):
    argv = ["--methods", "kml-maml", "--seeds", "0", "--steps", "1", "--out", str(tmp_path)]
    # a setting kml-train refuses: one line naming the run, before anything is made
    err = one_line_error(capsys, [*argv, "--set", "lr=-1"], results_cli)
    assert err == "error: kml-maml 5w1s seed 0: lr must be a finite number > 0, got -1"
    assert not (tmp_path / "runs").exists()
    # a failure when the run starts, before its folder exists: the last line points to the error above
    with pytest.raises(SystemExit):
        results_cli.main([*argv, "--data-root", "/dev/null/data"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "see the error above and rerun" in last and "log.txt" not in last
    assert "--seeds must be an integer from 0 to 4294967295, got -1" in one_line_error(
        capsys, ["--seeds", "-1"], results_cli
    )


def test_list_settings_are_described_in_the_plural():
    with pytest.raises(KMLError, match=r"weights must be a list of finite numbers >= 0, got \[\]"):
        check_values({"weights": []})
    assert TRAIN_NUMBERS["mode_inner_steps"].describe(plural=True) == "integers from 0 to 1000"


# ------------------------------------------------------------------ 18. one line instead of a traceback
def test_transference_rate_that_overflows_is_one_line_and_writes_nothing(trained, tmp_path, capsys):
    output = tmp_path / "z.csv"
    argv = ["--checkpoint", str(trained), "--rate", "1e30", "--batches", "1", "--output", str(output)]
    err = error_after_progress(capsys, argv, transference_cli)
    assert "lookahead losses non-finite; pass a smaller --rate (the run's outer lr is" in err
    assert not output.exists()


def test_checkpoint_without_step_is_one_line(trained, tmp_path, capsys):
    stepless = edited_checkpoint(trained, tmp_path / "stepless.pt", lambda state: state.pop("step"))
    err = one_line_error(capsys, ["--checkpoint", str(stepless), "--episodes", "2", "--no-progress"], eval_cli)
    assert f"checkpoint {stepless} records no training step" in err


def test_library_refuses_non_finite_weights_and_no_episodes(tmp_path):
    stores = load_stores(["shapes"], "test", root=tmp_path, side=16)
    with pytest.raises(KMLError, match="one non-negative weight per mode"):
        MixtureSampler(stores, 5, 1, 2, weights=[float("nan")])
    learner = build_learner(LearnerConfig(ways=5, image_size=16, base_channels=4, encoder_channels=4))
    with pytest.raises(KMLError, match="^episodes must be an integer >= 1, got 0$"):
        evaluate(learner, stores, 5, 1, 2, episodes=0, progress=False)


# ------------------------------------------------------------------ 19. bounded inner steps
def test_inner_steps_are_bounded_on_the_command_line_and_in_checkpoints(trained, tmp_path, capsys):
    err = one_line_error(capsys, tiny_args(tmp_path, "--inner-steps", "1000000000", steps=1))
    assert "--inner-steps must be an integer from 0 to 1000, got 1000000000" in err
    err = one_line_error(capsys, ["--checkpoint", str(trained), "--inner-steps", "5000"], eval_cli)
    assert "--inner-steps must be an integer from 0 to 1000, got 5000" in err

    def huge(state):
        state["config"]["learner"]["eval_inner_steps"] = 10**9

    crafted = edited_checkpoint(trained, tmp_path / "huge.pt", huge)
    err = one_line_error(capsys, ["--checkpoint", str(crafted), "--episodes", "2", "--no-progress"], eval_cli)
    assert f"checkpoint {crafted} holds a config kml refuses: " in err and "from 0 to 1000, got 1000000000" in err


def test_eval_of_a_missing_checkpoint_written_with_dot_is_not_called_a_config_problem(tmp_path, capsys):
    from kml.cli import evaluate as eval_cli

    err = one_line_error(capsys, ["--checkpoint", f"{tmp_path}/./missing.pt"], eval_cli)
    assert "not found" in err and "holds a config" not in err
