"""The library validates what the command line validates, and names settings as the caller wrote them (issue 22).

Each case here passed unchecked (or as a TypeError) before: a negative inner clip reversed every inner gradient,
ProtoNet took MAML-only settings and recorded them, and Python users were told about flags they never typed.
"""

from __future__ import annotations

import pytest
from torch import nn

import kml
from kml.cli import train as train_cli
from kml.config import LearnerConfig
from kml.config.run import RunConfig
from kml.errors import KMLError, named_as_flags, setting


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))


@pytest.mark.parametrize(
    "keywords, message",
    [
        ({"inner_grad_clip": -1}, "MAML: inner_grad_clip must be a finite number > 0, got -1"),
        ({"inner_grad_clip": 0}, "MAML: inner_grad_clip must be a finite number > 0, got 0"),
        ({"inner_grad_clamp": -20.0}, "MAML: inner_grad_clamp must be a finite number > 0, got -20"),
        ({"inner_lr": float("nan")}, "MAML: inner_lr must be a finite number >= 0, got nan"),
        ({"inner_lr": "0.1"}, "MAML: inner_lr must be a finite number >= 0, got the text '0.1'"),
        ({"inner_steps": 1.5}, "MAML: inner_steps must be an integer from 0 to 1000, got 1.5"),
        ({"eval_inner_steps": -1}, "MAML: eval_inner_steps must be an integer from 0 to 1000, got -1"),
        ({"eval_inner_steps": 10**9}, "MAML: eval_inner_steps must be an integer from 0 to 1000, got 1000000000"),
        ({"first_order": "yes"}, "MAML: first_order must be true or false, got 'yes'"),
    ],
)
def test_generic_maml_checks_its_keywords_like_kml_train(keywords, message):
    with pytest.raises(KMLError) as error:
        kml.MAML(tiny_model(), **keywords)
    assert str(error.value).startswith(message), error.value


def test_generic_maml_keeps_valid_keywords():
    learner = kml.MAML(tiny_model(), inner_lr=1, inner_steps=2, eval_inner_steps=None, inner_grad_clip=10)
    assert (learner.inner_lr, learner.eval_inner_steps, learner.inner_grad_clip) == (1.0, 2, 10.0)
    assert isinstance(learner.inner_lr, float) and isinstance(learner.inner_grad_clip, float)


def test_generic_protonet_checks_refine():
    with pytest.raises(KMLError, match="ProtoNet: refine must be true or false, got 1"):
        kml.ProtoNet(tiny_model(), refine=1)


def test_learner_config_without_an_image_size_is_one_line():
    with pytest.raises(KMLError, match=r"^image_size must be an integer >= 16, got nothing \(null\)$"):
        LearnerConfig(image_size=None)


@pytest.mark.parametrize(
    "field, value",
    [
        ("inner_grad_clamp", 20.0),
        ("inner_grad_clip", 1.0),
        ("mode_inner_lr", [0.1, 0.2]),
        ("mode_inner_steps", [1, 2]),
        ("first_order", True),
        ("meta_sgd", True),
    ],
)
def test_protonet_refuses_maml_only_settings(field, value):
    with pytest.raises(KMLError) as error:
        LearnerConfig(algorithm="protonet", **{field: value})
    assert str(error.value) == (
        f"{field} only apply to MAML's inner loop, which algorithm='protonet' does not have; drop it"
    )


def test_python_errors_name_fields_and_command_line_errors_name_flags():
    with pytest.raises(KMLError, match=r"^encoder_hidden must be an integer >= 1, got 0$"):
        LearnerConfig(encoder_hidden=0)
    with pytest.raises(KMLError, match=r"^encoder_uses_labels needs a task encoder; modulation='none' has none"):
        LearnerConfig(modulation="none", encoder_uses_labels=True)
    with pytest.raises(KMLError, match=r"^unknown policy 'sometimes'"):
        RunConfig(modes=["synthetic"], policy="sometimes")
    with named_as_flags():
        with pytest.raises(KMLError, match=r"^--encoder-hidden must be an integer >= 1, got 0$"):
            LearnerConfig(encoder_hidden=0)
        assert setting("kml_form", "bare") == "--kml-form bare"
    assert setting("kml_form", "bare") == "kml_form='bare'"


def test_kml_train_names_the_flag(tmp_path, capsys):
    from test_training import one_line_error, tiny_args

    err = one_line_error(capsys, tiny_args(tmp_path, "--algorithm", "protonet", "--inner-grad-clamp", "20"))
    assert "--inner-grad-clamp only apply to MAML's inner loop, which --algorithm protonet does not have" in err


@pytest.mark.parametrize(
    "old, new, warnings",
    [
        (["--model", "film"], ["--modulation", "film"], 1),
        (["--model=none"], ["--modulation=none"], 1),
        (["--modulation", "bare"], ["--kml-form", "bare"], 1),
        (["--model", "kml", "--modulation", "residual"], ["--modulation", "kml", "--kml-form", "residual"], 2),
        (["--modulation", "kml", "--kml-form", "bare"], ["--modulation", "kml", "--kml-form", "bare"], 0),
    ],
)
def test_flags_of_kml_0_1_run_with_a_warning(old, new, warnings, capsys):
    assert train_cli.upgrade_renamed_flags(old) == new
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == warnings and all(line.startswith("warning: ") and "since kml 0.2.0" in line for line in lines)
    parsed = vars(train_cli.build_parser().parse_args(["--modes", "synthetic", *new]))
    assert parsed.get("modulation", "kml") in ("kml", "film", "none")
