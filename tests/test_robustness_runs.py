"""Run folders and the trainer under attack (issue 23): locks through symlinks, --overwrite of folders that are
not runs, advice that keeps checkpoints, CSVs and TensorBoard after a crash, settings changed on resume, full
disks, CPU out of memory, damaged checkpoints and the messages that name what to do.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
from pathlib import Path

import pytest
import torch
from test_robustness import run_dir, with_callback
from test_training import one_line_error, read_metrics, tiny_args

from kml.cli import train as train_cli
from kml.training import launch, run_folder
from kml.training import trainer as trainer_module
from kml.training.checkpoint import load_checkpoint, save_checkpoint
from kml.training.run_lock import RunLock

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
CPU_OOM = RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "341333332992 bytes. Error code 12 (Cannot allocate memory)"
)


def advised_command(err: str) -> list[str]:
    """The kml-train arguments a message advises (everything after its last ``kml-train ``)."""
    return shlex.split(err.rsplit("kml-train ", 1)[1])


# ------------------------------------------------------------------ 3. the run lock through a symlink
def test_a_symlinked_run_folder_is_locked_through(tmp_path, capsys):
    assert train_cli.main(tiny_args(tmp_path, steps=2)) == 0
    real = run_dir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "run").symlink_to(real)  # ln -s ../train_dir/run elsewhere/run
    (tmp_path / "linked_train_dir").symlink_to(tmp_path / "train_dir")
    link_args = [*tiny_args(tmp_path, "--resume", steps=4), "--train-dir", str(tmp_path / "elsewhere")]
    dir_link_args = [*tiny_args(tmp_path, "--resume", steps=4), "--train-dir", str(tmp_path / "linked_train_dir")]
    lock = RunLock(real).acquire()  # the run is being trained
    try:
        for args in (link_args, dir_link_args):
            assert "is in use by another kml process" in one_line_error(capsys, args)
    finally:
        lock.release()
    assert load_checkpoint(real / "checkpoints" / "last.pt")["step"] == 2  # no second writer
    assert train_cli.main(link_args) == 0  # alone, it resumes through the link
    assert load_checkpoint(real / "checkpoints" / "last.pt")["step"] == 4


# ------------------------------------------------------------------ 4. --overwrite deletes only kml runs
@pytest.mark.parametrize(
    "files",
    [
        {"config.json": '{"model_type": "bert", "hidden_size": 768}', "pytorch_model.bin": "weights"},
        {"checkpoints/model.ckpt": "weights", "notes.txt": "precious"},
        {"config.json": "{}", "checkpoints/last.pt": "not a checkpoint"},
    ],
    ids=["hugging-face-model", "checkpoints-subfolder", "empty-config"],
)
def test_overwrite_refuses_folders_that_are_not_kml_runs(tmp_path, capsys, files):
    folder = run_dir(tmp_path)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    err = one_line_error(capsys, tiny_args(tmp_path, "--overwrite", steps=2))
    assert "is not a kml run folder" in err and "--overwrite deletes only kml runs" in err
    assert all((folder / name).read_text() == text for name, text in files.items())


def test_overwrite_replaces_a_run_whose_config_json_is_lost(tmp_path):
    assert train_cli.main(tiny_args(tmp_path, steps=2)) == 0
    (run_dir(tmp_path) / "config.json").unlink()  # last.pt still says it is a kml run
    assert train_cli.main(tiny_args(tmp_path, "--overwrite", steps=3)) == 0
    assert load_checkpoint(run_dir(tmp_path) / "checkpoints" / "last.pt")["step"] == 3


# ------------------------------------------------------------------ 5. advice that keeps checkpoints; --resume-from
def test_a_run_without_last_pt_resumes_from_its_newest_step_checkpoint(tmp_path, capsys):
    assert train_cli.main(tiny_args(tmp_path, steps=20)) == 0
    full = read_metrics(run_dir(tmp_path))
    checkpoints = run_dir(tmp_path) / "checkpoints"
    (checkpoints / "last.pt").unlink()
    for extra in (("--resume",), ()):
        err = one_line_error(capsys, tiny_args(tmp_path, *extra, steps=20))
        assert "step_000020.pt" in err and "--resume-from" in err and "--overwrite" not in err
    assert train_cli.main([*tiny_args(tmp_path, steps=20), *advised_command(err)]) == 0  # the advice works
    assert load_checkpoint(checkpoints / "last.pt")["step"] == 20
    # an earlier one: its later rows are dropped and logged again, the same numbers as the uninterrupted run
    assert train_cli.main(tiny_args(tmp_path, "--resume-from", "step_000010.pt", steps=20)) == 0
    assert read_metrics(run_dir(tmp_path)) == full
    other = tmp_path / "other.pt"
    other.write_bytes((checkpoints / "step_000010.pt").read_bytes())
    err = one_line_error(capsys, tiny_args(tmp_path, "--resume-from", str(other), steps=20))
    assert f"--resume-from {other} is not a checkpoint of" in err


# ------------------------------------------------------------------ 6. CSVs after a crash, and on disk
def test_empty_csv_files_left_by_a_crash_get_their_header_and_every_csv_is_synced(tmp_path, monkeypatch):
    assert train_cli.main(tiny_args(tmp_path, steps=10)) == 0
    run = run_dir(tmp_path)
    for name in ("metrics.csv", "validation.csv"):
        (run / name).write_text("")  # a crash before the first row reached the disk
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert train_cli.main(tiny_args(tmp_path, "--resume", steps=20)) == 0
    assert (run / "metrics.csv").read_text().startswith("step,loss,accuracy,")
    assert (run / "validation.csv").read_text().startswith("step,mode,accuracy,ci95")
    assert [r["step"] for r in read_metrics(run)] == ["15", "20"]
    assert {"metrics.csv", "validation.csv"} <= set(synced)  # before the checkpoints that count their rows


# ------------------------------------------------------------------ 7. a change made on resume is kept
def test_settings_changed_on_resume_are_kept_by_the_next_resume(tmp_path):
    assert train_cli.main(tiny_args(tmp_path, steps=10)) == 0
    assert train_cli.main(tiny_args(tmp_path, "--resume", "--lr", "0.0001", "--grad-clip", "10", steps=15)) == 0
    assert train_cli.main(tiny_args(tmp_path, "--resume", steps=20)) == 0
    assert [float(r["lr"]) for r in read_metrics(run_dir(tmp_path))] == [0.001, 0.001, 0.0001, 0.0001]
    config = json.loads((run_dir(tmp_path) / "config.json").read_text())
    assert (config["lr"], config["grad_clip"], config["steps"]) == (0.0001, 10, 20)


# ------------------------------------------------------------------ 13. TensorBoard after kill and resume
class Killed(Exception):
    """A kill -9 stand-in: the run ends without saving."""


def test_tensorboard_after_kill_and_resume_has_one_point_per_logged_step(tmp_path, monkeypatch):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

    def kill_at_17(trainer, step, episode):
        if step == 17:
            trainer.tensorboard.flush()  # step 15's events reached the disk, as they do within flush_secs
            raise Killed

    with_callback(monkeypatch, kill_at_17)
    with pytest.raises(Killed):
        train_cli.main(tiny_args(tmp_path, steps=20))  # last.pt at step 10, events up to 15
    monkeypatch.undo()
    assert train_cli.main(tiny_args(tmp_path, "--resume", steps=20)) == 0
    events = event_accumulator.EventAccumulator(str(run_dir(tmp_path) / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [r["step"] for r in read_metrics(run_dir(tmp_path))] == ["5", "10", "15", "20"]


# ------------------------------------------------------------------ 14. a full disk outside checkpoint writes
def fail_open_of(monkeypatch, prefix: str) -> None:
    """Make opening any file whose name starts with ``prefix`` fail as a full disk does."""
    real = Path.open

    def open_(self, *args, **kwargs):
        if self.name.startswith(prefix):
            raise ENOSPC
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


class FullDiskFile:
    """An open file whose writes a full disk refuses at flush (the lock file's pid line)."""

    def __init__(self, handle):
        self._handle = handle

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def flush(self):
        raise ENOSPC


def test_full_disk_at_the_lock_file_is_one_line(tmp_path, capsys, monkeypatch):
    from kml.training import run_lock

    monkeypatch.setattr(run_lock, "open", lambda *a, **k: FullDiskFile(open(*a, **k)), raising=False)
    err = one_line_error(capsys, tiny_args(tmp_path, steps=2))
    assert f"could not write {tmp_path / 'train_dir' / '.run.lock'} (No space left on device); free space on" in err
    assert not (tmp_path / "train_dir" / ".run.lock").exists()


@pytest.mark.parametrize("name", ["config.json", "metrics.csv", "validation.csv", "log.txt", "tensorboard"])
def test_full_disk_on_any_run_file_is_one_line(tmp_path, capsys, monkeypatch, name):
    if name == "config.json":
        fail_open_of(monkeypatch, ".config.json.tmp-")
    elif name == "log.txt":
        monkeypatch.setattr(run_folder.RunLog, "flush", lambda self: (_ for _ in ()).throw(ENOSPC))
    elif name == "tensorboard":
        record_writer = pytest.importorskip("tensorboard.summary.writer.record_writer")
        real, calls = record_writer.RecordWriter.write, []

        def write(self, data):  # the event file is made; the disk fills while training
            calls.append(1)
            if len(calls) > 2:
                raise ENOSPC
            real(self, data)

        monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    else:
        fail_open_of(monkeypatch, name)
    err = one_line_error(capsys, tiny_args(tmp_path, steps=10))  # one_line_error: no thread's traceback either
    assert f"could not write {run_dir(tmp_path) / name} (No space left on device); free space on" in err


def test_full_disk_on_transference_csv_is_one_line(tmp_path, capsys, monkeypatch):
    from kml.transference import recorder

    monkeypatch.setattr(recorder, "append_rows", lambda path, rows: (_ for _ in ()).throw(ENOSPC))
    err = one_line_error(capsys, tiny_args(tmp_path, "--transference-every", "5", steps=10))
    assert f"could not write {run_dir(tmp_path) / 'transference.csv'} (No space left on device)" in err
    assert "then continue the run with --resume" in err


# ------------------------------------------------------------------ 16. CPU out of memory
@pytest.mark.parametrize(
    "where, message",
    [
        ("train_step", "out of CPU memory (could not allocate 341.3 GB) at step 1 with --meta-batch 3"),
        ("sample", "out of CPU memory (could not allocate 341.3 GB) drawing a meta-batch of 3 tasks"),
        ("build_learner", "out of CPU memory (could not allocate 341.3 GB) building the learner"),
        ("load_stores", "out of CPU memory (could not allocate 341.3 GB) loading the images at 16 pixels a side"),
    ],
)
def test_cpu_out_of_memory_is_one_line_with_remedies(tmp_path, capsys, monkeypatch, where, message):
    from kml.data.sampler import MixtureSampler

    def boom(*args, **kwargs):
        raise CPU_OOM

    owner = {"train_step": trainer_module.Trainer, "sample": MixtureSampler}.get(where, launch)
    monkeypatch.setattr(owner, where, boom)
    err = one_line_error(capsys, tiny_args(tmp_path, steps=2))
    assert message in err
    remedy = {
        "train_step": "--task-chunk 1 (MAML: add --activation-checkpointing; or --bf16)",
        "sample": "a smaller --meta-batch",
        "build_learner": "a smaller --base-channels",
        "load_stores": "a smaller --image-size",
    }[where]
    assert remedy in err


# ------------------------------------------------------------------ 18, 20. damaged checkpoints on resume
def test_checkpoint_without_step_is_one_line_naming_another(tmp_path, capsys):
    assert train_cli.main(tiny_args(tmp_path, steps=12)) == 0
    last = run_dir(tmp_path) / "checkpoints" / "last.pt"
    state = {k: v for k, v in load_checkpoint(last).items() if k not in ("format", "version", "step")}
    save_checkpoint(last, state)  # a valid checksum over an incomplete state
    err = one_line_error(capsys, tiny_args(tmp_path, "--resume", steps=14))
    assert f"checkpoint {last} has no step" in err and "--resume-from" in err and "step_000010.pt" in err


def test_corrupt_last_pt_names_a_resume_that_works(tmp_path, capsys):
    assert train_cli.main(tiny_args(tmp_path, steps=12)) == 0
    last = run_dir(tmp_path) / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    err = one_line_error(capsys, tiny_args(tmp_path, "--resume", steps=14))
    assert "truncated or corrupt" in err and "--resume-from" in err
    assert train_cli.main([*tiny_args(tmp_path, steps=14), *advised_command(err)]) == 0
    assert load_checkpoint(last)["step"] == 14


# ------------------------------------------------------------------ 20. messages that mislead
def test_inner_loop_blow_up_advises_the_inner_rate(tmp_path, capsys):
    err = one_line_error(capsys, [*tiny_args(tmp_path, steps=5), "--inner-lr", "1e30"])
    assert "non-finite loss at step 1" in err and "the MAML inner loop diverged" in err
    assert "--inner-lr 1e+29" in err and "--lr 0.0001" not in err


def test_too_long_a_run_name_says_so(tmp_path, capsys):
    err = one_line_error(capsys, tiny_args(tmp_path, name="r" * 250, steps=2))
    assert "too long" in err and "--run-name" in err and "writable" not in err


def test_run_names_that_a_shell_would_split_are_quoted_or_refused(tmp_path, capsys):
    assert train_cli.main(tiny_args(tmp_path, name="my run", steps=2)) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("evaluate with: "))
    words = shlex.split(line.removeprefix("evaluate with: "))
    assert words[:2] == ["kml-eval", "--checkpoint"] and Path(words[2]).is_file() and len(words) == 3
    err = one_line_error(capsys, tiny_args(tmp_path, name="a\nb", steps=2))
    assert "control character" in err or "not a plain folder name" in err
    assert not list((tmp_path / "train_dir").glob("a*"))


