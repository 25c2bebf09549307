"""kml as a library: MAML and ProtoNet over any nn.Module, modulate() on any CNN, ResNet-12.

Every batched path is held equal to a plain per-task loop (float64), first and second order, for user
models (an nn.Sequential with BatchNorm, a ResNet-12, both modulated by KML and FiLM).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import kml
from kml.algorithms.backends import choose_execution
from kml.config import LearnerConfig
from kml.data.episode import Episode
from kml.errors import KMLError
from kml.models.modulate import FiLMBatchNorm2d, ModulatedConv2d

WAYS, SIDE = 3, 16
TINY_WIDTHS = (4, 6, 8, 10)


def random_episode(
    tasks: int = 2, shots: int = 1, queries: int = 2, side: int = SIDE, dtype=torch.float64, device="cpu"
) -> Episode:
    """Drawn on the CPU (the same numbers on every device), then moved to ``device``."""
    generator = torch.Generator().manual_seed(0)
    labels = lambda n: torch.arange(WAYS).repeat_interleave(n).expand(tasks, -1)  # noqa: E731
    return Episode(
        support_x=torch.rand(tasks, WAYS * shots, 3, side, side, generator=generator, dtype=dtype),
        support_y=labels(shots),
        query_x=torch.rand(tasks, WAYS * queries, 3, side, side, generator=generator, dtype=dtype),
        query_y=labels(queries),
        mode=torch.arange(tasks) % 2,
        classes=torch.arange(WAYS).expand(tasks, -1),
        mode_names=("a", "b"),
    ).to(device)


def sequential(outputs: int = WAYS) -> nn.Module:
    """A user's plain CNN with BatchNorm (running statistics on, as nn.BatchNorm2d defaults)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * (SIDE // 4) ** 2, outputs),
    )


def resnet(ways: int | None = WAYS) -> nn.Module:
    return kml.ResNet12(widths=TINY_WIDTHS, ways=ways)


MODELS = {
    "sequential": lambda ways: sequential(ways or 8),
    "resnet12": resnet,
    "resnet12-kml": lambda ways: kml.modulate(resnet(ways), "kml", encoder_channels=4, identity_init=False),
    "resnet12-kml-bare": lambda ways: kml.modulate(
        resnet(ways), "kml", form="bare", encoder_channels=4, identity_init=False
    ),
    "resnet12-film": lambda ways: kml.modulate(resnet(ways), "film", encoder_channels=4, identity_init=False),
    "sequential-kml": lambda ways: kml.modulate(sequential(ways or 8), "kml", encoder_channels=4, identity_init=False),
    "sequential-film": lambda ways: kml.modulate(
        sequential(ways or 8), "film", encoder_channels=4, identity_init=False
    ),
}


def meta_gradients(learner: nn.Module, forward, device="cpu") -> list[torch.Tensor]:
    loss = forward(random_episode(device=device)).loss
    return [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(learner.parameters(), torch.autograd.grad(loss, list(learner.parameters()), allow_unused=True))
    ]


def assert_batched_equals_loop(learner: nn.Module, device="cpu") -> None:
    """float64: the batched path and the loop sum the same terms in another order, ~1e-16 per operation (measured:
    losses within 5e-15 relative, gradients within 2e-13 of the largest), so 1e-10 holds on any kernels."""
    learner = learner.double().to(device)
    batched = meta_gradients(learner, learner, device)
    loop = meta_gradients(learner, learner.reference_forward, device)
    episode = random_episode(device=device)
    torch.testing.assert_close(
        learner(episode).task_loss, learner.reference_forward(episode).task_loss, rtol=1e-10, atol=0
    )
    scale = max(float(g.abs().max()) for g in loop)
    for (name, _), a, b in zip(learner.named_parameters(), batched, loop):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * scale, msg=name)
    assert scale > 0


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("model", MODELS)
def test_maml_of_any_module_batched_equals_per_task_loop(model, order, device):
    torch.manual_seed(0)
    learner = kml.MAML(MODELS[model](WAYS), inner_lr=0.1, inner_steps=2, first_order=order == "first")
    assert_batched_equals_loop(learner, device)


