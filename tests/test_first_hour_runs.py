"""What a researcher expects from the first hour (issue 29): evaluations that never overwrite each other and several
setups in one call, a failed start that leaves no run folder, logs in one unit with LF line endings (after a
resume too), validation on the console, a bounded number of checkpoints, run names that tell recipes apart.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_training import one_line_error, read_metrics, tiny_args

from kml.cli import evaluate as eval_cli
from kml.cli import train as train_cli
from kml.training.checkpoint import load_checkpoint, save_checkpoint

MODES = ("--modes", "glyphs", "shapes")


def args(tmp_path: Path, *extra: str, steps: int = 4, name: str = "run") -> list[str]:
    """A tiny run on two synthetic modes."""
    return tiny_args(tmp_path, *MODES, *extra, steps=steps, name=name)


def step_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))


# ------------------------------------------------------------------ 1. evaluations never overwrite each other
def test_evaluations_are_named_by_their_settings_and_setups_run_in_one_call(tmp_path, capsys):
    assert train_cli.main(args(tmp_path, "--algorithm", "protonet", steps=2)) == 0
    checkpoint = tmp_path / "train_dir" / "run" / "checkpoints" / "last.pt"
    base = ["--checkpoint", str(checkpoint), "--episodes", "4", "--no-progress"]
    assert eval_cli.main([*base, "--ways", "20"]) == 0
    assert eval_cli.main([*base, "--shots", "5"]) == 0  # was: overwrote the 20-way report (eval_last_test.json)
    folder = checkpoint.parent
    twenty, five_shot = (
        folder / "eval_last_test_20w1s3q_4ep_seed0.json",
        folder / "eval_last_test_5w5s3q_4ep_seed0.json",
    )
    assert json.loads(twenty.read_text())["ways"] == 20 and json.loads(five_shot.read_text())["shots"] == 5
    assert eval_cli.main([*base, "--ways", "20", "--seed", "1", "--modes", "shapes"]) == 0
    assert (folder / "eval_last_test_20w1s3q_4ep_seed1_shapes.json").is_file()
    assert len(list(folder.glob("eval_*.json"))) == 3 and len(list(folder.glob("eval_*.csv"))) == 3
    alone = json.loads(twenty.read_text())
    capsys.readouterr()

    # several setups in one call: one table, a report each, the numbers of each setup evaluated alone
    assert eval_cli.main([*base, "--setups", "5w1s", "20w1s"]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if re.match(r"\s*(5w1s|20w1s)\s", line)]
    assert [(row[0], row[1]) for row in table] == [
        (setup, mode) for setup in ("5w1s", "20w1s") for mode in ("glyphs", "shapes", "average")
    ]
    assert json.loads(twenty.read_text())["results"] == alone["results"]  # the same evaluation: rewritten, same
    assert (folder / "eval_last_test_5w1s3q_4ep_seed0.json").is_file()
    assert len(list(folder.glob("eval_*.json"))) == 4

    # --output: one report as named; several setups add _NwKs; --setups with --ways is refused
    output = tmp_path / "mine.json"
    assert eval_cli.main([*base, "--ways", "20", "--output", str(output)]) == 0
    assert json.loads(output.read_text())["results"] == alone["results"]
    assert eval_cli.main([*base, "--setups", "5w1s", "20w1s", "--output", str(output)]) == 0
    assert json.loads((tmp_path / "mine_20w1s.json").read_text())["results"] == alone["results"]
    assert (tmp_path / "mine_5w1s.csv").is_file()
    err = one_line_error(capsys, [*base, "--setups", "5w1s", "--ways", "20"], eval_cli)
    assert "--setups sets the ways and shots" in err
    err = one_line_error(capsys, [*base, "--setups", "5w1s", "5x"], eval_cli)
    assert "'5x' must look like 5w1s" in err


# ------------------------------------------------------------------ 2. a failed start leaves no run folder
def test_a_start_that_fails_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    train_dir = tmp_path / "train_dir"
    err = one_line_error(capsys, args(tmp_path, "--ways", "65"))  # 256 training classes, 64 validation classes
    assert "split 'val' has 64 classes; 65-way tasks need at least 65" in err
    assert not train_dir.exists()  # was: a run folder (and its step-0 last.pt) that only --overwrite replaced
    assert train_cli.main(args(tmp_path, steps=1)) == 0  # the corrected command, without --overwrite

    # an error in the first step (a learner that cannot run): the folder goes; folders it did not make stay
    from kml.training import trainer as trainer_module

    def broken(*_args, **_kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(trainer_module, "accumulate_meta_gradient", broken)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        train_cli.main(args(tmp_path, name="broken"))
    assert sorted(p.name for p in train_dir.iterdir()) == ["run"]  # no lock, no folder of the failed start

    # advice to continue the run (out of memory: --resume with task chunks) keeps the folder it names
    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainer_module, "accumulate_meta_gradient", out_of_memory)
    err = one_line_error(capsys, args(tmp_path, name="big"))
    assert "--resume" in err and "--task-chunk" in err
    assert (train_dir / "big" / "checkpoints" / "last.pt").is_file()


# ------------------------------------------------------------------ 3. one unit, LF, validation on the console
def accuracies(run: Path) -> list[float]:
    return [float(r[k]) for r in read_metrics(run) for k in r if k.startswith("accuracy") and r[k] != ""]


def test_logs_are_in_percent_with_lf_line_endings_also_after_resuming_an_old_run(tmp_path):
    extra = ("--log-every", "2", "--val-every", "4", "--checkpoint-every", "4")
    assert train_cli.main(args(tmp_path, *extra, steps=8, name="full")) == 0
    full = tmp_path / "train_dir" / "full"
    values = accuracies(full)
    assert max(values) > 1.0 and all(0.0 <= v <= 100.0 for v in values)  # percent, as validation.csv and kml-eval
    for name in ("metrics.csv", "validation.csv"):
        assert b"\r" not in (full / name).read_bytes(), name

    # a run of an earlier kml stopped at step 4: metrics.csv in fractions, CRLF everywhere, a checkpoint without unit
    assert train_cli.main(args(tmp_path, *extra, steps=4, name="old")) == 0
    old = tmp_path / "train_dir" / "old"
    lines = (old / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    fractions = [
        ",".join(
            str(float(v) / 100) if header[i].startswith("accuracy") and v else v for i, v in enumerate(line.split(","))
        )
        for line in lines[1:]
    ]
    (old / "metrics.csv").write_bytes("\r\n".join([lines[0], *fractions, ""]).encode())
    (old / "validation.csv").write_bytes((old / "validation.csv").read_text().replace("\n", "\r\n").encode())
    state = load_checkpoint(old / "checkpoints" / "last.pt")
    old_keys = {k: v for k, v in state.items() if k not in ("format", "version", "accuracy_unit")}
    save_checkpoint(old / "checkpoints" / "last.pt", old_keys)

    assert train_cli.main(args(tmp_path, *extra, "--resume", steps=8, name="old")) == 0
    for name in ("metrics.csv", "validation.csv"):  # was: CRLF rows, then LF rows, in one file
        assert b"\r" not in (old / name).read_bytes(), name
    assert accuracies(old) == pytest.approx(values, abs=1e-3)  # the old rows converted: one unit in the file
    assert [r["step"] for r in read_metrics(old)] == [r["step"] for r in read_metrics(full)]
    assert (old / "validation.csv").read_text() == (full / "validation.csv").read_text()
    assert load_checkpoint(old / "checkpoints" / "last.pt")["accuracy_unit"] == "percent"


def test_a_resume_killed_after_converting_does_not_convert_again(tmp_path):
    from kml.training.metrics_log import MetricsLog

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_bytes(b"step,loss,accuracy,accuracy_glyphs\r\n2,1.5,0.25,\r\n4,1.4,0.5,0.375\r\n")
    log = MetricsLog(run)
    assert log.truncate(4, fraction_rows=True)
    converted = (run / "metrics.csv").read_bytes()
    assert converted == b"step,loss,accuracy,accuracy_glyphs\n2,1.5,25.0,\n4,1.4,50.0,37.5\n"
    assert not log.truncate(4, fraction_rows=True)  # its checkpoint still says fractions, its rows do not
    assert (run / "metrics.csv").read_bytes() == converted


def test_validation_accuracy_is_printed_when_measured(tmp_path, capsys):
    assert train_cli.main(args(tmp_path, "--val-every", "2", steps=4)) == 0  # --no-progress: plain lines
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if " validation: " in line]
    assert [line.split()[1] for line in lines] == ["2", "4"]
    assert all(re.search(r"glyphs [\d.]+±[\d.]+, shapes [\d.]+±[\d.]+, average [\d.]+±[\d.]+", line) for line in lines)
    assert "best so far" in lines[0]
    assert lines[0].split(" (")[0] in (tmp_path / "train_dir" / "run" / "log.txt").read_text()
    progress = [word for word in args(tmp_path, "--val-every", "2", steps=2, name="bar") if word != "--no-progress"]
    assert train_cli.main(progress) == 0  # with the progress bar: written above it
    assert "step 2 validation: glyphs" in capsys.readouterr().out


# ------------------------------------------------------------------ 4. a bounded number of checkpoints; run names
def test_keep_checkpoints_bounds_the_periodic_ones_also_on_resume(tmp_path, capsys):
    every = ("--checkpoint-every", "1", "--val-every", "3")
    run = tmp_path / "train_dir" / "run"
    assert train_cli.main(args(tmp_path, *every, steps=6)) == 0
    assert step_files(run) == ["step_000004.pt", "step_000005.pt", "step_000006.pt"]  # the default: 3
    assert {"last.pt", "best.pt"} <= {p.name for p in (run / "checkpoints").iterdir()}
    assert train_cli.main(args(tmp_path, *every, "--resume", "--keep-checkpoints", "1", steps=6)) == 0
    assert step_files(run) == ["step_000006.pt"]  # applied on resume
    assert json.loads((run / "config.json").read_text())["keep_checkpoints"] == 1  # and kept by the next resume

    # resumed from an earlier checkpoint: never deleted, nor the later ones of the abandoned continuation
    assert train_cli.main(args(tmp_path, *every, "--overwrite", "--keep-checkpoints", "all", steps=6)) == 0
    assert len(step_files(run)) == 6
    resume = ("--resume-from", "step_000002.pt", "--keep-checkpoints", "1")
    assert train_cli.main(args(tmp_path, *every, *resume, steps=4)) == 0
    assert step_files(run) == ["step_000002.pt", "step_000004.pt", "step_000005.pt", "step_000006.pt"]

    # a run of an earlier kml (no keep_checkpoints in its config.json) gets the default on resume; 0 keeps none
    config = json.loads((run / "config.json").read_text())
    del config["keep_checkpoints"]
    (run / "config.json").write_text(json.dumps(config))
    shutil.copy(run / "checkpoints" / "step_000004.pt", run / "checkpoints" / "step_000001.pt")
    assert train_cli.main(args(tmp_path, *every, "--resume", steps=5)) == 0
    assert step_files(run) == ["step_000002.pt", "step_000004.pt", "step_000005.pt", "step_000006.pt"]
    assert train_cli.main(args(tmp_path, *every, "--overwrite", "--keep-checkpoints", "0", steps=2)) == 0
    assert step_files(run) == [] and (run / "checkpoints" / "last.pt").is_file()
    err = one_line_error(capsys, args(tmp_path, "--keep-checkpoints", "-1", name="other"))
    assert "--keep-checkpoints must be an integer >= 0, got -1" in err


def test_default_run_name_names_the_recipe(tmp_path):
    from kml.training import launch

    def run_name(values: dict) -> str:
        config = launch.config_from_values(launch.checked_values({"modes": ["glyphs", "shapes"], **values}))
        return launch.run_directory(config.resolved()).name

    assert run_name({"recipe": "mmaml"}) == "mmaml_glyphs-shapes_5w1s"
    assert run_name({"modulation": "film"}) == "maml-film_glyphs-shapes_5w1s"  # was: both maml-film_..., one run
    assert run_name({"recipe": "kml-protonet", "shots": 5}) == "kml-protonet_glyphs-shapes_5w5s"
    assert run_name({}) == "maml-kml_glyphs-shapes_5w1s"


def test_train_help_names_the_download_command(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    out = capsys.readouterr().out
    assert "kml-download" in out and "download.py" not in out and "--keep-checkpoints" in out
