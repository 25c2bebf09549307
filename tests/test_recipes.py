"""Recipes: the published networks' parameters, schedules and inner loops pinned exactly, recipe values
overridden flag by flag and recorded, one short train + eval per recipe, and N-independent evaluation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kml.algorithms import build_learner
from kml.algorithms.functional import clip_task_gradients
from kml.cli import evaluate as eval_cli
from kml.cli import train as train_cli
from kml.config import LearnerConfig
from kml.config.recipes import RECIPES, recipe, recipe_values
from kml.config.run import RunConfig, learning_rate_at
from kml.data.episode import Episode
from kml.data.modes import load_stores
from kml.data.sampler import MixtureSampler
from kml.training.schedule import build_scheduler

LEARNER_FIELDS = {f.name for f in dataclasses.fields(LearnerConfig)}
PUBLISHED = ("mmaml", "maml", "multi-maml", "kml-protonet-released", "protonet", "multi-protonet", "mprotonet")


def published_learner(name: str, ways: int = 5, modes: tuple[str, ...] = ("omniglot", "miniimagenet", "fc100")):
    """The recipe's learner at the published size: 84x84x3, C = E = 32."""
    values = recipe_values(name, {"ways": ways, "modes": list(modes)})
    learner = {k: v for k, v in values.items() if k in LEARNER_FIELDS}
    config = LearnerConfig(**{**learner, "ways": ways, "image_size": 84, "in_channels": 3, "num_modes": len(modes)})
    return build_learner(config).models[0]


def count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


CONVS = {  # the published backbone's and encoder's convs at C = E = 32
    "conv1.weight": (32, 3, 3, 3),
    "conv1.bias": (32,),
    "conv2.weight": (64, 32, 3, 3),
    "conv2.bias": (64,),
    "conv3.weight": (128, 64, 3, 3),
    "conv3.bias": (128,),
    "conv4.weight": (256, 128, 3, 3),
    "conv4.bias": (256,),
}
AFFINE_NORMS = {f"norm{i}.{p}": (c,) for i, c in enumerate((32, 64, 128, 256), start=1) for p in ("weight", "bias")}


# ----------------------------------------------------------------------------- published networks
def test_mmaml_network_is_the_published_one():
    model = published_learner("mmaml")
    # backbone: convs, BatchNorm(affine=False) (no parameters), spatial mean, Linear(8C, N)
    assert shapes(model.backbone) == {**CONVS, "head.weight": (5, 256), "head.bias": (5,)}
    assert count(model.backbone) == 389_701
    assert model.backbone.feature_dim == 256  # the head reads the 8C channel means, not 9216 flattened features
    # task encoder (affine BatchNorm, Linear(256, 128)) + one (gamma, beta) pair of Linear(128, C_l) per block
    film = {
        f"{kind}.{i}.{p}": (c,) if p == "bias" else (c, 128)
        for kind in ("gamma", "beta")
        for i, c in enumerate((32, 64, 128, 256))
        for p in ("weight", "bias")
    }
    assert shapes(model.encoder) == {**CONVS, **AFFINE_NORMS, "hidden.weight": (128, 256), "hidden.bias": (128,)}
    assert shapes(model.generator) == film
    assert count(model.encoder) + count(model.generator) == 546_112


@pytest.mark.parametrize("name", ["maml", "multi-maml"])
def test_mmaml_maml_baselines_are_its_network_without_encoder(name):
    model = published_learner(name)
    assert shapes(model.backbone) == {**CONVS, "head.weight": (5, 256), "head.bias": (5,)}
    assert count(model.backbone) == 389_701 and model.encoder is None and model.generator is None


def test_mmaml_20_way_head():
    assert published_learner("mmaml", ways=20).backbone.head.weight.shape == (20, 256)


def test_released_kml_network_is_the_published_one():
    model = published_learner("kml-protonet-released")
    assert shapes(model.backbone) == {**CONVS, **AFFINE_NORMS}  # no head; features = flattened last map
    assert count(model.backbone) == 389_376 and model.backbone.feature_dim == 256 * 6 * 6
    widths = [(layer.v.out_features, layer.u.out_features, layer.beta.out_features) for layer in model.generator.layers]
    assert widths == [(32, 27, 32), (192, 96, 64), (384, 192, 128), (768, 384, 256)]
    assert all(layer.v.in_features == 128 for layer in model.generator.layers)
    assert count(model.encoder) + count(model.generator) == 751_867
    assert count(model) == 1_141_243


