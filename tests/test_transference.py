"""Transference analyzer: agreement with a direct computation, invariants, CSV schema, aggregation, notebooks."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from kml.algorithms import build_learner
from kml.config import LearnerConfig
from kml.data.sampler import MixtureSampler
from kml.transference.aggregate import mode_matrix, mode_pair_stats
from kml.transference.analyzer import COLUMNS, parameter_names, result_rows, task_transference

METHODS = [
    dict(algorithm="maml", modulation="kml"),
    dict(algorithm="maml", modulation="none"),
    dict(algorithm="protonet", modulation="film"),
]


@pytest.fixture(scope="module")
def episode(synthetic_stores):
    stores = synthetic_stores["train"]
    return MixtureSampler(stores, ways=3, shots=1, queries=2, meta_batch=4, seed=0).sample().to_float(torch.float64)


def tiny_learner(**method) -> torch.nn.Module:
    config = LearnerConfig(
        ways=3,
        image_size=16,
        base_channels=4,
        encoder_channels=4,
        inner_steps=1,
        eval_inner_steps=1,
        inner_lr=0.1,
        num_modes=3,
        **method,
    )
    torch.manual_seed(0)
    learner = build_learner(config).double()
    with torch.no_grad():  # a learner that is not at the identity start, so modulation matters
        for p in learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return learner.train()


def direct_z(learner, episode, rate: float, names: list[str]) -> torch.Tensor:
    """Copy the learner, take one SGD step on task i alone, evaluate task j: the definition of Z."""
    base = learner(episode).task_loss.detach()
    z = torch.zeros(episode.num_tasks, episode.num_tasks, dtype=torch.float64)
    for i in range(episode.num_tasks):
        stepped = copy.deepcopy(learner)
        parameters = dict(stepped.named_parameters())
        loss = stepped(episode.select([i])).task_loss[0]
        grads = torch.autograd.grad(loss, [parameters[n] for n in names], allow_unused=True)
        with torch.no_grad():
            for name, grad in zip(names, grads):
                if grad is not None:
                    parameters[name].sub_(rate * grad)
            z[i] = 1 - stepped(episode).task_loss / base
    return z


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m['algorithm']}-{m['modulation']}")
def test_z_equals_direct_computation(method, episode):
    learner = tiny_learner(**method)
    result = task_transference(learner, episode, rate=0.05)
    expected = direct_z(learner, episode, 0.05, parameter_names(learner, "all"))
    # Both sides are the exact Z in float64 (no finite-difference or first-order approximation); they differ in the
    # order of their sums, and Z's lookahead step (rate * gradient, |gradient| ~ 1e2) carries each gradient's
    # rounding into the target losses: measured within 1e-11 of max(1, |Z|), so 1e-9 of it. (Z is relative to
    # L_j: a target the learner already solves, L_j ~ 2e-5 for ProtoNet-FiLM here, makes |Z| ~ 1e6.)
    scale = expected.abs().clamp(min=1)
    assert ((result.z - expected).abs() <= 1e-9 * scale).all(), ((result.z - expected).abs() / scale).max()
    unbatched = task_transference(learner, episode, rate=0.05, batched=False)
    assert torch.allclose(result.z, unbatched.z, atol=1e-10)


def test_parameter_groups(episode):
    learner = tiny_learner(algorithm="maml", modulation="kml")
    backbone, modulation = parameter_names(learner, "backbone"), parameter_names(learner, "modulation")
    assert backbone and modulation and not set(backbone) & set(modulation)
    assert sorted(backbone + modulation) == sorted(parameter_names(learner, "all"))
    for group, names in (("backbone", backbone), ("modulation", modulation)):
        result = task_transference(learner, episode, rate=0.05, parameters=group)
        assert torch.allclose(result.z, direct_z(learner, episode, 0.05, names), atol=1e-9, rtol=0)  # as above


def test_self_transference_positive_for_small_rate(episode):
    learner = tiny_learner(algorithm="maml", modulation="kml")
    # Small enough that the first-order term dominates: Z(i->i) ~ rate * |grad L_i|^2 / L_i > 0.
    # (These tiny perturbed learners have meta-gradient norms around 1e2, hence the small rate.)
    z = task_transference(learner, episode, rate=1e-7).z
    assert (z.diagonal() > 0).all(), z.diagonal()


def test_zero_gradient_source_gives_zero(episode):
    """A source task whose loss is flat in the parameters changes no target's loss (Z = 0 up to rounding)."""
    # Task 0 made of identical images: batch-statistics BatchNorm maps them all to the same features,
    # so every prototype coincides, the logits are all zero and the loss is log(N) for any parameters.
    flat = episode.to_float(torch.float64)
    support_x, query_x = flat.support_x.clone(), flat.query_x.clone()
    support_x[0], query_x[0] = 0.5, 0.5
    sources = dataclasses.replace(flat, support_x=support_x, query_x=query_x)
    learner = tiny_learner(algorithm="protonet", modulation="none")
    result = task_transference(learner, sources, rate=0.5, targets=episode)
    assert result.z[0].abs().max() < 1e-12
    assert result.z[1:].abs().min() > 1e-6  # the other sources do move the targets
    # Zero steps in two other ways: a zero rate, and a parameter group that is empty.
    z = task_transference(tiny_learner(algorithm="maml", modulation="kml"), episode, rate=0.0).z
    assert z.abs().max() < 1e-12
    plain = tiny_learner(algorithm="maml", modulation="none")
    assert parameter_names(plain, "modulation") == []
    z = task_transference(plain, episode, rate=0.5, parameters="modulation").z
    assert z.abs().max() < 1e-12


