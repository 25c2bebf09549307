"""Nothing lost, nothing silently wrong (issue 18): run folders, locks, checkpoints and every bad input.

Each case of the issue's lists is one cheap test: most fail in validation before any data is loaded.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import one_line_error, read_metrics, tiny_args

from kml.cli import evaluate as eval_cli
from kml.cli import train as train_cli
from kml.cli import transference as transference_cli
from kml.data.modes import load_store
from kml.data.store import ImageStore, cache_dir
from kml.errors import KMLError
from kml.training import checkpoint as checkpoint_module
from kml.training.checkpoint import load_checkpoint, save_checkpoint
from kml.training.run_lock import RunLock


def error_after_progress(capsys, argv) -> str:
    """The one error line of a kml-train that converted a folder first (its progress bars precede the line)."""
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    err = err[err.index("error: ") :].strip()
    assert "\n" not in err, err
    return err


def run_dir(tmp_path: Path, name: str = "run") -> Path:
    return tmp_path / "train_dir" / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One 10-step tiny run (KML + MAML) shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("trained")
    assert train_cli.main(tiny_args(tmp, steps=10)) == 0
    return tmp


# ------------------------------------------------------------------ 1. --overwrite and the run lock
@pytest.mark.parametrize("name", ["..", ".", "a/b", "/tmp/elsewhere", ".hidden"])
def test_overwrite_refuses_names_that_are_not_a_plain_child_folder(tmp_path, capsys, name):
    (tmp_path / "train_dir" / "keep").mkdir(parents=True)
    (tmp_path / "train_dir" / "keep" / "config.json").write_text("{}")
    args = tiny_args(tmp_path, "--overwrite", steps=2)
    args[args.index("--run-name") + 1] = name
    err = one_line_error(capsys, args)
    assert "is not a plain folder name" in err
    assert (tmp_path / "train_dir" / "keep" / "config.json").is_file() and tmp_path.is_dir()


def test_overwrite_checks_every_setting_before_touching_the_old_run(trained, capsys):
    old = run_dir(trained)
    before = sorted(p.name for p in old.rglob("*"))
    err = one_line_error(capsys, tiny_args(trained, "--overwrite", "--ways", "1000", steps=2))
    assert "1000-way tasks need at least" in err
    err = one_line_error(capsys, tiny_args(trained, "--overwrite", "--lr", "nan", steps=2))
    assert "--lr must be a finite number > 0, got nan" in err
    assert sorted(p.name for p in old.rglob("*")) == before
    assert load_checkpoint(old / "checkpoints" / "last.pt")["step"] == 10


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    folder = tmp_path / "train_dir" / "documents"
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("precious")
    err = one_line_error(capsys, tiny_args(tmp_path, "--overwrite", name="documents", steps=2))
    assert "is not a kml run folder" in err
    assert (folder / "thesis.tex").read_text() == "precious"


def test_overwrite_replaces_the_old_run_once_the_new_one_starts(tmp_path):
    assert train_cli.main(tiny_args(tmp_path, steps=10)) == 0
    assert train_cli.main(tiny_args(tmp_path, "--overwrite", steps=5)) == 0
    assert [int(r["step"]) for r in read_metrics(run_dir(tmp_path))] == [5]
    assert not (run_dir(tmp_path) / "checkpoints" / "step_000010.pt").exists()
    assert sorted(p.name for p in (tmp_path / "train_dir").iterdir()) == ["run"]  # no lock, nothing set aside


@pytest.mark.parametrize("extra", [(), ("--overwrite",), ("--resume",)], ids=["new", "overwrite", "resume"])
def test_second_writer_on_a_run_fails_with_one_line(trained, capsys, extra):
    lock = RunLock(run_dir(trained)).acquire()  # another live process holding the run (flock is per open file)
    try:
        before = sorted(p.name for p in run_dir(trained).rglob("*"))
        err = one_line_error(capsys, tiny_args(trained, *extra, steps=12))
        assert f"is in use by another kml process (pid {os.getpid()} on" in err and "--run-name" in err
        assert sorted(p.name for p in run_dir(trained).rglob("*")) == before
    finally:
        lock.release()


def test_stale_lock_of_a_crashed_run_is_taken_over(tmp_path):
    (tmp_path / "train_dir").mkdir()
    (tmp_path / "train_dir" / ".run.lock").write_text("999999 crashed-host\n")  # left by a kill -9: no flock held
    assert train_cli.main(tiny_args(tmp_path, steps=2)) == 0
    assert "took over the lock of pid 999999 on crashed-host" in (run_dir(tmp_path) / "log.txt").read_text()
    assert not (tmp_path / "train_dir" / ".run.lock").exists()


# ------------------------------------------------------------------ 6. one line instead of a traceback
@pytest.mark.parametrize(
    "flags, message",
    [
        (("--queries", "0"), "--queries must be an integer >= 1, got 0"),
        (("--lr", "nan"), "--lr must be a finite number > 0, got nan"),
        (("--lr-halve-every", "0"), "--lr-halve-every must be an integer >= 1, got 0"),
        (("--weights", "nan", "1", "1"), "--weights must be a finite number >= 0, got nan"),
        (("--device", "tpu"), "unsupported --device 'tpu'; kml runs on auto, cpu, cuda or cuda:N"),
        (("--device", "mps"), "unsupported --device 'mps'"),
        (("--seed", "-1"), "--seed must be an integer from 0 to 4294967295, got -1"),
    ],
    ids=["queries-0", "lr-nan", "halve-0", "weights-nan", "tpu", "mps", "seed"],
)
def test_bad_flag_values_are_one_line(tmp_path, capsys, flags, message):
    assert message in one_line_error(capsys, tiny_args(tmp_path, *flags, steps=2))
    assert not (tmp_path / "train_dir").exists()


def test_download_workers_is_checked(tmp_path, capsys, download_cli):
    err = one_line_error(capsys, ["--workers", "0", "--datasets", "omniglot", "--root", str(tmp_path)], download_cli)
    assert "--workers must be an integer >= 1, got 0" in err


def test_binary_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_bytes(bytes(range(256)))
    err = one_line_error(capsys, tiny_args(tmp_path, "--config", str(config), steps=2))
    assert f"config file {config} is not a text file" in err


def test_number_written_as_text_in_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"lr": "0.01"}))
    err = one_line_error(capsys, tiny_args(tmp_path, "--config", str(config), steps=2))
    assert f"config file {config}: lr must be a finite number > 0, got the text '0.01'; write it without quotes" in err


def dataset_cache(tmp_path: Path) -> Path:
    """A small valid 'omniglot' cache, to be broken by the tests."""
    arrays = [np.zeros((4, 1, 16, 16), np.uint8) for _ in range(5)]
    store = ImageStore.from_class_arrays(arrays, list("abcde"), "omniglot", "train")
    return store.save(cache_dir(tmp_path / "data", "omniglot", "train"))


def train_omniglot(tmp_path: Path) -> list[str]:
    return ["--modes", "omniglot", "--data-root", str(tmp_path / "data"), "--train-dir", str(tmp_path / "t")]


def test_empty_images_file_is_one_line_with_a_working_rebuild_command(tmp_path, capsys, download_cli):
    directory = dataset_cache(tmp_path)
    (directory / "images.npy").write_bytes(b"")
    err = one_line_error(capsys, train_omniglot(tmp_path))
    assert f"corrupt cache file {directory / 'images.npy'}" in err
    assert f"kml-download --datasets omniglot --root {tmp_path / 'data'} --force" in err  # works anywhere
    # the advised command parses
    assert download_cli.parse_args(["--datasets", "omniglot", "--root", str(tmp_path / "data"), "--force"]).force


@pytest.mark.parametrize(
    "manifest, problem",
    [
        ([], "a list, not a mapping"),
        ({"format_version": 1, "mode": "omniglot"}, "missing split, image_shape"),
    ],
    ids=["list", "missing-keys"],
)
def test_broken_manifest_is_one_line(tmp_path, capsys, manifest, problem):
    directory = dataset_cache(tmp_path)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    err = one_line_error(capsys, train_omniglot(tmp_path))
    assert f"corrupt cache manifest {directory / 'manifest.json'} ({problem}" in err


def image_folder(tmp_path: Path, classes: int = 4) -> Path:
    folder = tmp_path / "pictures"
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (60 * c, 10 * i, 0)).save(folder / f"class{c}" / f"{i}.png")
    return folder


def test_unreadable_class_folder_is_one_line(tmp_path, capsys, monkeypatch):
    folder = image_folder(tmp_path)
    blocked = folder / "class1"
    if os.geteuid() != 0:
        blocked.chmod(0)
    else:  # root reads through chmod 000: make the listing fail as it would for a user
        from kml.data.sources import folder as folder_source

        real = folder_source._images
        monkeypatch.setattr(
            folder_source,
            "_images",
            lambda p: (
                (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(p))) if p == blocked else real(p)
            ),
        )
    try:
        err = error_after_progress(capsys, ["--modes", f"folder:{folder}", "--data-root", str(tmp_path / "data")])
    finally:
        blocked.chmod(0o755)
    assert f"cannot read {blocked} (Permission denied); make it readable (chmod -R u+rX {folder})" in err


def test_unwritable_data_root_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = one_line_error(
        capsys, ["--modes", "glyphs", "--data-root", str(blocker / "data"), "--train-dir", str(tmp_path)]
    )
    assert "pass --data-root a writable folder" in err


def test_resume_with_corrupt_config_json_recovers_it_from_the_checkpoint(tmp_path, capsys):
    assert train_cli.main(tiny_args(tmp_path, steps=10)) == 0
    config = run_dir(tmp_path) / "config.json"
    good = json.loads(config.read_text())
    config.write_text('{"modes": [')
    assert train_cli.main(tiny_args(tmp_path, "--resume", steps=12)) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(lines) == 1 and "rewrote it from the settings saved in" in lines[0]
    assert {k: v for k, v in json.loads(config.read_text()).items() if k != "steps"} == {
        k: v for k, v in good.items() if k != "steps"
    }
    (run_dir(tmp_path) / "checkpoints" / "last.pt").unlink()
    config.write_text("[1, 2]")
    err = one_line_error(capsys, tiny_args(tmp_path, "--resume", steps=14))
    assert f"cannot resume: {config}: run config must be a mapping" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--tasks-per-batch", "0"), "--tasks-per-batch must be an integer >= 1, got 0"),
        (("--inner-steps", "-1"), "--inner-steps must be an integer from 0 to 1000, got -1"),
        (("--shots", "0"), "--shots must be an integer >= 1, got 0"),
        (("--queries", "0"), "--queries must be an integer >= 1, got 0"),
        (("--device", "mps"), "unsupported --device 'mps'"),
    ],
    ids=["tasks-per-batch-0", "inner-steps-negative", "shots-0", "queries-0", "mps"],
)
def test_eval_bad_numbers_are_one_line_before_reading_anything(tmp_path, capsys, flags, message):
    err = one_line_error(capsys, ["--checkpoint", str(tmp_path / "missing.pt"), *flags], eval_cli)
    assert message in err


def test_eval_output_into_a_missing_folder_fails_before_evaluating(trained, capsys, monkeypatch):
    import kml.evaluation

    monkeypatch.setattr(kml.evaluation, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --output"))
    missing = trained / "nowhere" / "out.json"
    err = one_line_error(
        capsys, ["--checkpoint", str(run_dir(trained) / "checkpoints" / "last.pt"), "--output", str(missing)], eval_cli
    )
    assert f"folder {missing.parent} does not exist; create it first (mkdir -p {missing.parent})" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--rate", "nan"), "--rate must be a finite number > 0, got nan"),
        (("--rate", "-5"), "--rate must be a finite number > 0, got -5"),
        (("--meta-batch", "1"), "--meta-batch must be an integer >= 2, got 1"),
        (("--meta-batch", "0"), "--meta-batch must be an integer >= 2, got 0"),
    ],
    ids=["rate-nan", "rate-negative", "meta-batch-1", "meta-batch-0"],
)
def test_transference_bad_numbers_are_one_line_before_any_work(tmp_path, capsys, flags, message):
    err = one_line_error(capsys, ["--checkpoint", str(tmp_path / "missing.pt"), *flags], transference_cli)
    assert message in err
    assert not list(tmp_path.iterdir())  # no CSV written


# ------------------------------------------------------------------ 7. advice that works
def test_damaged_synthetic_cache_is_generated_again(tmp_path):
    store = load_store("glyphs", "val", tmp_path)
    (cache_dir(tmp_path, "glyphs", "val") / "images.npy").write_bytes(b"")
    again = load_store("glyphs", "val", tmp_path)
    assert torch.equal(again.images, store.images)


def test_corrupt_image_in_a_folder_mode_gives_advice_kml_train_accepts(tmp_path, capsys):
    folder = image_folder(tmp_path)
    (folder / "class2" / "broken.png").write_bytes(b"not a png at all")
    err = error_after_progress(capsys, ["--modes", f"folder:{folder}", "--data-root", str(tmp_path / "data")])
    assert "cannot decode image class2/broken.png" in err and "move it out of the folder, then rerun" in err
    assert "--on-corrupt" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_on_cuda_without_a_gpu_names_the_device(trained, capsys):
    err = one_line_error(
        capsys, ["--checkpoint", str(run_dir(trained) / "checkpoints" / "last.pt"), "--device", "cuda"], eval_cli
    )
    assert "--device cuda asked for, but this machine has no usable CUDA GPU; use --device cpu" in err
    assert "corrupt" not in err


def test_run_killed_before_its_first_save_names_overwrite(tmp_path, capsys):
    assert train_cli.main(tiny_args(tmp_path, steps=2)) == 0
    for file in (run_dir(tmp_path) / "checkpoints").iterdir():  # as a kill -9 before any checkpoint leaves it
        file.unlink()
    err = one_line_error(capsys, tiny_args(tmp_path, "--resume", steps=2))
    assert "has no checkpoint" in err and "--overwrite instead of --resume" in err
    err = one_line_error(capsys, tiny_args(tmp_path, steps=2))
    assert "already exists but has no checkpoint to resume" in err and "add --overwrite" in err
    assert train_cli.main(tiny_args(tmp_path, "--overwrite", steps=2)) == 0  # the advice works


def test_new_runs_write_a_step_0_checkpoint(tmp_path):
    from kml.training.trainer import Trainer

    values = vars(train_cli.build_parser().parse_args(tiny_args(tmp_path, steps=2)))
    values.pop("progress")
    trainer = Trainer.create(train_cli.config_from_values(values), progress=False)
    assert load_checkpoint(run_dir(tmp_path) / "checkpoints" / "last.pt")["step"] == 0
    trainer.release()
    assert not (tmp_path / "train_dir" / ".run.lock").exists()


# ------------------------------------------------------------------ 8. accepted nonsense
@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ("--algorithm", "protonet", "--multi-maml", "--first-order", "--meta-sgd"),
            "--first-order, --meta-sgd only apply to MAML's inner loop",
        ),
        (("--transference-every", "-1"), "--transference-every must be an integer >= 0, got -1"),
        (("--grad-clip", "-1"), "--grad-clip must be a finite number > 0, got -1"),
        (("--shots", "0"), "--shots must be an integer >= 1, got 0"),
        (("--meta-batch", "0"), "--meta-batch must be an integer >= 1, got 0"),
        (("--modulation", "none", "--encoder-uses-labels"), "--encoder-uses-labels needs a task encoder"),
    ],
    ids=["protonet-maml-switches", "transference-every", "grad-clip", "shots-0", "meta-batch-0", "labels-no-encoder"],
)
def test_meaningless_training_settings_are_refused(tmp_path, capsys, flags, message):
    assert message in one_line_error(capsys, tiny_args(tmp_path, *flags, steps=2))


def test_fractional_integer_in_config_is_refused(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("meta_batch: 2.5\n")
    err = one_line_error(capsys, tiny_args(tmp_path, "--config", str(config), steps=2))
    assert f"config file {config}: meta_batch must be an integer >= 1, got 2.5" in err


def test_eval_inner_steps_on_protonet_is_refused(tmp_path, capsys):
    assert train_cli.main(tiny_args(tmp_path, "--algorithm", "protonet", steps=1)) == 0
    checkpoint = str(run_dir(tmp_path) / "checkpoints" / "last.pt")
    err = one_line_error(capsys, ["--checkpoint", checkpoint, "--inner-steps", "3"], eval_cli)
    assert "--inner-steps applies to MAML; this checkpoint is kml-protonet, which has no inner loop" in err


def test_transference_modulation_on_unmodulated_checkpoint_is_refused(tmp_path, capsys):
    assert train_cli.main(tiny_args(tmp_path, "--modulation", "none", steps=1)) == 0
    checkpoint = str(run_dir(tmp_path) / "checkpoints" / "last.pt")
    err = one_line_error(capsys, ["--checkpoint", checkpoint, "--parameters", "modulation"], transference_cli)
    assert "has no such meta-parameters, so every Z would be 0; use --parameters all" in err


# ------------------------------------------------------------------ checkpoints
def largest_record(path: Path) -> tuple[int, int]:
    """Offset and size of the biggest tensor's bytes inside a checkpoint (a zip of stored records)."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with path.open("rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(handle.read(4), "<u2")
    return info.header_offset + 30 + int(name_length) + int(extra_length), info.file_size