@pytest.mark.parametrize("model", MODELS)
def test_protonet_of_any_module_batched_equals_per_task_loop(model, device):
    torch.manual_seed(0)
    assert_batched_equals_loop(kml.ProtoNet(MODELS[model](None), refine=model.endswith("kml")), device)


def test_maml_adapts_only_the_network_of_a_modulated_model():
    learner = kml.MAML(kml.modulate(resnet(), "kml", encoder_channels=4))
    names = learner.inner_parameter_names()
    assert names and all(name.startswith("models.0.backbone.network.") for name in names)
    assert not any(".encoder." in n or ".generator." in n for n in names)
    assert len(names) == len([n for n, _ in learner.named_parameters() if n.startswith("models.0.backbone.")])


def test_learners_train_under_an_optimizer_and_evaluate_without_gradients():
    torch.manual_seed(0)
    episode = random_episode(dtype=torch.float32)
    for learner in (
        kml.MAML(sequential(), inner_steps=1),
        kml.ProtoNet(kml.modulate(resnet(None), "film", encoder_channels=4)),
    ):
        optimizer = torch.optim.AdamW(learner.parameters(), lr=1e-3)
        before = [p.detach().clone() for p in learner.parameters()]
        learner(episode).loss.backward()
        optimizer.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, learner.parameters()))
        learner.eval()
        with torch.no_grad():
            output = learner(episode)
        assert output.task_accuracy.shape == (2,) and torch.isfinite(output.loss)


def test_the_users_module_and_its_batchnorm_statistics_are_left_as_they_were():
    torch.manual_seed(0)
    model = sequential()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:  # "pretrained" statistics
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    saved = copy.deepcopy(model.state_dict())
    episode = random_episode(dtype=torch.float32)
    for batch_norm in ("transductive", "running"):
        learner = kml.MAML(model, inner_steps=1, batch_norm=batch_norm)
        learner(episode).loss.backward()
        learner.eval()
        with torch.no_grad():
            learner(episode)
        assert all(n.track_running_stats and not n.training for n in norms)  # the flags as the learner left them
        assert all(
            torch.equal(saved[k], v) for k, v in model.state_dict().items()
        )  # statistics neither used up nor updated


@pytest.mark.parametrize("batch_norm", ["transductive", "running"])
@pytest.mark.parametrize("method", ["maml", "protonet"])
def test_batchnorm_choice_batched_equals_the_loop_and_means_what_it_says(method, batch_norm, device):
    torch.manual_seed(0)
    model = sequential() if method == "maml" else sequential(8)
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    learner = (
        kml.MAML(model, inner_lr=0.1, inner_steps=2, batch_norm=batch_norm)
        if method == "maml"
        else kml.ProtoNet(model, batch_norm=batch_norm)
    )
    assert_batched_equals_loop(learner, device)
    assert learner.settings()["batch_norm"] == batch_norm
    # with no inner step, MAML's query logits are the model's own: in eval mode for "running", training for the other
    if method == "maml":
        episode = random_episode(device=device)
        learner = learner.double().to(device)
        with torch.no_grad():
            logits = learner.predict(episode.support_x, episode.support_y, episode.query_x, inner_steps=0)
            model.train(batch_norm == "transductive")
            expected = torch.stack([model(x) for x in episode.query_x])
        model.train()
        torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)


def test_running_statistics_are_refused_for_a_network_that_keeps_none():
    with pytest.raises(KMLError, match="keeps none"):
        kml.build_learner(LearnerConfig(batch_norm="running", base_channels=2, image_size=SIDE))


# ------------------------------------------------------------------ modulate()
@pytest.mark.parametrize("kind,form", [("kml", "residual"), ("kml", "bare"), ("film", "residual")])
def test_modulate_starts_at_the_identity_on_resnet12(kind, form, device):
    torch.manual_seed(0)
    plain = kml.ResNet12(widths=TINY_WIDTHS, ways=WAYS).double().to(device)
    modulated = kml.modulate(copy.deepcopy(plain), kind, form=form, encoder_channels=4).double().to(device)
    episode = random_episode(device=device)
    modulation = modulated.modulation(episode.support_x[0], episode.support_y[0])
    assert torch.equal(modulated(episode.query_x[0], modulation), plain(episode.query_x[0]))
    # ... and the modulation reaches the output once the generator moves away from the identity
    with torch.no_grad():
        for p in modulated.generator.parameters():
            p.add_(0.1 * torch.randn_like(p))
    modulation = modulated.modulation(episode.support_x[0], episode.support_y[0])
    assert not torch.allclose(modulated(episode.query_x[0], modulation), plain(episode.query_x[0]))


