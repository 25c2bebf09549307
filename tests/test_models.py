"""Models: backbone shapes, KML identity start and rank-1 structure, FiLM as a special case of KML."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kml.config import LearnerConfig
from kml.errors import KMLError
from kml.models import Backbone, FiLMGenerator, KMLGenerator, TaskModel, factor_shape, film_as_kml, output_side


def random_images(count: int = 6, side: int = 20, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, channels, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "layout,side,expected", [("published", 84, 6), ("conv4", 84, 5), ("published", 32, 2), ("conv4", 28, 1)]
)
def test_backbone_output_sizes(layout, side, expected):
    assert output_side(side, layout) == expected
    backbone = Backbone(3, 4, side, layout, ways=5)
    assert backbone(torch.randn(2, 3, side, side)).shape == (2, 5)
    assert Backbone(3, 4, side, layout).features(torch.randn(2, 3, side, side)).shape == (2, backbone.feature_dim)


def test_backbone_batchnorm_uses_the_batch_statistics():
    backbone = Backbone(3, 4, 20, "published", ways=5).double()
    x = random_images()
    # Each image's output depends on the other images of the batch (transductive BatchNorm, as MAML).
    alone = backbone(x[:3])
    together = backbone(x)[:3]
    assert not torch.allclose(alone, together)
    assert not any(isinstance(b, torch.Tensor) and b.numel() for b in backbone.buffers())  # no running stats


@pytest.mark.parametrize("form", ["residual", "bare"])
@pytest.mark.parametrize("split", ["plain", "published"])
def test_identity_kml_leaves_the_backbone_unchanged(form, split):
    torch.manual_seed(0)
    backbone = Backbone(3, 4, 20, "published", ways=5).double()
    generator = KMLGenerator(16, backbone.conv_shapes, form, split, identity_init=True).double()
    embedding = torch.randn(16, dtype=torch.float64)  # any task: the identity start ignores it
    modulation = generator(embedding)
    for index in range(1, 5):
        assert torch.equal(modulation[f"kernel{index}"], torch.ones_like(modulation[f"kernel{index}"]))
        assert torch.equal(modulation[f"bias{index}"], torch.zeros_like(modulation[f"bias{index}"]))
    x = random_images()
    torch.testing.assert_close(backbone(x, modulation), backbone(x), rtol=0, atol=0)


def test_identity_start_gives_gradients_to_the_generator():
    """Residual KML starts at the identity yet still learns: v gets a gradient (u is non-zero)."""
    torch.manual_seed(0)
    backbone = Backbone(3, 4, 20, "published", ways=5).double()
    generator = KMLGenerator(16, backbone.conv_shapes, "residual", "plain", identity_init=True).double()
    loss = backbone(random_images(), generator(torch.randn(16, dtype=torch.float64))).logsumexp(-1).sum()
    loss.backward()
    assert generator.layers[0].v.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("split", ["plain", "published"])
def test_kml_modulated_kernel_is_rank_one_relative_to_the_base_kernel(split):
    torch.manual_seed(0)
    backbone = Backbone(3, 4, 20, "published").double()
    for form in ("bare", "residual"):
        generator = KMLGenerator(16, backbone.conv_shapes, form, split, identity_init=False).double()
        modulation = generator(torch.randn(16, dtype=torch.float64))
        for layer, shape in enumerate(backbone.conv_shapes):
            weight = getattr(backbone, f"conv{layer + 1}").weight.detach()
            modulated = weight * modulation[f"kernel{layer + 1}"]
            ratio = modulated / weight  # W'/W, elementwise
            if form == "residual":
                ratio = ratio - 1
            matrix = ratio.reshape(factor_shape(shape, layer, split))
            singular = torch.linalg.svdvals(matrix)
            assert singular[0] > 1e-3
            assert singular[1] / singular[0] < 1e-10, (form, split, layer)
    # The two splits are different matricisations for layers 2-4 (same for layer 1).
    shape = backbone.conv_shapes[1]
    assert factor_shape(shape, 1, "plain") == (shape[0], shape[1] * 9)
    assert factor_shape(shape, 1, "published") == (3 * shape[0], 3 * shape[1])
    assert factor_shape(backbone.conv_shapes[0], 0, "published") == factor_shape(backbone.conv_shapes[0], 0, "plain")


def test_film_is_kml_with_a_factor_constant_along_the_input_axis():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).double()
    x = random_images()
    scale, shift = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    film = scale[:, None, None] * conv(x) + shift[:, None, None]
    factor, beta = film_as_kml(scale, shift, conv.weight, conv.bias)
    # The factor is rank 1 and constant along the (in, k, k) axis.
    assert torch.equal(factor, factor[:, :1, :1, :1].expand_as(factor))
    kml = F.conv2d(x, conv.weight * factor, conv.bias + beta, padding=1)
    torch.testing.assert_close(kml, film, rtol=1e-12, atol=1e-12)


def test_film_generator_identity_start():
    backbone = Backbone(3, 4, 20, "published", ways=5).double()
    generator = FiLMGenerator(16, backbone.channels, identity_init=True).double()
    x = random_images()
    torch.testing.assert_close(
        backbone(x, generator(torch.randn(16, dtype=torch.float64))), backbone(x), rtol=0, atol=0
    )


def test_modulation_comes_from_the_support_set_and_varies_by_task():
    config = LearnerConfig(modulation="kml", image_size=20, base_channels=4, encoder_channels=4, identity_init=False)
    model = TaskModel(config).double()
    a = model.modulation(random_images(seed=1), torch.arange(6) % 5)
    b = model.modulation(random_images(seed=2), torch.arange(6) % 5)
    assert not torch.allclose(a["kernel1"], b["kernel1"])


def test_encoder_with_labels_requires_labels():
    config = LearnerConfig(
        modulation="film", image_size=20, base_channels=4, encoder_channels=4, encoder_uses_labels=True
    )
    model = TaskModel(config)
    labels = torch.arange(6) % 5
    assert model.modulation(torch.randn(6, 3, 20, 20), labels)["scale1"].shape == (4, 1, 1)
    with pytest.raises(ValueError, match="labels"):
        model.encoder(torch.randn(6, 3, 20, 20))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("algorithm", "reptile", "maml, protonet"),
        ("modulation", "lora", "kml, film, none"),
        ("ways", 1, "ways must be an integer >= 2"),
        ("inner_lr", -1.0, ">= 0"),
        ("image_size", 8, "image_size must be an integer >= 16"),
        ("image_size", None, "image_size must be an integer >= 16, got nothing"),
        ("first_order", "yes", "true or false"),
    ],
)
def test_config_rejects_bad_values_in_one_line(field, value, message):
    with pytest.raises(KMLError, match=message) as info:
        LearnerConfig(**{field: value})
    assert "\n" not in str(info.value)


def test_config_round_trip_and_unknown_fields():
    config = LearnerConfig(algorithm="protonet", modulation="film", multi_maml=True, num_modes=3)
    assert LearnerConfig.from_dict(config.to_dict()) == config
    assert config.method == "multi-film-protonet"
    with pytest.raises(KMLError, match="unknown learner config fields"):
        LearnerConfig.from_dict({**config.to_dict(), "depth": 5})


def test_config_saved_before_the_rename_still_loads():
    """0.1 checkpoints say ``model`` (the kind of modulation) and ``modulation`` (KML's form)."""
    from kml.config.run import RunConfig

    old = LearnerConfig(modulation="film", kml_form="bare").to_dict()
    old["model"], old["modulation"] = old.pop("modulation"), old.pop("kml_form")
    assert LearnerConfig.from_dict(old) == LearnerConfig(modulation="film", kml_form="bare")
    run = RunConfig.from_dict(
        {
            "modes": ["synthetic"],
            "learner": old,
            "recipe": "kml-maml@1",
            "recipe_overrides": ["model", "modulation", "steps"],
        }
    )
    assert run.learner.modulation == "film" and run.learner.kml_form == "bare"
    assert run.recipe_overrides == ["modulation", "kml_form", "steps"]


def test_kml_train_config_file_with_the_old_field_names_still_runs(tmp_path):
    import json

    from kml.cli import train as train_cli

    old = {
        "model": "film",
        "modulation": "bare",
        "modes": ["glyphs"],
        "image_size": 16,
        "base_channels": 4,
        "encoder_channels": 4,
        "meta_batch": 2,
        "queries": 2,
        "inner_steps": 1,
        "eval_inner_steps": 1,
        "steps": 1,
        "val_every": 1,
        "val_episodes": 2,
        "checkpoint_every": 1,
        "train_dir": str(tmp_path / "runs"),
        "run_name": "old",
        "data_root": str(tmp_path / "data"),
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert train_cli.main(["--config", str(tmp_path / "old.json"), "--no-progress"]) == 0
    learner = json.loads((tmp_path / "runs" / "old" / "config.json").read_text())["learner"]
    assert learner["modulation"] == "film" and learner["kml_form"] == "bare" and "model" not in learner