def test_protonet_is_the_released_vanilla_conv_model():
    """KML-Classification scripts/models/conv_net.py ConvModel (--vanilla-model): stride-2 convs, affine BatchNorm,
    flattened features, Xavier-uniform conv kernels with zero biases (its weight_init), BatchNorm at 1 and 0."""
    torch.manual_seed(0)
    model = published_learner("protonet")
    assert model.encoder is None and model.generator is None
    assert shapes(model.backbone) == {**CONVS, **AFFINE_NORMS} and model.backbone.feature_dim == 256 * 6 * 6
    for i in range(1, 5):
        conv, norm = getattr(model.backbone, f"conv{i}"), getattr(model.backbone, f"norm{i}")
        fan_in, fan_out = conv.weight[0].numel(), conv.weight.shape[0] * conv.weight[0, 0].numel()
        bound = (6 / (fan_in + fan_out)) ** 0.5  # xavier_uniform_'s bound
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
        assert not conv.bias.any() and torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()


def test_published_initialisation_is_pytorch_default_and_not_the_identity():
    torch.manual_seed(0)
    model = published_learner("kml-protonet-released")
    bias = model.generator.layers[1].u.bias
    bound = 1 / 128**0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), no constant start
    assert bias.abs().max() <= bound and bias.std() > bound / 4
    assert model.encoder.conv2.bias.abs().sum() > 0  # kml's init zeroes conv biases; PyTorch's does not
    film = published_learner("mmaml").generator
    assert film.gamma[0].weight.abs().sum() > 0  # kml's identity start zeroes it


# ----------------------------------------------------------------------------- inner loop and schedules
def test_mmaml_inner_loop_settings():
    for name in ("mmaml", "maml", "multi-maml"):
        settings = recipe(name).settings
        assert settings["inner_grad_clamp"] == 20.0 and settings["inner_grad_clip"] is None
        assert (settings["inner_steps"], settings["inner_lr"], settings["first_order"]) == (5, 0.05, False)


def test_inner_clamp_is_element_wise():
    grads = {"a": torch.tensor([[30.0, -25.0, 3.0]]), "b": torch.tensor([[[-0.5, 21.0]]])}
    clamped = clip_task_gradients(grads, None, 20.0)
    assert clamped["a"].tolist() == [[20.0, -20.0, 3.0]] and clamped["b"].tolist() == [[[-0.5, 20.0]]]


@pytest.mark.parametrize(
    ("name", "ways", "expected", "meta_batch", "steps"),
    [
        # kml's timing (halved after 10000 updates); the released code halves one step early (released_lr_timing)
        ("kml-protonet-released", 5, [1e-3, 1e-3, 5e-4, 2.5e-4], 10, 30000),
        ("kml-protonet-as-released", 5, [1e-3, 5e-4, 5e-4, 1.25e-4], 10, 30000),
        ("protonet-as-released", 5, [1e-3, 5e-4, 5e-4, 1.25e-4], 10, 30000),
        ("kml-maml", 5, [1e-3, 1e-3, 5e-4, 2.5e-4], 10, 30000),
        ("mmaml", 5, [1e-3] * 4, 10, 60000),
        ("maml", 5, [1e-3] * 4, 10, 60000),
        ("mmaml", 20, [1e-3] * 4, 5, 80000),
        ("maml", 20, [1e-3] * 4, 5, 80000),
    ],
)
def test_schedules(name, ways, expected, meta_batch, steps):
    values = recipe_values(name, {"ways": ways, "modes": ["omniglot", "miniimagenet"]})
    config = RunConfig(**{k: v for k, v in values.items() if k not in LEARNER_FIELDS})
    assert (config.meta_batch, config.steps) == (meta_batch, steps)
    assert [learning_rate_at(config, s) for s in (0, 9999, 10000, 29999)] == pytest.approx(expected, rel=0, abs=0)
    assert_scheduler_follows_the_schedule(dataclasses.replace(config, lr_halve_every=3))