def test_modulate_wraps_every_conv_of_resnet12_in_place():
    model = kml.ResNet12(widths=TINY_WIDTHS)
    names = [n for n, _ in model.named_parameters()]
    kml_model = kml.modulate(model, "kml", encoder_channels=4)
    assert sum(isinstance(m, ModulatedConv2d) for m in model.modules()) == 16  # 4 blocks x (3 convs + shortcut)
    assert [n[len("backbone.network.") :] for n, _ in kml_model.backbone.named_parameters(prefix="backbone")] == names
    assert len(kml_model.generator.layers) == 16
    film_model = kml.modulate(kml.ResNet12(widths=TINY_WIDTHS), "film", encoder_channels=4)
    assert sum(isinstance(m, FiLMBatchNorm2d) for m in film_model.modules()) == 16


def test_kml_factor_acts_on_the_kernel_as_defined(device):
    """A modulated conv computes conv(x, W * factor, b + beta) with the generator's factor and shift."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    model = kml.modulate(nn.Sequential(conv), "kml", encoder_channels=4, identity_init=False).double().to(device)
    episode = random_episode(device=device)
    modulation = model.modulation(episode.support_x[0], episode.support_y[0])
    expected = nn.functional.conv2d(
        episode.query_x[0], conv.weight * modulation["kernel1"], conv.bias + modulation["bias1"], padding=1
    )
    # float64, and the same convolution of the same modulated kernel (measured: bit-equal on the CPU)
    torch.testing.assert_close(model(episode.query_x[0], modulation), expected, rtol=1e-12, atol=1e-12)


def test_modulate_a_torchvision_resnet(device):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=WAYS).double().to(device)
    plain.eval()  # running statistics (fresh ones) in both, as their BatchNorms are in eval mode
    modulated = kml.modulate(copy.deepcopy(plain), "kml", encoder_channels=4).double().to(device)
    assert sum(isinstance(m, ModulatedConv2d) for m in modulated.modules()) == 20  # 17 3x3/7x7 + 3 downsample 1x1
    episode = random_episode(side=32, device=device)
    modulation = modulated.modulation(episode.support_x[0], episode.support_y[0])
    # float64; at the identity start every kernel is W * 1 and every bias b + 0: the same convolutions (measured: equal)
    torch.testing.assert_close(
        modulated(episode.query_x[0], modulation), plain(episode.query_x[0]), rtol=1e-12, atol=1e-12
    )
    film = kml.modulate(torchvision.models.resnet18(num_classes=8), "film", encoder_channels=4)
    output = kml.ProtoNet(film).double().to(device)(episode)
    assert torch.isfinite(output.loss)


def test_modulate_rejects_what_it_cannot_modulate_in_one_line():
    with pytest.raises(KMLError, match="no nn.BatchNorm2d"):
        kml.modulate(nn.Sequential(nn.Conv2d(3, 4, 3)), "film")
    with pytest.raises(KMLError, match="unknown modulation"):
        kml.modulate(sequential(), "lora")


# ------------------------------------------------------------------ ResNet-12
def test_resnet12_has_the_usual_few_shot_widths():
    model = kml.ResNet12()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs if c.kernel_size == (1, 1)] == [64, 160, 320, 640]
    assert model(torch.rand(2, 3, 84, 84)).shape == (2, 640)
    # 12 weighted layers: 4 blocks x 3 convs; 12.4M parameters, as the papers report
    assert sum(c.kernel_size == (3, 3) for c in convs) == 12
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 12.4


@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
@pytest.mark.parametrize("modulation", ["none", "kml", "film"])
def test_config_built_resnet12_learner_equals_its_loop(algorithm, modulation, device):
    torch.manual_seed(0)
    config = LearnerConfig(
        algorithm=algorithm,
        modulation=modulation,
        backbone="resnet12",
        base_channels=2,
        encoder_channels=4,
        ways=WAYS,
        image_size=SIDE,
        in_channels=3,
        inner_steps=2,
        multi_maml=modulation == "none",
        num_modes=2,
        identity_init=False,
        init="pytorch",
    )
    learner = kml.build_learner(config)
    assert choose_execution(learner.model, learner.backend).name == "vmap"
    assert_batched_equals_loop(learner, device)


def test_resnet12_rejects_the_packed_path_in_one_line():
    learner = kml.build_learner(LearnerConfig(backbone="resnet12", base_channels=2, image_size=SIDE))
    with pytest.raises(KMLError, match="packed backend"), learner.using_backend("packed"):
        pass


@pytest.mark.parametrize(
    "method",
    [
        ["--algorithm", "maml", "--modulation", "kml"],
        ["--algorithm", "maml", "--modulation", "film"],
        ["--algorithm", "maml", "--modulation", "none", "--multi-maml"],
        ["--algorithm", "protonet", "--modulation", "kml"],
    ],
    ids=lambda m: "-".join(m[1::2]),
)
def test_kml_train_and_eval_with_resnet12_backbone(tmp_path, method):
    import json

    from kml.cli import evaluate as eval_cli
    from kml.cli import train as train_cli

    argv = [
        "--modes",
        "glyphs",
        "shapes",
        "--backbone",
        "resnet12",
        "--image-size",
        "16",
        "--base-channels",
        "2",
        "--encoder-channels",
        "4",
        "--meta-batch",
        "2",
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
        "2",
        "--checkpoint-every",
        "2",
        "--log-every",
        "1",
        "--no-progress",
        "--train-dir",
        str(tmp_path / "runs"),
        "--run-name",
        "r",
        "--data-root",
        str(tmp_path / "data"),
        *method,
    ]
    if "protonet" in method:  # ProtoNet has no inner loop, and a setting that does nothing is refused
        del argv[argv.index("--inner-steps") : argv.index("--inner-steps") + 4]
    assert train_cli.main(argv) == 0
    run = tmp_path / "runs" / "r"
    assert json.loads((run / "config.json").read_text())["learner"]["backbone"] == "resnet12"
    out = tmp_path / "eval.json"
    assert (
        eval_cli.main(
            [
                "--checkpoint",
                str(run / "checkpoints" / "last.pt"),
                "--episodes",
                "2",
                "--no-progress",
                "--data-root",
                str(tmp_path / "data"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert [r["mode"] for r in json.loads(out.read_text())["results"]] == ["glyphs", "shapes", "average"]


@pytest.mark.parametrize("order", ["second", "first"])
def test_transference_of_a_generic_learner_equals_its_definition(order, device):
    """Z(i->j) of kml.MAML over a modulated user model, against the lookahead computed by hand with the loop."""
    from torch.func import functional_call

    torch.manual_seed(0)
    learner = (
        kml.MAML(
            kml.modulate(sequential(), "kml", encoder_channels=4, identity_init=False),
            inner_lr=0.1,
            inner_steps=1,
            first_order=order == "first",
        )
        .double()
        .to(device)
    )
    episode, rate = random_episode(tasks=3, device=device), 1e-3
    z = kml.task_transference(learner, episode, rate=rate).z
    params = dict(learner.named_parameters())
    base = learner.reference_forward(episode).task_loss.detach()
    for source in range(3):
        grads = torch.autograd.grad(learner.reference_forward(episode.select([source])).loss, list(params.values()))
        lookahead = {name: p.detach() - rate * g for (name, p), g in zip(params.items(), grads)}
        after = functional_call(learner, lookahead, (episode,)).task_loss.detach()
        # float64, both exact Z (no approximation); they differ in summation order (measured: 1e-15, |Z| ~ 1e-2)
        torch.testing.assert_close(z[source], 1 - after / base, rtol=1e-10, atol=1e-12)
    assert float(z.abs().max()) > 1e-6


@pytest.mark.parametrize(
    "method",
    [
        dict(algorithm="maml", modulation="kml"),
        dict(algorithm="maml", modulation="film"),
        dict(algorithm="protonet", modulation="kml", proto_refine=False),
    ],
    ids=lambda m: f"{m['modulation']}-{m['algorithm']}",
)
def test_generic_learner_over_kml_task_model_equals_the_packed_fast_path(method, device):
    """kml's config-built learner (packed layout) is the fast special case of the generic core: same numbers."""
    torch.manual_seed(0)
    config = LearnerConfig(
        **method,
        base_channels=4,
        encoder_channels=4,
        ways=WAYS,
        image_size=SIDE,
        in_channels=3,
        inner_steps=2,
        inner_lr=0.1,
        identity_init=False,
        init="pytorch",
    )
    fast = kml.build_learner(config).double().to(device)
    task_model = fast.models[0]
    generic = (
        kml.MAML(task_model, inner_lr=0.1, inner_steps=2)
        if config.algorithm == "maml"
        else kml.ProtoNet(task_model, refine=False)
    )
    assert choose_execution(fast.model, fast.backend).name == "packed"
    episode = random_episode(device=device)
    a = torch.autograd.grad(fast(episode).loss, list(task_model.parameters()))
    b = torch.autograd.grad(generic(episode).loss, list(task_model.parameters()))
    # float64, summation order only (measured: within 4e-13 of the largest gradient)
    scale = max(float(y.abs().max()) for y in b)
    for (name, _), x, y in zip(task_model.named_parameters(), a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10 * scale, msg=name)