def test_corrupt_tensor_bytes_are_caught_by_the_checksum(trained, tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    broken.write_bytes((run_dir(trained) / "checkpoints" / "last.pt").read_bytes())
    offset, size = largest_record(broken)
    with broken.open("r+b") as handle:
        handle.seek(offset + size // 2)
        handle.write(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())
    err = one_line_error(capsys, ["--checkpoint", str(broken), "--episodes", "2", "--no-progress"], eval_cli)
    assert f"checkpoint {broken} is corrupt (its contents do not match the checksum" in err


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError(
            "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/3: file write failed"
        ),
        OSError(28, "No space left on device"),
    ],
    ids=["torch-runtime-error", "oserror-enospc"],
)
def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 1, "model": {"w": torch.ones(3)}})

    def full_disk(obj, target):
        Path(target).write_bytes(b"x" * 4096)  # half a file, as a full disk leaves it
        raise failure

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(KMLError) as error:
        save_checkpoint(path, {"step": 2, "model": {"w": torch.zeros(3)}})
    message = str(error.value)
    assert "\n" not in message and f"could not write checkpoint {path}" in message
    assert "the previous last.pt is unchanged" in message
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # temp file removed
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def test_failed_checkpoint_write_during_training_is_one_line(tmp_path, capsys, monkeypatch):
    real = checkpoint_module.torch.save

    def fail_after_start(obj, target):
        if obj["step"] > 0:
            raise RuntimeError("PytorchStreamWriter failed writing file data/7: file write failed")
        real(obj, target)

    monkeypatch.setattr(checkpoint_module.torch, "save", fail_after_start)
    err = one_line_error(capsys, tiny_args(tmp_path, steps=10))
    assert "could not write checkpoint" in err and "continue with --resume" in err
    checkpoints = run_dir(tmp_path) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt"]
    assert load_checkpoint(checkpoints / "last.pt")["step"] == 0


