"""kml-train / kml-eval: run files, resume, signals, evaluation protocol, DDP, bad input; the Trainer in Python."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from kml.algorithms import LearnerOutput
from kml.cli import evaluate as eval_cli
from kml.cli import train as train_cli
from kml.errors import KMLError
from kml.runtime import bf16_native
from kml.training.checkpoint import load_checkpoint

TINY = [
    "--modes",
    "synthetic",
    "--image-size",
    "16",
    "--base-channels",
    "8",
    "--encoder-channels",
    "8",
    "--meta-batch",
    "3",
    "--queries",
    "3",
    "--inner-steps",
    "1",
    "--eval-inner-steps",
    "1",
    "--log-every",
    "5",
    "--val-every",
    "10",
    "--val-episodes",
    "6",
    "--checkpoint-every",
    "10",
    "--no-progress",
    "--inner-lr",
    "0.1",
]


def tiny_args(tmp_path: Path, *extra: str, steps: int = 20, name: str = "run") -> list[str]:
    tiny, maml_only = TINY, {"--inner-steps", "--eval-inner-steps", "--inner-lr"}
    if "protonet" in extra:  # ProtoNet has no inner loop, and a setting that does nothing is refused
        tiny = [word for i, word in enumerate(TINY) if not {word, TINY[i - 1]} & maml_only]
    return [
        *tiny,
        "--steps",
        str(steps),
        "--train-dir",
        str(tmp_path / "train_dir"),
        "--run-name",
        name,
        "--data-root",
        str(tmp_path / "data"),
        *extra,
    ]


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def read_metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(handle)]


def eval_report(folder: Path, pattern: str = "eval_last_test_*.json") -> Path:
    """The one kml-eval report in ``folder`` whose name matches ``pattern`` (named by the evaluation's settings)."""
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def one_line_error(capsys, argv, cli=train_cli) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_short_run_writes_all_files_and_improves(tmp_path):
    assert train_cli.main(tiny_args(tmp_path, "--lr", "0.003", steps=60)) == 0
    run = tmp_path / "train_dir" / "run"
    for name in (
        "config.json",
        "metrics.csv",
        "log.txt",
        "validation.csv",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "checkpoints/step_000060.pt",
    ):
        assert (run / name).is_file(), name
    # the newest 3 periodic checkpoints are kept (--keep-checkpoints)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == [f"step_0000{s}.pt" for s in (40, 50, 60)]
    assert list((run / "tensorboard").iterdir())
    config = json.loads((run / "config.json").read_text())
    assert config["versions"]["torch"] == torch.__version__ and config["modes"] == ["glyphs", "textures", "shapes"]
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == list(range(5, 61, 5))
    assert {"accuracy_glyphs", "accuracy_textures", "accuracy_shapes", "lr"} <= set(rows[0])
    first = sum(float(r["loss"]) for r in rows[:2]) / 2
    last = sum(float(r["loss"]) for r in rows[-2:]) / 2
    assert last < first, (first, last)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    from kml.training import launch

    assert train_cli.main(tiny_args(tmp_path, name="full", steps=20)) == 0

    def stop_at_7(trainer, step, episode):
        if step == 7:
            trainer._stop_signal = signal.SIGTERM  # what the SIGTERM handler does

    original_create = launch.create_run

    def create_with_stop(*args, **kwargs):
        trainer = original_create(*args, **kwargs)
        trainer.callbacks.append(stop_at_7)
        return trainer

    launch.create_run = create_with_stop
    try:
        assert train_cli.main(tiny_args(tmp_path, name="cut", steps=20)) == 130
    finally:
        launch.create_run = original_create
    cut = tmp_path / "train_dir" / "cut"
    assert load_checkpoint(cut / "checkpoints" / "last.pt")["step"] == 7
    assert train_cli.main(tiny_args(tmp_path, "--resume", name="cut", steps=20)) == 0
    full = tmp_path / "train_dir" / "full"
    assert read_metrics(cut) == read_metrics(full)
    a = load_checkpoint(full / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(cut / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A crash after step 10's checkpoint: the rows logged after it (metrics and validation at step 20) are
    # logged again on resume, and must not appear twice.
    shutil.copy(cut / "checkpoints" / "step_000010.pt", cut / "checkpoints" / "last.pt")
    assert train_cli.main(tiny_args(tmp_path, "--resume", name="cut", steps=20)) == 0
    assert read_metrics(cut) == read_metrics(full)
    assert (cut / "validation.csv").read_text() == (full / "validation.csv").read_text()


def test_sigterm_leaves_loadable_checkpoint(tmp_path):
    args = tiny_args(tmp_path, name="term", steps=100000)
    process = subprocess.Popen([sys.executable, "-m", "kml.cli.train", *args], stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "train_dir" / "term" / "metrics.csv"
    deadline = time.time() + 120
    while not metrics.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert metrics.is_file(), process.stderr.read() if process.poll() is not None else "no metrics in time"
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 130
    state = load_checkpoint(tmp_path / "train_dir" / "term" / "checkpoints" / "last.pt")
    assert state["step"] >= 5 and "optimizer" in state and "sampler" in state


def test_eval_twice_identical_and_table(tmp_path, capsys):
    assert train_cli.main(tiny_args(tmp_path, steps=10)) == 0
    checkpoint = tmp_path / "train_dir" / "run" / "checkpoints" / "last.pt"
    argv = ["--checkpoint", str(checkpoint), "--episodes", "12", "--no-progress"]
    assert eval_cli.main(argv) == 0
    out = capsys.readouterr().out
    report_path = eval_report(checkpoint.parent)
    assert report_path.name == "eval_last_test_5w1s3q_12ep_seed0_inner1.json"
    first = report_path.read_text()
    assert eval_cli.main(argv) == 0
    second = eval_report(checkpoint.parent).read_text()  # the same evaluation: the same file, rewritten
    assert first == second
    report = json.loads(first)
    assert [r["mode"] for r in report["results"]] == ["glyphs", "textures", "shapes", "average"]
    assert all(0 <= r["accuracy"] <= 100 and r["episodes"] for r in report["results"])
    assert "average" in out and "±" in out
    assert report_path.with_suffix(".csv").is_file()


@pytest.mark.slow
def test_torchrun_two_processes_match_single(tmp_path):
    extra = ("--meta-batch", "4", "--checkpoint-every", "1", "--val-every", "100", "--log-every", "1")
    assert train_cli.main(tiny_args(tmp_path, *extra, steps=1, name="single")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        free_port(),
        "-m",
        "kml.cli.train",
        *tiny_args(tmp_path, *extra, steps=1, name="ddp"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    single = load_checkpoint(tmp_path / "train_dir" / "single" / "checkpoints" / "last.pt")
    a, b = single["model"], load_checkpoint(tmp_path / "train_dir" / "ddp" / "checkpoints" / "last.pt")["model"]
    # the single run's gradients, from Adam's first moment (exp_avg = (1 - beta1) g); these learners keep no buffers
    assert len(a) == len(single["optimizer"]["state"])
    gradient = {key: single["optimizer"]["state"][i]["exp_avg"] / 0.1 for i, key in enumerate(a)}
    # Conv biases and KML bias shifts feed a batch-statistics BatchNorm: their true gradient is 0, so what
    # Adam's first step does with their rounding-noise gradients differs between any two reductions.
    normalised_away = re.compile(r"(backbone\.conv\d\.bias|generator\.layers\.\d\.beta\.)")
    compared = [key for key in a if not normalised_away.search(key)]
    assert len(compared) > len(a) // 2
    # float32 (kml-train has no float64 mode). Adam's first step moves each entry by lr * g / (|g| + eps) = +-lr
    # (1e-3) wherever |g| >> eps, whatever the float32 rounding of g (one process and two sum in other orders):
    # the runs agree to the float32 rounding of the parameters (~1e-7), and an entry stepped the wrong way is 2e-3 off.
    # An entry whose gradient cancels to within ~10 eps of zero (1e-7: measured, one in 18,432 of conv4.weight) takes
    # a step that depends on that rounding: those entries are left out, and they must stay rare.
    for key in compared:
        # exactly 0 (taps that see only padding) takes no step in either run; at least 100 eps: +-lr within 1%
        settled = (gradient[key] == 0) | (gradient[key].abs() > 1e-6)
        assert settled.float().mean() > 0.99, key
        assert torch.allclose(a[key][settled], b[key][settled], atol=1e-5, rtol=1e-4), key
    loss_single = float(read_metrics(tmp_path / "train_dir" / "single")[0]["loss"])
    loss_ddp = float(read_metrics(tmp_path / "train_dir" / "ddp")[0]["loss"])
    # float32: the same tasks' losses, batched 4 together or 2 per process: they differ by float32 rounding only
    assert loss_ddp == pytest.approx(loss_single, rel=1e-5)


# ---------------------------------------------------------------- bad input
def test_unknown_mode_and_flag_value(tmp_path, capsys):
    err = one_line_error(capsys, ["--modes", "mnist"])
    assert "unknown mode 'mnist'; known modes: omniglot" in err
    err = one_line_error(capsys, ["--modes", "synthetic", "--algorithm", "reptile"])
    assert "invalid choice: 'reptile'" in err and "maml" in err and "protonet" in err
    err = one_line_error(capsys, tiny_args(tmp_path, "--compile", name="compiled"))
    assert "--compile cannot run second-order MAML" in err


def test_missing_dataset_cache_names_download_command(tmp_path, capsys):
    err = one_line_error(
        capsys, ["--modes", "omniglot", "--data-root", str(tmp_path), "--train-dir", str(tmp_path / "t")]
    )
    assert f"kml-download --datasets omniglot --root {tmp_path}" in err  # the command that works anywhere


def test_existing_run_refused_without_resume_or_overwrite(tmp_path, capsys):
    assert train_cli.main(tiny_args(tmp_path, steps=2)) == 0
    err = one_line_error(capsys, tiny_args(tmp_path, steps=2))
    assert "already exists; pass --resume" in err and "--overwrite" in err
    assert train_cli.main(tiny_args(tmp_path, "--overwrite", steps=2)) == 0


def test_resume_with_other_method_refused(tmp_path, capsys):
    assert train_cli.main(tiny_args(tmp_path, steps=2)) == 0
    err = one_line_error(capsys, tiny_args(tmp_path, "--resume", "--modulation", "film", steps=4))
    assert "cannot resume" in err and "modulation" in err


def test_bad_checkpoints(tmp_path, capsys):
    err = one_line_error(capsys, ["--checkpoint", str(tmp_path / "nope.pt")], eval_cli)
    assert "not found" in err
    assert train_cli.main(tiny_args(tmp_path, steps=2)) == 0
    checkpoint = tmp_path / "train_dir" / "run" / "checkpoints" / "last.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    err = one_line_error(capsys, ["--checkpoint", str(truncated)], eval_cli)
    assert "truncated or corrupt" in err
    state = torch.load(checkpoint, weights_only=False)
    state.pop("checksum")  # an edited checkpoint: without its (now stale) checksum it loads, and the shapes are named
    first = next(iter(state["model"]))
    state["model"][first] = torch.zeros(3, 3)
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    err = one_line_error(capsys, ["--checkpoint", str(wrong)], eval_cli)
    assert "does not fit this model" in err and first in err


def test_out_of_memory_suggests_task_chunks(tmp_path, capsys, monkeypatch):
    from kml.training.trainer import Trainer

    def boom(self, episode):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Trainer, "train_step", boom)
    err = one_line_error(capsys, tiny_args(tmp_path, steps=2))
    assert "out of GPU memory" in err and "--resume" in err and "--task-chunk 1" in err  # meta-batch 3: chunks of 1


def test_non_finite_loss_stops_with_step(tmp_path, capsys):
    err = one_line_error(capsys, tiny_args(tmp_path, "--lr", "1e30", "--inner-lr", "1e30", steps=50))
    assert "non-finite loss at step" in err
    assert (tmp_path / "train_dir" / "run" / "checkpoints" / "last.pt").is_file()


def test_bf16_where_the_hardware_lacks_it_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kml.runtime.precision.bf16_native", lambda device: False)
    err = one_line_error(capsys, tiny_args(tmp_path, "--bf16", steps=2))
    assert "--bf16 needs bf16 arithmetic in hardware" in err


@pytest.mark.skipif(not bf16_native("cpu"), reason="no native bf16 on this CPU")
def test_bf16_run_trains_and_resumes_in_float32_where_bf16_is_missing(tmp_path, capsys, monkeypatch):
    assert train_cli.main(tiny_args(tmp_path, "--bf16", steps=10)) == 0
    rows = read_metrics(tmp_path / "train_dir" / "run")
    assert rows and all(math.isfinite(float(row["loss"])) for row in rows)
    checkpoint = str(tmp_path / "train_dir" / "run" / "checkpoints" / "last.pt")
    assert eval_cli.main(["--checkpoint", checkpoint, "--episodes", "3", "--no-progress"]) == 0
    checkpoints = tmp_path / "train_dir" / "run" / "checkpoints"
    assert json.loads(eval_report(checkpoints, "eval_last_test_*_bf16.json").read_text())["precision"] == "bf16"
    for name in ("kml.runtime.precision.bf16_native", "kml.runtime.bf16_native"):  # another machine
        monkeypatch.setattr(name, lambda device: False)
    err = one_line_error(capsys, tiny_args(tmp_path, "--resume", steps=15))
    assert "add --no-bf16" in err
    assert train_cli.main(tiny_args(tmp_path, "--resume", "--no-bf16", steps=15)) == 0
    assert int(read_metrics(tmp_path / "train_dir" / "run")[-1]["step"]) == 15
    assert eval_cli.main(["--checkpoint", checkpoint, "--episodes", "3", "--no-progress"]) == 0
    # another precision, other numbers: a report of its own beside the bf16 one
    float32 = [p for p in checkpoints.glob("eval_last_test_*.json") if not p.name.endswith("_bf16.json")]
    assert len(float32) == 1 and json.loads(float32[0].read_text())["precision"] == "float32"


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", [("--algorithm", "protonet"), ("--first-order",)], ids=["protonet", "first-order-maml"]
)
def test_compiled_run_matches_eager(tmp_path, method):
    """torch.compile (slow to compile on CPU, hence -m slow) trains to the same losses as the eager learner."""
    args = (*method, "--steps", "3")
    assert train_cli.main(tiny_args(tmp_path, *args, "--log-every", "1", name="eager")) == 0
    assert train_cli.main(tiny_args(tmp_path, *args, "--log-every", "1", "--compile", name="compiled")) == 0
    eager, compiled = (read_metrics(tmp_path / "train_dir" / name) for name in ("eager", "compiled"))
    assert len(eager) == len(compiled) == 3
    # float32: torch.compile is a speed path of kml-train, which trains in float32 only. Inductor's fused kernels sum
    # in another order, and after each Adam step the two runs train from parameters that differ by that rounding.
    for a, b in zip(eager, compiled):
        assert math.isclose(float(a["loss"]), float(b["loss"]), rel_tol=1e-3)


@pytest.mark.slow
def test_torchrun_stops_every_rank_when_one_is_signalled(tmp_path):
    """SIGTERM to rank 1 only: rank 0, which writes the files, learns it in the step's all-reduce, stops after the
    same step and saves (before, it went on into an all-reduce that rank 1 never joined)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        free_port(),
        "-m",
        "kml.cli.train",
        *tiny_args(tmp_path, "--meta-batch", "4", name="ddp-term", steps=100000),
    ]
    launcher = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "train_dir" / "ddp-term" / "metrics.csv"
    deadline = time.time() + 180
    while not metrics.is_file() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.2)
    assert metrics.is_file(), launcher.stderr.read() if launcher.poll() is not None else "no metrics in time"
    workers = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    rank1 = [
        pid for pid in workers if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes().replace(b"LOCAL_RANK", b"")
    ]
    assert len(workers) == 2 and len(rank1) == 1
    os.kill(int(rank1[0]), signal.SIGTERM)
    try:
        launcher.wait(120)
    except subprocess.TimeoutExpired:
        launcher.kill()
        pytest.fail("a rank kept waiting for its signalled peer")
    state = load_checkpoint(tmp_path / "train_dir" / "ddp-term" / "checkpoints" / "last.pt")
    log = (tmp_path / "train_dir" / "ddp-term" / "log.txt").read_text()
    assert f"stopped at step {state['step']} because another rank was signalled;" in log


# ---------------------------------------------------------------- the Trainer in Python: composed runs
class TinyProtoNet(nn.Module):
    """A learner kml knows nothing of: prototypes of a small conv encoder, squared-distance logits."""

    def __init__(self, channels: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, episode) -> LearnerOutput:
        tasks, ways = episode.num_tasks, episode.ways
        support = self.encoder(episode.support_x.flatten(0, 1)).view(tasks, ways, episode.shots, -1)
        query = self.encoder(episode.query_x.flatten(0, 1)).view(tasks, ways * episode.queries, -1)
        logits = -torch.cdist(query, support.mean(2)).pow(2)  # [T, N*Q, N]; support is class-major
        task_loss = nn.functional.cross_entropy(logits.transpose(1, 2), episode.query_y, reduction="none").mean(1)
        task_accuracy = (logits.argmax(-1) == episode.query_y).float().mean(1)
        return LearnerOutput(task_loss.mean(), task_loss, task_accuracy.detach())


@pytest.fixture(scope="module")
def glyph_root(tmp_path_factory) -> Path:
    """A data root holding the glyphs and textures synthetic modes (generated once for the module)."""
    from kml.data.modes import load_stores

    root = tmp_path_factory.mktemp("data")
    for split in ("train", "val"):
        load_stores(["glyphs", "textures"], split, root, 16, 3, "cpu")
    return root


def custom_parts(root: Path):
    """A custom learner, kml's sampler on two synthetic modes, AdamW, no scheduler."""
    from kml.data.modes import load_stores
    from kml.data.sampler import MixtureSampler

    torch.manual_seed(0)
    sampler = MixtureSampler(
        load_stores(["glyphs", "textures"], "train", root, 16, 3, "cpu"),
        5,
        1,
        3,
        4,
        rotate=[True, False],
        seed=0,
        dtype=torch.uint8,
    )
    learner = TinyProtoNet()
    return learner, sampler, torch.optim.AdamW(learner.parameters(), lr=3e-3)


CUSTOM_SETTINGS = {"log_every": 2, "val_every": 4, "val_episodes": 4, "checkpoint_every": 4}


def test_custom_learner_trains_logs_checkpoints_and_resumes_exactly(tmp_path, glyph_root, capsys):
    from kml.data.modes import load_stores
    from kml.training import Trainer

    val = load_stores(["glyphs", "textures"], "val", glyph_root, 16, 3, "cpu")
    full = tmp_path / "full"
    trainer = Trainer(
        *custom_parts(glyph_root), run_dir=full, val_stores=val, steps=10, progress=False, **CUSTOM_SETTINGS
    )
    assert trainer.custom and trainer.learner_name == f"{__name__}.TinyProtoNet"
    assert trainer.fit() == full / "checkpoints" / "last.pt" and not trainer.interrupted
    for name in (
        "config.json",
        "metrics.csv",
        "log.txt",
        "validation.csv",
        "checkpoints/best.pt",
        "checkpoints/step_000008.pt",
    ):
        assert (full / name).is_file(), name
    rows = read_metrics(full)
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10]
    assert {"accuracy_glyphs", "accuracy_textures"} <= set(rows[0]) and {float(r["lr"]) for r in rows} == {3e-3}
    assert [line.split(",")[0] for line in (full / "validation.csv").read_text().splitlines()[1:]] == ["4"] * 3 + [
        "8"
    ] * 3 + ["10"] * 3
    state = load_checkpoint(full / "checkpoints" / "last.pt")
    assert state["step"] == 10 and state["scheduler"] is None
    assert state["config"]["custom_learner"] == trainer.learner_name and state["config"]["steps"] == 10
    assert json.loads((full / "config.json").read_text())["custom_learner"] == trainer.learner_name

    # A real SIGTERM after step 5 stops the run with last.pt saved; resuming in a new Trainer (built the same way,
    # settings from the checkpoint) ends bit-identical to the uninterrupted run, its logs included.
    cut = tmp_path / "cut"
    trainer = Trainer(
        *custom_parts(glyph_root), run_dir=cut, val_stores=val, steps=10, progress=False, **CUSTOM_SETTINGS
    )
    trainer.callbacks.append(lambda trainer, step, episode: step == 5 and os.kill(os.getpid(), signal.SIGTERM))
    trainer.fit()
    assert trainer.interrupted and load_checkpoint(cut / "checkpoints" / "last.pt")["step"] == 5
    resumed = Trainer(*custom_parts(glyph_root), run_dir=cut, val_stores=val, resume=True, progress=False)
    assert resumed.step == 5 and resumed.config.steps == 10 and resumed.config.log_every == 2
    resumed.fit()
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(cut / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert read_metrics(cut) == read_metrics(full)
    assert (cut / "validation.csv").read_text() == (full / "validation.csv").read_text()

    # kml's commands cannot rebuild a custom learner: one line naming it and saying how to load it in Python
    err = one_line_error(capsys, ["--checkpoint", str(cut / "checkpoints" / "last.pt")], eval_cli)
    assert "holds a custom learner (test_training.TinyProtoNet)" in err and "load_state_dict" in err
    err = one_line_error(capsys, ["--resume", "--train-dir", str(tmp_path), "--run-name", "cut", "--no-progress"])
    assert "custom learner (test_training.TinyProtoNet)" in err and "resume=True" in err
    with pytest.raises(KMLError, match="already exists; pass resume=True to continue it or overwrite=True"):
        Trainer(*custom_parts(glyph_root), run_dir=cut, steps=10)


def test_trainer_composed_of_kml_train_parts_matches_kml_train(tmp_path):
    """kml-train's run, composed by hand (no config: a custom run) and from its config: the same numbers."""
    import dataclasses

    from kml.algorithms import build_learner
    from kml.data.modes import ROTATED_BY_DEFAULT, load_stores
    from kml.data.sampler import MixtureSampler
    from kml.training import Trainer
    from kml.training.schedule import build_scheduler

    extra = ("--lr-halve-every", "3")  # the schedule halves during the run
    assert train_cli.main(tiny_args(tmp_path, *extra, steps=6, name="cli")) == 0
    values = vars(train_cli.build_parser().parse_args(tiny_args(tmp_path, *extra, steps=6, name="config")))
    values.pop("progress")
    config = train_cli.config_from_values(values).resolved()
    Trainer.from_config(config, progress=False).fit()

    torch.manual_seed(config.seed)
    stores = load_stores(config.modes, "train", config.data_root, config.image_size, 3, "cpu")
    sampler = MixtureSampler(
        stores,
        config.ways,
        config.shots,
        config.queries,
        config.meta_batch,
        rotate=[mode in ROTATED_BY_DEFAULT for mode in config.modes],
        seed=config.seed,
        dtype=torch.uint8,
    )
    learner = build_learner(dataclasses.replace(config.learner, image_size=16, in_channels=3))
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.lr)
    parts = tmp_path / "train_dir" / "parts"
    Trainer(
        learner,
        sampler,
        optimizer,
        build_scheduler(optimizer, config),
        run_dir=parts,
        steps=6,
        log_every=5,
        checkpoint_every=10,
        progress=False,
    ).fit()

    runs = tmp_path / "train_dir"
    reference = load_checkpoint(runs / "cli" / "checkpoints" / "last.pt")
    assert "custom_learner" not in reference["config"]
    for name in ("config", "parts"):
        state = load_checkpoint(runs / name / "checkpoints" / "last.pt")
        assert all(torch.equal(reference["model"][k], state["model"][k]) for k in reference["model"]), name
        assert read_metrics(runs / name) == read_metrics(runs / "cli"), name


def test_trainer_refuses_unknown_settings_and_incomplete_samplers(tmp_path):
    from kml.training import Trainer

    learner = TinyProtoNet()
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"unknown settings \['stpes'\]"):
        Trainer(learner, object(), optimizer, run_dir=tmp_path / "run", stpes=3)
    with pytest.raises(TypeError, match="has no sample, mode_names, state_dict, load_state_dict"):
        Trainer(learner, object(), optimizer, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_every_kml_train_setting_reaches_the_trainer(tmp_path, glyph_root):
    """Transference recording (and every loop setting of kml-train) from kml.Trainer in Python, without a scheduler;
    the settings its parts decide are named as theirs."""
    from kml.config.run import RunConfig
    from kml.training import Trainer
    from kml.training.settings import LOOP_SETTINGS, PART_SETTINGS

    run_fields = {f for f in RunConfig.__dataclass_fields__} - {"recipe", "recipe_overrides"}
    assert set(LOOP_SETTINGS) | set(PART_SETTINGS) == run_fields  # none left unreachable
    _, sampler, _ = custom_parts(glyph_root)
    learner = TinyProtoNet()
    learner.encoder[1] = nn.BatchNorm2d(8, track_running_stats=False)  # the analyzer vmaps over tasks: no running stats
    optimizer = torch.optim.AdamW(learner.parameters(), lr=3e-3)
    trainer = Trainer(learner, sampler, optimizer, run_dir=tmp_path / "run", transference_every=2, progress=False)
    trainer.fit(4)
    rows = list(csv.DictReader((tmp_path / "run" / "transference.csv").open()))
    assert {row["step"] for row in rows} == {"2", "4"}
    assert trainer.config.transference_every == 2 and trainer.config.meta_batch == 4
    with pytest.raises(TypeError, match="lr is the optimizer's and scheduler's"):
        Trainer(*custom_parts(glyph_root), run_dir=tmp_path / "other", lr=0.1)


class SaysItsSettings(TinyProtoNet):
    """A custom learner that follows kml's Learner protocol, so it says its method and settings."""

    backend = "auto"

    def predict(self, support_x, support_y, query_x, **options):
        raise NotImplementedError

    def inner_parameter_names(self) -> list[str]:
        return []

    def settings(self) -> dict:
        return {"method": "protonet", "hidden": 8, "model": f"{__name__}.TinyProtoNet"}


def test_custom_run_records_model_method_settings_and_modes(tmp_path, glyph_root):
    from kml.training import Trainer

    _, sampler, _ = custom_parts(glyph_root)
    for learner, said in ((SaysItsSettings(), True), (TinyProtoNet(), False)):
        run = tmp_path / type(learner).__name__
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.01)
        Trainer(learner, sampler, optimizer, run_dir=run, steps=1, progress=False).fit()
        config = json.loads((run / "config.json").read_text())
        assert config["custom_learner"] == f"{__name__}.{type(learner).__name__}"
        assert config["modes"] == ["glyphs", "textures"] and config["steps"] == 1
        assert config.get("learner") == (learner.settings() if said else None)
        assert load_checkpoint(run / "checkpoints" / "last.pt")["config"] == {
            k: v for k, v in config.items() if k != "versions"
        }


def test_library_layers_and_messages_compose_no_command_line():
    """kml/training words no kml-train command (the CLI does) and imports neither kml.cli nor kml.results; nothing
    under kml/ but kml/cli imports kml.cli."""
    root = Path(__file__).resolve().parent.parent / "kml"
    for path in root.rglob("*.py"):
        text = path.read_text()
        inside = path.relative_to(root).parts[0]
        if inside != "cli":
            assert not re.search(r"^\s*(from|import) kml\.cli", text, re.M), path
        if inside == "training":
            assert not re.search(r"^\s*(from|import) kml\.results", text, re.M), path
            assert "kml-train --" not in text, path


def test_continue_run_advice_is_python_in_python_and_a_command_on_a_command_line(tmp_path):
    import shlex

    from kml.cli.common import continue_command
    from kml.training.advice import ContinueRun

    run = tmp_path / "my run"
    advice = ContinueRun("stopped; continue: ", run, python="Trainer.resume(...)", changes={"lr": 0.0001}, after=" (!)")
    assert str(advice) == "stopped; continue: Trainer.resume(...) (!)"
    command = f"kml-train --resume --train-dir {shlex.quote(str(tmp_path))} --run-name 'my run' --lr 0.0001"
    assert continue_command(advice) == command
    assert str(advice.worded(command)) == f"stopped; continue: {command} (!)"


def test_custom_run_recorded_by_an_earlier_kml_resumes_and_is_overwritten(tmp_path, glyph_root):
    """A custom run's record before the loop read a RunConfig (no modes, learner, meta_batch; val_tasks_per_batch)."""
    from kml.training import Trainer
    from kml.training.checkpoint import save_checkpoint

    run, copy = tmp_path / "old", tmp_path / "copy"
    Trainer(*custom_parts(glyph_root), run_dir=run, steps=2, log_every=1, checkpoint_every=2, progress=False).fit()
    old = {
        **dict(custom_learner=f"{__name__}.TinyProtoNet", steps=2, log_every=1, val_every=1000, val_episodes=300),
        **dict(checkpoint_every=2, grad_clip=None, task_chunk=None, bf16=False, compile=False, seed=0),
        **dict(ways=5, shots=1, queries=3, val_tasks_per_batch=4),
    }
    last = run / "checkpoints" / "last.pt"
    state = {k: v for k, v in load_checkpoint(last).items() if k not in ("format", "version")}
    save_checkpoint(last, {**state, "config": old})
    (run / "config.json").write_text(json.dumps({**old, "versions": {"kml": "0.2.0"}}))
    shutil.copytree(run, copy)
    resumed = Trainer(*custom_parts(glyph_root), run_dir=run, resume=True, progress=False)
    assert (resumed.step, resumed.config.steps, resumed.config.log_every, resumed.config.meta_batch) == (2, 2, 1, 4)
    resumed.fit(3)
    assert [r["step"] for r in read_metrics(run)] == ["1", "2", "3"]
    Trainer(*custom_parts(glyph_root), run_dir=copy, overwrite=True, steps=1, progress=False).fit()  # a kml run
    assert load_checkpoint(copy / "checkpoints" / "last.pt")["step"] == 1