def test_trainer_resumes_a_generic_learner_exactly(tmp_path, synthetic_stores):
    """kml.Trainer with kml.MAML over a modulated user model: 2 steps, resumed to 4 == 4 straight."""

    def run(name: str, resume: bool, steps: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        sampler = kml.MixtureSampler(synthetic_stores["train"], ways=WAYS, shots=1, queries=2, meta_batch=2, seed=0)
        learner = kml.MAML(kml.modulate(sequential(), "kml", encoder_channels=4), inner_lr=0.1, inner_steps=1)
        optimizer = torch.optim.AdamW(learner.parameters(), lr=1e-3)
        trainer = kml.Trainer(
            learner,
            sampler,
            optimizer,
            run_dir=tmp_path / name,
            resume=resume,
            progress=False,
            checkpoint_every=2,
            log_every=1,
        )
        trainer.fit(steps)
        return {k: v.clone() for k, v in learner.state_dict().items()}

    straight = run("straight", False, 4)
    run("cut", False, 2)
    resumed = run("cut", True, 4)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_transference_of_a_learner_that_only_maps_episodes_to_losses():
    """The analyzer needs only learner(episode) -> LearnerOutput: no inner_steps argument, no parameter groups."""

    class EpisodeToLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.protonet = kml.ProtoNet(sequential(8))

        def forward(self, episode: Episode) -> kml.LearnerOutput:
            return self.protonet(episode)

    torch.manual_seed(0)
    learner = EpisodeToLoss().double()
    z = kml.task_transference(learner, random_episode(tasks=3), rate=1e-2).z
    assert z.shape == (3, 3) and torch.isfinite(z).all() and float(z.abs().max()) > 0
    with pytest.raises(KMLError, match="inner_parameter_names"):
        kml.task_transference(learner, random_episode(tasks=3), rate=1e-2, parameters="backbone")


@pytest.mark.parametrize("learner", ["maml", "protonet"])
def test_predict_gives_the_logits_the_loss_is_computed_from(learner, device):
    """predict() needs no query labels; its argmax gives the accuracy forward() reports, its log-softmax the loss."""
    torch.manual_seed(0)
    model = kml.modulate(resnet(WAYS if learner == "maml" else None), "kml", encoder_channels=4, identity_init=False)
    meta = (
        (kml.MAML(model, inner_lr=0.1, inner_steps=2) if learner == "maml" else kml.ProtoNet(model, refine=True))
        .double()
        .to(device)
    )
    episode = random_episode(device=device)
    logits = meta.predict(episode.support_x, episode.support_y, episode.query_x)
    assert logits.shape == (2, WAYS * 2, WAYS)
    output = meta(episode)
    assert torch.equal((logits.argmax(-1) == episode.query_y).float().mean(-1), output.task_accuracy)
    loss = (
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten(), reduction="none")
        .view(2, -1)
        .mean(-1)
    )
    torch.testing.assert_close(loss, output.task_loss, rtol=1e-12, atol=0)  # float64, the same logits (measured: equal)