def test_analysis_leaves_learner_and_optimiser_unchanged(episode):
    learner = tiny_learner(algorithm="maml", modulation="kml")
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    learner(episode).loss.backward()
    optimizer.step()
    before_params = copy.deepcopy(learner.state_dict())
    before_grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    before_opt = copy.deepcopy(optimizer.state_dict())
    task_transference(learner, episode, rate=0.05)
    assert all(torch.equal(before_params[k], v) for k, v in learner.state_dict().items())
    assert all(torch.equal(before_grads[n], p.grad) for n, p in learner.named_parameters() if n in before_grads)
    after_opt = optimizer.state_dict()
    for key, state in before_opt["state"].items():
        assert all(torch.equal(state[k], after_opt["state"][key][k]) for k in state if torch.is_tensor(state[k]))
    assert learner.training


def test_csv_schema(episode):
    learner = tiny_learner(algorithm="protonet", modulation="kml")
    result = task_transference(learner, episode, rate=0.05)
    rows = result_rows(result, step=7, batch=2)
    frame = pd.DataFrame(rows)
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == episode.num_tasks**2 and frame["self_pair"].sum() == episode.num_tasks
    assert set(frame["mode_i"]) <= {"glyphs", "textures", "shapes"} and (frame["step"] == 7).all()
    assert len(result_rows(result, 7, include_self=False)) == episode.num_tasks * (episode.num_tasks - 1)