def test_non_finite_loss_advice_quotes_the_run_folder(tmp_path, capsys, monkeypatch):
    real = trainer_module.accumulate_meta_gradient

    def nan_at_once(*args, **kwargs):
        output = real(*args, **kwargs)
        output.loss = output.loss * torch.nan
        return output

    monkeypatch.setattr(trainer_module, "accumulate_meta_gradient", nan_at_once)
    err = one_line_error(capsys, tiny_args(tmp_path, name="my run", steps=5))
    assert "--run-name 'my run' --lr 0.0001" in err


# ------------------------------------------------------------------ 9. a cache converted again
def _remake(manifest: Path, **changes) -> None:
    """Edit a cache's manifest as converting it again with other options would (the split rule, preprocessing)."""
    values = json.loads(manifest.read_text())
    values["info"].update(changes)
    manifest.write_text(json.dumps(values))


def test_caches_converted_again_are_refused_by_eval_and_resume(tmp_path, capsys):
    from kml.cli import evaluate as eval_cli

    assert train_cli.main(tiny_args(tmp_path, steps=2)) == 0
    checkpoint = run_dir(tmp_path) / "checkpoints" / "last.pt"
    recorded = load_checkpoint(checkpoint)["data"]
    assert [i["mode"] for i in recorded["train"]] == ["glyphs", "textures", "shapes"] and recorded["val"]
    cache = tmp_path / "data" / "cache"
    eval_args = ["--checkpoint", str(checkpoint), "--episodes", "2", "--no-progress"]
    assert eval_cli.main(eval_args) == 0  # the caches it trained on: evaluated
    _remake(cache / "textures" / "test" / "manifest.json", split="vinyals")
    err = one_line_error(capsys, eval_args, eval_cli)
    assert "the textures cache is not the one this run was trained on (split: the run's None, now 'vinyals')" in err
    assert "delete that mode's cache folder to rebuild it" in err and "--data-root" in err  # a generated mode
    _remake(cache / "glyphs" / "train" / "manifest.json", preprocessing="inverted twice")
    err = one_line_error(capsys, tiny_args(tmp_path, "--resume", steps=4))
    assert "the glyphs cache is not the one this run was trained on (preprocessing" in err