# ------------------------------------------------------------------ a network named by import path
NAMED = {"network": "kml.models.resnet12:ResNet12", "network_args": {"widths": [2, 2, 2, 2], "ways": WAYS}}


@pytest.mark.parametrize("modulation", ["kml", "film", "none"])
@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
def test_a_network_named_by_import_path_is_built_modulated_and_equals_the_loop(algorithm, modulation, device):
    torch.manual_seed(0)
    args = NAMED["network_args"] if algorithm == "maml" else {**NAMED["network_args"], "ways": None}
    config = LearnerConfig(
        algorithm=algorithm,
        modulation=modulation,
        network=NAMED["network"],
        network_args=args,
        encoder_channels=4,
        ways=WAYS,
        image_size=SIDE,
        inner_steps=2,
        identity_init=False,
        init="pytorch",
    )
    learner = kml.build_learner(config)
    network = learner.model.backbone.network if modulation != "none" else learner.model
    assert isinstance(network, kml.ResNet12) and learner.settings()["model"].endswith(
        "ModulatedModel" if modulation != "none" else "ResNet12"
    )
    assert LearnerConfig.from_dict(config.to_dict()) == config  # recorded, so a checkpoint rebuilds it
    assert_batched_equals_loop(learner, device)


@pytest.mark.parametrize(
    "path,message",
    [
        ("os:system", "neither an nn.Module subclass nor a function annotated"),
        ("collections:OrderedDict", "neither an nn.Module subclass"),
        ("torch.jit:load", "neither an nn.Module subclass"),
        ("no_such_package.nets:Net", "cannot be imported"),
    ],
)
def test_a_named_network_is_only_a_module_constructor(path, message):
    """A config file or checkpoint names the network: kml calls module constructors only, nothing else."""
    with pytest.raises(KMLError, match=message):
        kml.build_learner(LearnerConfig(network=path, image_size=SIDE))