def test_aggregation_matches_hand_computation():
    rows = [
        # step, i, j, mode_i, mode_j, Z, self_pair
        (1, 0, 1, "a", "b", 0.2, False),
        (1, 1, 0, "b", "a", -0.1, False),
        (1, 0, 2, "a", "b", 0.4, False),
        (1, 2, 0, "b", "a", -0.3, False),
        (1, 1, 2, "b", "b", 0.1, False),
        (1, 0, 0, "a", "a", 0.9, True),
        (2, 0, 1, "a", "b", -0.2, False),
        (2, 3, 4, "a", "a", 0.5, False),
    ]
    frame = pd.DataFrame(
        [
            {
                "step": s,
                "batch": 0,
                "task_i": i,
                "task_j": j,
                "mode_i": mi,
                "mode_j": mj,
                "classes_i": "",
                "classes_j": "",
                "loss_j": 1.0,
                "loss_j_after": 1 - z,
                "rate": 0.1,
                "self_pair": sp,
                "Z": z,
            }
            for s, i, j, mi, mj, z, sp in rows
        ]
    )
    matrix = mode_matrix(frame)
    assert matrix.loc["a", "b"] == pytest.approx((0.2 + 0.4 - 0.2) / 3)
    assert matrix.loc["b", "a"] == pytest.approx(-0.2)
    assert matrix.loc["a", "a"] == pytest.approx(0.5)  # the self pair (0.9) is left out
    assert matrix.loc["b", "b"] == pytest.approx(0.1)
    stats = mode_pair_stats(frame).set_index(["mode_i", "mode_j"])
    assert stats.loc[("a", "b"), "count"] == 3 and stats.loc[("a", "b"), "positive"] == pytest.approx(2 / 3)
    assert stats.loc[("b", "a"), "std"] == pytest.approx(pd.Series([-0.1, -0.3]).std())
    by_step = mode_pair_stats(frame, by_step=True).set_index(["step", "mode_i", "mode_j"])
    assert by_step.loc[(2, "a", "b"), "mean"] == pytest.approx(-0.2)
    assert mode_matrix(frame, include_self=True).loc["a", "a"] == pytest.approx(0.7)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny synthetic runs (MAML and KML) that record transference during training."""
    from kml.cli import train as train_cli

    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for model in ("none", "kml"):
        argv = [
            "--modes",
            "synthetic",
            "--modulation",
            model,
            "--image-size",
            "16",
            "--base-channels",
            "4",
            "--encoder-channels",
            "4",
            "--meta-batch",
            "3",
            "--queries",
            "2",
            "--inner-steps",
            "1",
            "--eval-inner-steps",
            "1",
            "--steps",
            "4",
            "--log-every",
            "2",
            "--val-every",
            "4",
            "--val-episodes",
            "3",
            "--checkpoint-every",
            "2",
            "--transference-every",
            "2",
            "--no-progress",
            "--train-dir",
            str(root / "train_dir"),
            "--run-name",
            model,
            "--data-root",
            str(root / "data"),
        ]
        assert train_cli.main(argv) == 0
        runs[model] = root / "train_dir" / model
    return runs


def test_training_records_transference_with_the_schema(two_runs):
    records = pd.read_csv(two_runs["kml"] / "transference.csv")
    assert list(records.columns) == list(COLUMNS)
    assert sorted(records["step"].unique()) == [2, 4]
    assert len(records) == 2 * 3 * 3  # every ordered pair (self pairs included) of a 3-task meta-batch
    assert set(records["lookahead"]) == {"adam"}  # kml-train's optimiser, its next step from its state
    assert records[["Z_linear", "step_norm_i", "grad_norm_i"]].notna().all().all()
    # one seed, so both runs recorded the same episodes: the comparison is paired
    other = pd.read_csv(two_runs["none"] / "transference.csv")
    assert other[["step", "batch", "classes_i", "classes_j"]].equals(
        records[["step", "batch", "classes_i", "classes_j"]]
    )
    # kml-train drew the figures and the summary beside the table at the end of the run
    assert (two_runs["kml"] / "transference_summary.csv").is_file()
    assert (two_runs["kml"] / "transference_heatmap.png").stat().st_size > 0


def test_run_outputs_are_written_beside_the_table(two_runs, tmp_path):
    """What the trainer calls at the end of a --transference-every run: figures and a summary beside the CSV."""
    import shutil

    from kml.transference.outputs import write_transference_outputs

    run = tmp_path / "run"
    shutil.copytree(two_runs["kml"], run, ignore=shutil.ignore_patterns("checkpoints", "*.png"))
    messages = []
    paths = write_transference_outputs(run, warn=messages.append)
    names = {p.name for p in paths}
    assert {"transference_summary.csv", "transference_heatmap.png", "transference_lr.png"} <= names
    assert {"transference_over_training.png", "transference_linearity.png"} <= names  # two steps, diagnostics
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    summary = pd.read_csv(run / "transference_summary.csv")
    assert {"step", "mode_i", "mode_j", "mean", "ci_low", "ci_high", "n", "count"} <= set(summary.columns)
    assert all(m.startswith("linearisation error above") for m in messages)
    assert write_transference_outputs(tmp_path / "no-run") == []


def test_recording_continues_an_old_table_in_its_own_schema(two_runs, synthetic_stores, tmp_path):
    """A run begun before the diagnostics keeps its columns and its SGD lookahead when it records again."""
    from types import SimpleNamespace

    from kml.transference.analyzer import REQUIRED_COLUMNS
    from kml.transference.recorder import TransferenceRecorder

    path = tmp_path / "transference.csv"
    pd.read_csv(two_runs["kml"] / "transference.csv")[list(REQUIRED_COLUMNS)].to_csv(path, index=False)
    learner = tiny_learner(algorithm="maml", modulation="kml").float()
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    trainer = SimpleNamespace(learner=learner, optimizer=optimizer, dist=SimpleNamespace(is_main=True))
    sampler = MixtureSampler(synthetic_stores["train"], ways=3, shots=1, queries=2, meta_batch=3, seed=0)
    TransferenceRecorder(sampler, path, every=2)(trainer, 6, None)
    records = pd.read_csv(path)
    assert list(records.columns) == list(REQUIRED_COLUMNS) and (records["step"] == 6).sum() == 9
    fresh = tmp_path / "fresh.csv"
    TransferenceRecorder(sampler, fresh, every=2)(trainer, 6, None)
    assert list(pd.read_csv(fresh).columns) == list(COLUMNS)


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "notebook,env,figures",
    [
        # relative to the repository root, as a user names train_dir/<run> there
        ("transference.ipynb", lambda runs: {"KML_RUN_DIR": os.path.relpath(runs["kml"], ROOT)}, 5),
        ("compare_runs.ipynb", lambda runs: {"KML_RUN_A": str(runs["none"]), "KML_RUN_B": str(runs["kml"])}, 2),
    ],
)
def test_notebooks_execute_headless_and_draw_their_figures(notebook, env, figures, two_runs, monkeypatch):
    """``jupyter execute notebooks/<nb>`` from the root: the kernel runs in notebooks/ (nbclient's CLI starts it
    in the notebook's folder), and the run is found from an environment variable relative to the root."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("KML_RUN", raising=False)
    for key, value in env(two_runs).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures
    monkeypatch.chdir(ROOT)
    path = ROOT / "notebooks" / notebook
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    images = [
        o
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    errors = [
        o
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    assert len(images) >= figures


def test_offline_cli_on_a_checkpoint_writes_records_and_plots(two_runs, tmp_path, capsys):
    from kml.cli import transference as transference_cli

    checkpoint = two_runs["kml"] / "checkpoints" / "last.pt"
    output = tmp_path / "offline.csv"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--batches",
        "2",
        "--meta-batch",
        "3",
        "--output",
        str(output),
        "--data-root",
        str(two_runs["kml"].parents[1] / "data"),
    ]
    assert transference_cli.main(argv) == 0
    records = pd.read_csv(output)
    assert list(records.columns) == list(COLUMNS) and len(records) == 2 * 3 * 3
    assert list(tmp_path.glob("*.png"))
    # the paper's design: many sources from one mode's train classes against a target from another's test classes
    paper = tmp_path / "paper.csv"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--source-mode",
        "glyphs",
        "--target-mode",
        "textures",
        "--sources",
        "4",
        "--output",
        str(paper),
        "--data-root",
        str(two_runs["kml"].parents[1] / "data"),
    ]
    assert transference_cli.main(argv) == 0
    records = pd.read_csv(paper)
    assert set(records["mode_i"]) == {"glyphs"} and set(records["mode_j"]) == {"textures"} and len(records) == 4
    assert list(records["batch"]) == [0, 1, 2, 3]  # each source task is its own sampling unit
    with pytest.raises(SystemExit):
        transference_cli.main(["--checkpoint", str(checkpoint), "--source-mode", "glyphs"])
    assert "go together" in capsys.readouterr().err


def test_paper_experiment_over_a_run_writes_table_and_figure(two_runs, tmp_path, capsys):
    """kml-transference RUN --source-mode A --target-mode B: every saved checkpoint, the same episodes at each."""
    import shutil

    from kml.cli import transference as transference_cli

    run = tmp_path / "kml"
    shutil.copytree(two_runs["kml"], run)
    data = ["--data-root", str(two_runs["kml"].parents[1] / "data"), "--no-progress"]
    paper = ["--source-mode", "glyphs", "--target-mode", "textures", "--sources", "5"]
    assert transference_cli.main([str(run), *paper, "--lookahead", "sgd", *data]) == 0
    out = capsys.readouterr().out
    records = pd.read_csv(run / "transference_glyphs-textures.csv")
    assert sorted(records["step"].unique()) == [2, 4] and len(records) == 2 * 5
    assert set(records["lookahead"]) == {"sgd"}
    # the same source and target tasks at every stage: the stages compare pair by pair
    by_step = [
        frame[["task_i", "classes_i", "classes_j"]].reset_index(drop=True) for _, frame in records.groupby("step")
    ]
    assert by_step[0].equals(by_step[1])
    assert (run / "transference_glyphs-textures_lr.png").stat().st_size > 0
    assert (run / "transference_glyphs-textures_summary.csv").is_file()
    assert "glyphs" in out and "written:" in out
    assert transference_cli.main([str(run), *paper, "--steps", "4", "--output", str(tmp_path / "s4.csv"), *data]) == 0
    records = pd.read_csv(tmp_path / "s4.csv")
    assert set(records["step"]) == {4} and set(records["lookahead"]) == {"adam"}
    with pytest.raises(SystemExit):
        transference_cli.main([str(run), *paper, "--steps", "3", *data])
    assert "has no checkpoint of step 3; it has steps 2, 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        transference_cli.main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--steps", "2"])
    assert "--steps picks checkpoints of a run folder" in capsys.readouterr().err
