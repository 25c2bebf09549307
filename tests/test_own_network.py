"""Your network on the command line: kml-train --network builds it by import path, config.json records it, and
kml-eval, kml-transference, kml-train --resume and kml-results rebuild it like kml's own networks."""

from __future__ import annotations

import json

import pytest

from kml.cli import evaluate as eval_cli
from kml.cli import results as results_cli
from kml.cli import train as train_cli
from kml.cli import transference as transference_cli

NETWORK = "kml.models.resnet12:ResNet12"  # any importable nn.Module subclass stands for "yours"


def common(tmp_path, steps: int) -> list[str]:
    return [
        "--modes", "glyphs", "shapes",
        "--image-size", "16", "--encoder-channels", "4", "--meta-batch", "2", "--queries", "2",
        "--steps", str(steps), "--val-every", "2", "--val-episodes", "2", "--checkpoint-every", "2",
        "--log-every", "1", "--no-progress", "--train-dir", str(tmp_path / "runs"), "--run-name", "mine",
        "--data-root", str(tmp_path / "data"),
    ]  # fmt: skip


@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
def test_a_network_by_import_path_trains_evaluates_resumes_and_is_analysed(tmp_path, algorithm):
    ways = 5 if algorithm == "maml" else None  # MAML's network gives the logits, ProtoNet's the features
    args = {"widths": [2, 2, 2, 2], "ways": ways, "image_size": 16}
    method = ["--algorithm", algorithm, "--modulation", "kml", "--network", NETWORK, "--network-args", json.dumps(args)]
    if algorithm == "maml":
        method += ["--inner-steps", "1", "--eval-inner-steps", "1"]
    assert train_cli.main([*common(tmp_path, 2), *method]) == 0
    run = tmp_path / "runs" / "mine"
    learner = json.loads((run / "config.json").read_text())["learner"]
    assert (learner["network"], learner["network_args"]) == (NETWORK, args)

    out = tmp_path / "eval.json"
    data = ["--data-root", str(tmp_path / "data")]
    checkpoint = str(run / "checkpoints" / "last.pt")
    assert (
        eval_cli.main(["--checkpoint", checkpoint, "--episodes", "2", "--no-progress", *data, "--output", str(out)])
        == 0
    )
    assert [r["mode"] for r in json.loads(out.read_text())["results"]] == ["glyphs", "shapes", "average"]

    assert train_cli.main([*common(tmp_path, 4), *method, "--resume"]) == 0
    assert json.loads((run / "config.json").read_text())["learner"]["network"] == NETWORK

    records = tmp_path / "transference.csv"
    analysed = ["--checkpoint", checkpoint, "--batches", "1", "--meta-batch", "2", "--no-progress", *data]
    assert transference_cli.main([*analysed, "--output", str(records)]) == 0
    assert records.is_file()


def test_a_network_by_import_path_is_a_kml_results_method(tmp_path):
    args = json.dumps({"widths": [2, 2, 2, 2], "image_size": 16}, separators=(",", ":"))
    method = f"mine=kml-protonet,network={NETWORK},network_args={args},encoder_channels=4,proto_refine=false"
    argv = [
        "--methods", method, "--modes", "glyphs", "shapes", "--seeds", "0", "--steps", "2", "--episodes", "2",
        "--set", "image_size=16", "meta_batch=2", "queries=2", "val_every=2", "val_episodes=2",
        "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "results"), "--no-progress",
    ]  # fmt: skip
    assert results_cli.main(argv) == 0
    recorded = json.loads(next((tmp_path / "results").rglob("config.json")).read_text())["learner"]
    assert recorded["network"] == NETWORK and recorded["network_args"]["widths"] == [2, 2, 2, 2]


def test_settings_of_kml_networks_are_refused_with_your_network(tmp_path, capsys):
    argv = [*common(tmp_path, 2), "--network", NETWORK, "--base-channels", "8", "--algorithm", "protonet"]
    with pytest.raises(SystemExit) as stopped:
        train_cli.main(argv)
    assert stopped.value.code == 2
    assert "--base-channels has no effect" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "mine").exists()


def test_split_flags_set_the_class_split_of_folder_modes_in_their_recorded_names(tmp_path):
    from PIL import Image

    root = tmp_path / "mine"
    for c in range(12):
        (root / "group" / f"class{c:02d}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (20 * c, 10 * i, 0)).save(root / "group" / f"class{c:02d}" / f"{i}.png")
    argv = [
        "--modes", f"short=folder:{root}", "--split-fractions", "0.5", "0.25", "0.25", "--split-seed", "7",
        "--algorithm", "protonet", "--modulation", "none", "--base-channels", "2", "--ways", "2", "--shots", "1",
        "--queries", "1", "--image-size", "16", "--meta-batch", "2", "--steps", "1", "--val-every", "1",
        "--val-episodes", "1", "--checkpoint-every", "1", "--no-progress", "--train-dir", str(tmp_path / "runs"),
        "--data-root", str(tmp_path / "data"),
    ]  # fmt: skip
    assert train_cli.main(argv) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("protonet-none_short_2w1s")  # the mode's short name, not its path
    (mode,) = json.loads((run / "config.json").read_text())["modes"]
    assert "fractions=" in mode and "seed=7" in mode and mode.startswith("short=folder")
