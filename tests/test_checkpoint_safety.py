"""A checkpoint cannot run code: every entry point reads with ``torch.load(weights_only=True)`` (issue 22).

A malicious pickle (a ``__reduce__`` that would create a file) goes through kml-eval, kml-transference,
kml-train --resume, kml-results and the library's loaders: the file is never created, and each refuses in one
line. A trusted checkpoint that needs code converts once with kml-convert-checkpoint --trust.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import one_line_error, tiny_args

from kml.cli import convert_checkpoint as convert_cli
from kml.cli import evaluate as eval_cli
from kml.cli import results as results_cli
from kml.cli import train as train_cli
from kml.cli import transference as transference_cli
from kml.errors import KMLError
from kml.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint,
    load_learner,
    save_checkpoint,
)


class CreatesFile:
    """Unpickling this calls ``os.system('touch <marker>')``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious(path: Path, marker: Path, kind: str = "torch") -> Path:
    """A file shaped like a kml checkpoint whose unpickling would create ``marker``."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 1, "payload": CreatesFile(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torch":
        torch.save(state, path)
    else:  # a bare pickle of protocol 2 or 5, as torch.load's legacy reader accepts
        path.write_bytes(pickle.dumps(state, protocol=int(kind[-1])))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step tiny KML-MAML run (its folder is the tmp folder's ``train_dir/run``)."""
    tmp = tmp_path_factory.mktemp("safety")
    assert train_cli.main(tiny_args(tmp, steps=2)) == 0
    return tmp


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "the checkpoint's code ran"


def assert_refused(err: str, kind: str = "torch") -> None:
    if kind == "pickle5":  # the weights-only reader stops at protocol 5's framing, before any name is read
        assert "cannot be read as tensors and plain values" in err, err
    else:
        assert "needs code to load (it names posix.system)" in err or "(it names os.system)" in err, err
    assert "kml-convert-checkpoint" in err and "--trust" in err


def test_kml_writes_checkpoints_that_load_weights_only(trained):
    state = torch.load(trained / "train_dir" / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["step"] == 2


def test_checkpoints_of_kml_0_2_load_as_they_are(trained, tmp_path):
    """kml 0.1 and 0.2 recorded ``torch.__version__`` itself (a TorchVersion, a str subclass): still readable."""
    state = load_checkpoint(trained / "train_dir" / "run" / "checkpoints" / "last.pt")
    state = {k: v for k, v in state.items() if k not in ("format", "version")}
    state["versions"] = {**state["versions"], "torch": torch.__version__}
    assert type(state["versions"]["torch"]) is not str
    save_checkpoint(tmp_path / "old.pt", state)
    assert load_checkpoint(tmp_path / "old.pt")["versions"]["torch"] == str(torch.__version__)
    with pytest.raises(pickle.UnpicklingError):  # what kml 0.2's files need beyond tensors and plain values
        torch.load(tmp_path / "old.pt", weights_only=True)


@pytest.mark.parametrize("kind", ["torch", "pickle2", "pickle5"])
def test_library_loaders_refuse_code(tmp_path, marker, kind):
    evil = write_malicious(tmp_path / "evil.pt", marker, kind)
    for load in (load_checkpoint, lambda path: load_learner(path, "cpu")):
        with pytest.raises(KMLError) as error:
            load(evil)
        assert "\n" not in str(error.value)
        assert_refused(str(error.value), kind)


def test_kml_eval_refuses_code(tmp_path, marker, capsys):
    evil = write_malicious(tmp_path / "evil.pt", marker)
    assert_refused(one_line_error(capsys, ["--checkpoint", str(evil), "--no-progress"], eval_cli))


def test_kml_transference_refuses_code(tmp_path, marker, capsys):
    evil = write_malicious(tmp_path / "evil.pt", marker)
    assert_refused(one_line_error(capsys, ["--checkpoint", str(evil)], transference_cli))


def test_kml_train_resume_refuses_code(trained, tmp_path, marker, capsys):
    shutil.copytree(trained / "train_dir", tmp_path / "train_dir")
    write_malicious(tmp_path / "train_dir" / "run" / "checkpoints" / "last.pt", marker)
    assert_refused(one_line_error(capsys, tiny_args(tmp_path, "--resume", steps=4), train_cli))


def test_kml_results_refuses_code_in_a_reused_run(tmp_path, marker, capsys):
    out = tmp_path / "results"
    write_malicious(out / "runs" / "5w1s" / "maml" / "seed0" / "checkpoints" / "last.pt", marker)
    argv = ["--methods", "maml", "--setups", "5w1s", "--seeds", "0", "--steps", "2", "--out", str(out)]
    assert_refused(one_line_error(capsys, [*argv, "--no-progress"], results_cli))


def test_the_installed_command_exits_non_zero_with_one_line(tmp_path, marker):
    evil = write_malicious(tmp_path / "evil.pt", marker)
    code = "import sys; from kml.cli.evaluate import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", code, "--checkpoint", str(evil)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert_refused(done.stderr)


def test_convert_needs_trust_and_never_loads_without_it(tmp_path, marker, capsys):
    evil = write_malicious(tmp_path / "evil.pt", marker)
    err = one_line_error(capsys, [str(evil), str(tmp_path / "new.pt")], convert_cli)
    assert "runs any code it holds" in err and "--trust" in err
    assert not (tmp_path / "new.pt").exists()


def test_convert_turns_a_trusted_checkpoint_with_numpy_values_into_a_safe_one(trained, tmp_path, capsys):
    """A checkpoint from another tool (numpy RNG state, a numpy scalar step) converts and then loads and resumes."""
    state = load_checkpoint(trained / "train_dir" / "run" / "checkpoints" / "last.pt")
    state.update(step=np.int64(2), numpy_rng=np.random.RandomState(0).get_state(), extra=np.arange(3.0))
    old = tmp_path / "old.pt"
    torch.save(state, old)  # no checksum: checkpoints of kml before 0.2 had none
    with pytest.raises(KMLError, match="needs code to load"):
        load_checkpoint(old)
    assert convert_cli.main([str(old), str(tmp_path / "new.pt"), "--trust"]) == 0
    assert "loads with torch.load(weights_only=True)" in capsys.readouterr().out
    new = load_checkpoint(tmp_path / "new.pt")
    assert new["step"] == 2 and isinstance(new["step"], int)
    torch.testing.assert_close(new["extra"], torch.arange(3.0, dtype=torch.float64), rtol=0, atol=0)
    assert new["numpy_rng"][0] == "MT19937" and isinstance(new["numpy_rng"][1], torch.Tensor)
    for name, value in state["model"].items():
        assert torch.equal(new["model"][name], value), name


def test_convert_refuses_objects_it_cannot_make_plain(tmp_path, capsys):
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 1, "when": Path("x")}
    torch.save(state, tmp_path / "old.pt")
    err = one_line_error(capsys, [str(tmp_path / "old.pt"), str(tmp_path / "new.pt"), "--trust"], convert_cli)
    assert "cannot convert checkpoint['when']" in err and "PosixPath" in err