def test_stale_temp_files_of_a_killed_run_are_removed_at_the_next_start(tmp_path):
    assert train_cli.main(tiny_args(tmp_path, steps=10)) == 0
    stale = run_dir(tmp_path) / "checkpoints" / ".last.pt.tmp-424242"
    stale.write_bytes(b"x" * 100000)
    assert train_cli.main(tiny_args(tmp_path, "--resume", steps=12)) == 0
    assert not stale.exists()
    assert f"removed {stale}" in (run_dir(tmp_path) / "log.txt").read_text()


def test_checkpoint_with_non_finite_parameters_is_refused_at_load(tmp_path):
    path = tmp_path / "nan.pt"
    save_checkpoint(path, {"step": 3, "model": {"w": torch.tensor([1.0, math.nan])}})
    with pytest.raises(KMLError, match=r"holds non-finite parameters \(1 tensors, e.g. w\)"):
        load_checkpoint(path)


# ------------------------------------------------------------------ non-finite loss
def poison_parameters_at(step: int):
    """A callback that overflows the parameters after ``step`` (what --lr inf did), so step + 1's loss is NaN."""

    def callback(trainer, current, episode):
        if current == step:
            with torch.no_grad():
                next(trainer.learner.parameters()).fill_(math.inf)

    return callback