def test_a_factory_function_annotated_to_return_a_module_is_accepted():
    pytest.importorskip("torchvision")
    from kml.models.task_model import resolve_network

    assert callable(resolve_network("torchvision.models:resnet18"))
    with pytest.raises(KMLError, match="import path"):
        LearnerConfig(network="torchvision.models.resnet18")
    with pytest.raises(KMLError, match="JSON"):
        LearnerConfig(network="torchvision.models:resnet18", network_args={"weights": object()})


# ------------------------------------------------------------------ mistakes are one sentence
def test_a_head_wider_than_the_episodes_ways_is_refused():
    learner = kml.MAML(sequential(10), inner_steps=1)
    with pytest.raises(KMLError, match=rf"10 outputs for {WAYS}-way episodes.*a {WAYS}-way head"):
        learner(random_episode(dtype=torch.float32))


def test_a_model_that_returns_a_tuple_is_refused_in_one_line():
    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = sequential()

        def forward(self, x):
            return self.net(x), x

    for learner in (kml.MAML(TwoOutputs(), inner_steps=1), kml.ProtoNet(TwoOutputs())):
        with pytest.raises(KMLError, match="returned a tuple, not one tensor"):
            learner(random_episode(dtype=torch.float32))


def test_uint8_episodes_are_scaled_like_the_samplers_float_episodes():
    torch.manual_seed(0)
    learner = kml.ProtoNet(sequential(8)).double()
    episode = random_episode()
    raw = dataclasses.replace(
        episode,
        support_x=(episode.support_x * 255).round().to(torch.uint8),
        query_x=(episode.query_x * 255).round().to(torch.uint8),
    )
    with torch.no_grad():
        torch.testing.assert_close(learner(raw).task_loss, learner(raw.to_float(torch.float64)).task_loss)


def test_a_flattened_resnet12_head_names_the_side_it_was_built_for():
    network = kml.ResNet12(widths=TINY_WIDTHS, ways=WAYS, pool="flatten", image_size=32)
    with pytest.raises(KMLError, match=r"built for 32px images.*got 16px.*image_size=16"):
        network(torch.zeros(2, 3, 16, 16))