def assert_scheduler_follows_the_schedule(config: RunConfig, steps: int = 8) -> None:
    """The scheduler the trainer builds gives ``learning_rate_at(config, step)``, stepped once per outer step."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = build_scheduler(optimizer, config)
    for step in range(steps):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate_at(config, step), rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_multi_maml_per_mode_rates_and_meta_batch():
    values = recipe_values("multi-maml", {"modes": ["omniglot", "miniimagenet", "FC100"]})
    assert values["mode_inner_lr"] == [0.4, 0.01, 0.01] and values["mode_inner_steps"] == [1, 5, 5]
    assert values["meta_batch"] == 12 and values["steps"] == 80000 and values["multi_maml"] is True
    twenty = recipe_values("multi-maml", {"ways": 20, "modes": ["omniglot", "cub"]})
    assert twenty["mode_inner_lr"] == [0.1, 0.01] and twenty["mode_inner_steps"] == [5, 5]
    one_rate = recipe_values("multi-maml", {"modes": ["omniglot", "cub"], "inner_lr": 0.1})
    assert "mode_inner_lr" not in one_rate and one_rate["mode_inner_steps"] == [1, 5]  # --inner-lr: one rate for all


def test_per_mode_step_counts_stop_each_task_at_its_own_count():
    torch.manual_seed(0)
    base = dict(ways=3, image_size=16, base_channels=4, num_modes=3, algorithm="maml", modulation="none", inner_lr=0.2)
    learner = build_learner(LearnerConfig(**base, mode_inner_steps=[0, 2, 1], mode_inner_lr=[0.2, 0.2, 0.2])).double()
    plain = build_learner(LearnerConfig(**base)).double()
    plain.load_state_dict(learner.state_dict())
    generator = torch.Generator().manual_seed(0)
    episode = Episode(
        torch.rand(3, 6, 3, 16, 16, generator=generator, dtype=torch.float64),
        torch.arange(3).repeat_interleave(2).expand(3, 6).clone(),
        torch.rand(3, 6, 3, 16, 16, generator=generator, dtype=torch.float64),
        torch.arange(3).repeat_interleave(2).expand(3, 6).clone(),
        torch.tensor([0, 1, 2]),
        torch.zeros(3, 3, dtype=torch.int64),
        ("a", "b", "c"),
    )
    ours = learner(episode).task_loss
    for task, steps in enumerate([0, 2, 1]):
        alone = plain(episode.select([task]), inner_steps=steps).task_loss
        torch.testing.assert_close(ours[task], alone[0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- recipe values and records
def test_recipes_are_frozen_and_versioned():
    for name, found in RECIPES.items():
        assert found.name == name and found.version >= 1 and found.tag == f"{name}@{found.version}"
        with pytest.raises(TypeError):
            found.settings["lr"] = 1.0  # type: ignore[index]
    assert recipe("mmaml@1") is RECIPES["mmaml"]


def test_unknown_recipe_or_version_is_one_line(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--recipe", "nope"])
    assert "\n" not in capsys.readouterr().err.strip()
    from kml.errors import KMLError

    with pytest.raises(KMLError, match="holds mmaml@1"):
        recipe("mmaml@7")


def test_flags_override_a_recipe_value_by_value():
    values = recipe_values("mmaml", {"modes": ["synthetic"], "inner_lr": 0.1, "steps": 60000})
    assert values["inner_lr"] == 0.1 and values["head"] == "avgpool" and values["recipe"] == "mmaml@1"
    assert values["recipe_overrides"] == ["inner_lr"]  # steps equals the recipe's value: not an override


def test_old_configs_without_the_new_fields_keep_their_behaviour():
    old = LearnerConfig().to_dict()
    for name in (
        "head",
        "batchnorm_affine",
        "encoder_hidden",
        "init",
        "inner_grad_clamp",
        "mode_inner_lr",
        "mode_inner_steps",
    ):
        old.pop(name)
    config = LearnerConfig.from_dict(old)
    assert (config.head, config.batchnorm_affine, config.encoder_hidden, config.init, config.inner_grad_clamp) == (
        "flatten",
        True,
        None,
        "kml",
        None,
    )
    run = RunConfig().to_dict()
    for name in ("lr_schedule", "recipe", "recipe_overrides"):
        run.pop(name)
    assert RunConfig.from_dict(run).lr_schedule == "halve"


# ----------------------------------------------------------------------------- CI-sized runs
def tiny_recipe_args(tmp_path: Path, name: str) -> list[str]:
    argv = [
        "--recipe",
        name,
        "--modes",
        "synthetic",
        "--image-size",
        "16",
        "--base-channels",
        "4",
        "--encoder-channels",
        "4",
        "--encoder-hidden",
        "8",
        "--meta-batch",
        "3",
        "--queries",
        "2",
        "--inner-steps",
        "1",
        "--eval-inner-steps",
        "1",
        "--steps",
        "2",
        "--val-every",
        "2",
        "--val-episodes",
        "3",
        "--checkpoint-every",
        "2",
        "--log-every",
        "1",
        "--no-progress",
        "--train-dir",
        str(tmp_path / "train_dir"),
        "--run-name",
        name,
        "--data-root",
        str(tmp_path / "data"),
    ]
    # a setting the recipe's method does not have is refused: give each only where it acts
    settings = RECIPES[name].settings
    inert = ["--inner-steps", "--eval-inner-steps"] if settings["algorithm"] == "protonet" else []
    for flag in inert + (["--encoder-hidden"] if settings["modulation"] == "none" else []):
        del argv[argv.index(flag) : argv.index(flag) + 2]
    return argv


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_trains_and_evaluates(name, tmp_path):
    argv = tiny_recipe_args(tmp_path, name)
    if name.startswith(
        "multi-maml"
    ):  # its per-mode meta-batch (4 per mode) and per-mode step counts are the recipe's: keep them
        for flag in ("--meta-batch", "--inner-steps", "--eval-inner-steps"):
            at = argv.index(flag)
            del argv[at : at + 2]
    assert train_cli.main(argv) == 0
    run = tmp_path / "train_dir" / name
    config = json.loads((run / "config.json").read_text())
    found = RECIPES[name]
    assert config["recipe"] == found.tag
    resolved = recipe_values(name, {"modes": ["synthetic"]})
    for key in found.settings:  # every recipe value is in the run's config unless overridden
        value = resolved[key]
        recorded = config["learner"][key] if key in LEARNER_FIELDS else config[key]
        assert recorded == value or key in config["recipe_overrides"], key
    if name.startswith("multi-maml"):
        assert config["learner"]["mode_inner_lr"] == [0.01] * 3 and config["learner"]["mode_inner_steps"] == [5] * 3
    assert (
        eval_cli.main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--episodes", "3", "--no-progress"]) == 0
    )
    (found_report,) = (run / "checkpoints").glob("eval_last_test_*.json")  # named by its settings
    report = json.loads(found_report.read_text())
    assert [r["mode"] for r in report["results"]] == ["glyphs", "textures", "shapes", "average"]


def test_multi_maml_evaluated_on_a_subset_of_modes_uses_each_mode_own_parameters(tmp_path):
    argv = tiny_recipe_args(tmp_path, "multi-maml")
    at = argv.index("--meta-batch")
    del argv[at : at + 2]
    assert train_cli.main(argv) == 0
    checkpoint = tmp_path / "train_dir" / "multi-maml" / "checkpoints" / "last.pt"
    rows = {}
    for modes in (["glyphs", "textures", "shapes"], ["shapes"]):
        output = tmp_path / f"{len(modes)}.json"
        argv = [
            "--checkpoint",
            str(checkpoint),
            "--episodes",
            "4",
            "--no-progress",
            "--output",
            str(output),
            "--modes",
            *modes,
        ]
        assert eval_cli.main(argv) == 0
        rows[len(modes)] = {r["mode"]: r for r in json.loads(output.read_text())["results"]}
    assert rows[1]["shapes"] == rows[3]["shapes"]  # was: shapes evaluated with glyphs' parameter set (index 0)


# ----------------------------------------------------------------------------- evaluation at another N
def test_protonet_trained_5_way_evaluates_20_way(tmp_path):
    torch.manual_seed(0)
    learner = build_learner(
        LearnerConfig(
            algorithm="protonet",
            modulation="kml",
            ways=5,
            image_size=16,
            base_channels=4,
            encoder_channels=4,
            num_modes=3,
        )
    ).double()  # float64: the batched paths and the loop differ in summation order only
    stores = load_stores(["synthetic"], "test", root=tmp_path, side=16)
    episode = MixtureSampler(stores, ways=20, shots=1, queries=2, meta_batch=3, seed=0).sample().to_float(torch.float64)
    for batching in ("packed", "vmap"):
        with torch.no_grad(), learner.using_backend(batching):
            output = learner(episode)  # was: IndexError (Target 10 is out of bounds) in the prototype loss
        assert output.task_accuracy.shape == (3,)
        torch.testing.assert_close(
            output.task_loss, learner.reference_forward(episode).task_loss.detach(), rtol=1e-10, atol=0
        )  # measured: within 1e-15


def test_kml_eval_ways(tmp_path, capsys):
    argv = tiny_recipe_args(tmp_path, "kml-protonet")
    assert train_cli.main(argv) == 0
    checkpoint = tmp_path / "train_dir" / "kml-protonet" / "checkpoints" / "last.pt"
    assert eval_cli.main(["--checkpoint", str(checkpoint), "--episodes", "3", "--ways", "20", "--no-progress"]) == 0
    (found_report,) = checkpoint.parent.glob("eval_last_test_20w*.json")  # named by its settings
    report = json.loads(found_report.read_text())
    assert (report["ways"], report["trained_ways"]) == (20, 5)
    assert "20-way" in capsys.readouterr().out

    argv = tiny_recipe_args(tmp_path, "maml")
    assert train_cli.main(argv) == 0
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(
            ["--checkpoint", str(tmp_path / "train_dir" / "maml" / "checkpoints" / "last.pt"), "--ways", "20"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "MAML head" in err and "\n" not in err


# ----------------------------------------------------------------------------- published preprocessing
def test_omniglot_stored_at_84_is_the_105_pixel_original_lanczos_resized(tmp_path):
    import io

    import fixtures_datasets as fx
    from PIL import Image

    from kml.data.modes import load_store
    from kml.data.sources import prepare

    files = fx.omniglot_archives(drawers=1)
    (tmp_path / "raw" / "omniglot").mkdir(parents=True)
    for name, data in files.items():
        (tmp_path / "raw" / "omniglot" / name).write_bytes(data)
    checksums = {name: fx.md5(data) for name, data in files.items()}
    prepare(
        ["omniglot"],
        tmp_path,
        mirrors=[fx.dead_url()],
        checksums=checksums,
        omniglot_side=84,
        progress=False,
        workers=2,
    )
    store = load_store("omniglot", "test", tmp_path)
    assert store.image_shape == (1, 84, 84) and "84x84" in store.info["preprocessing"]
    page = Image.open(io.BytesIO(fx.omniglot_character_png())).convert("L").resize((84, 84), Image.LANCZOS)
    expected = 255 - torch.from_numpy(__import__("numpy").asarray(page)).to(torch.int16)
    assert (store.images[0, 0].to(torch.int16) - expected).abs().max() <= 1


def test_aircraft_whole_photo_with_its_banner_as_the_released_converters(tmp_path):
    import fixtures_datasets as fx

    from kml.data.modes import load_store
    from kml.data.sources import prepare

    files = fx.aircraft_archive()
    (tmp_path / "raw" / "aircraft").mkdir(parents=True)
    for name, data in files.items():
        (tmp_path / "raw" / "aircraft" / name).write_bytes(data)
    prepare(
        ["aircraft"], tmp_path, mirrors=[fx.dead_url()], crop=False, aircraft_banner=True, progress=False, workers=2
    )
    store = load_store("aircraft", "train", tmp_path)
    whole = store.images[0].float()
    assert whole[2, 2, 2] > 200 and whole[1, -1].mean() > 100  # the sky and the green copyright banner are there
    assert store.info["crop"] == "none (whole photo, banner kept)"