def with_callback(monkeypatch, callback):
    from kml.training import launch

    original = launch.create_run

    def create(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.callbacks.append(callback)
        return trainer

    monkeypatch.setattr(launch, "create_run", create)


def test_non_finite_parameters_leave_the_last_finite_checkpoint_and_resume_with_lower_lr(tmp_path, capsys, monkeypatch):
    with_callback(monkeypatch, poison_parameters_at(12))
    err = one_line_error(capsys, tiny_args(tmp_path, steps=20))
    assert "at step 12" in err or "at step 13" in err
    last = run_dir(tmp_path) / "checkpoints" / "last.pt"
    state = load_checkpoint(last)  # refuses non-finite parameters
    assert state["step"] == 10
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert "--resume" in err and "--lr 0.0001" in err
    monkeypatch.undo()
    command = err.split("kml-train ", 1)[1].split(" (or")[0].split()
    assert train_cli.main([*tiny_args(tmp_path, steps=20), *command]) == 0  # the advised command works
    assert load_checkpoint(last)["step"] == 20


def test_nan_loss_saves_the_parameters_from_just_before_the_bad_step(tmp_path, capsys, monkeypatch):
    from kml.training import trainer as trainer_module

    real = trainer_module.accumulate_meta_gradient
    calls = []

    def nan_at_step_4(forward, *args, **kwargs):
        output = real(forward, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            output.loss = output.loss * math.nan
        return output

    monkeypatch.setattr(trainer_module, "accumulate_meta_gradient", nan_at_step_4)
    err = one_line_error(capsys, tiny_args(tmp_path, steps=20))
    assert "non-finite loss at step 4; saved the parameters from before it (step 3)" in err
    state = load_checkpoint(run_dir(tmp_path) / "checkpoints" / "last.pt")
    assert state["step"] == 3