def test_a_cache_with_other_classes_is_refused_on_the_same_split():
    from kml.data.store import ImageStore, check_same_cache
    from kml.errors import KMLError

    images = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    one = ImageStore.from_arrays(images, torch.tensor([0, 0, 1, 1]), class_names=["a", "b"], mode="m", split="test")
    other = ImageStore.from_arrays(images, torch.tensor([0, 0, 1, 1]), class_names=["a", "c"], mode="m", split="test")
    check_same_cache(one.identity(), one.identity())
    with pytest.raises(KMLError, match="its test classes or their images differ"):
        check_same_cache(one.identity(), other.identity())


def test_cache_identity_ignores_where_an_archive_came_from():
    from kml.data.store import ImageStore, check_same_cache
    from kml.errors import KMLError

    def store(origin: str, checksum: str) -> ImageStore:
        info = {"split": "published", "sources": {"a.zip": {"checksum": checksum, "origin": origin}}}
        images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
        return ImageStore.from_arrays(images, [0, 1], mode="omniglot", split="train", info=info)

    check_same_cache(store("https://mirror", "md5:1").identity(), store("found at /data/raw/a.zip", "md5:1").identity())
    with pytest.raises(KMLError, match="sources: the run's"):
        check_same_cache(store("https://mirror", "md5:1").identity(), store("https://mirror", "md5:2").identity())


def test_resume_from_an_earlier_step_makes_it_the_run_last_checkpoint(tmp_path):
    assert train_cli.main(tiny_args(tmp_path, "--checkpoint-every", "2", steps=4)) == 0
    checkpoints = run_dir(tmp_path) / "checkpoints"
    assert load_checkpoint(checkpoints / "last.pt")["step"] == 4
    assert train_cli.main(tiny_args(tmp_path, "--resume", "--resume-from", "step_000002.pt", steps=2)) == 0
    assert load_checkpoint(checkpoints / "last.pt")["step"] == 2  # a plain --resume now continues from step 2


def test_protonet_configs_saved_with_maml_settings_still_load():
    from kml.config import LearnerConfig

    saved = {**LearnerConfig(algorithm="protonet").to_dict(), "inner_grad_clamp": 20.0, "mode_inner_lr": [0.1]}
    config = LearnerConfig.from_dict(saved)  # kml 0.2 recorded them; they never acted on ProtoNet
    assert config.inner_grad_clamp is None and config.mode_inner_lr is None
