"""Meta-learners: the batched (vmap) path against the per-task reference loop, second-order
meta-gradients against finite differences, first-order MAML's definition, the inner loop, and
every paper method learning on the synthetic modes."""

from __future__ import annotations

import copy
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from kml.algorithms import MAML, build_learner
from kml.config import LearnerConfig
from kml.config.recipes import RECIPES
from kml.data.sampler import MixtureSampler
from kml.evaluation import evaluate

TINY = dict(
    ways=3,
    image_size=16,
    base_channels=4,
    encoder_channels=4,
    num_modes=3,
    inner_steps=2,
    eval_inner_steps=3,
    inner_lr=0.3,
)

METHODS = {
    "maml": dict(algorithm="maml", modulation="none"),
    "multi-maml": dict(algorithm="maml", modulation="none", multi_maml=True),
    "mmaml-film": dict(algorithm="maml", modulation="film"),
    "kml-maml": dict(algorithm="maml", modulation="kml"),
    "kml-maml-released": dict(algorithm="maml", modulation="kml", kml_form="bare", factor_split="published"),
    "kml-maml-first-order": dict(algorithm="maml", modulation="kml", first_order=True),
    "kml-maml-meta-sgd-clip": dict(algorithm="maml", modulation="kml", meta_sgd=True, inner_grad_clip=0.5),
    "kml-maml-labels-conv4": dict(algorithm="maml", modulation="kml", encoder_uses_labels=True, backbone="conv4"),
    "protonet": dict(algorithm="protonet", modulation="none", proto_refine=False),
    "kml-protonet": dict(algorithm="protonet", modulation="kml"),
    "multi-film-protonet": dict(algorithm="protonet", modulation="film", multi_maml=True),
}


def recipe_method(name: str, **extra) -> dict:
    """A recipe's learner settings at the tiny test size (its sizes, steps and rate replaced by TINY's)."""
    learner_fields = {f.name for f in fields(LearnerConfig)}
    settings = {k: v for k, v in RECIPES[name].settings.items() if k in learner_fields}
    for size in ("base_channels", "encoder_channels", "inner_steps", "eval_inner_steps", "inner_lr"):
        settings.pop(size, None)
    if settings.get("encoder_hidden") is not None:
        settings["encoder_hidden"] = 8
    return {**settings, **extra}


# Every recipe (a learner once: "-as-released" MAML recipes differ only in their run's quirks), plus variants where its
# inner clamp binds and where modes differ in rates and step counts.
for _name in RECIPES:
    if recipe_method(_name) not in METHODS.values():
        METHODS[f"recipe-{_name}"] = recipe_method(_name)
METHODS.update(
    {
        "recipe-mmaml-clamp-binds": recipe_method("mmaml", inner_grad_clamp=1e-3),
        "recipe-multi-maml-per-mode": recipe_method(
            "multi-maml", mode_inner_lr=[0.4, 0.05, 0.1], mode_inner_steps=[1, 3, 2]
        ),
        "recipe-maml-per-mode-rates": recipe_method("maml", mode_inner_lr=[0.4, 0.05, 0.1], mode_inner_steps=[0, 3, 2]),
    }
)


@pytest.fixture(scope="module")
def stores(synthetic_stores):
    """The session's synthetic stores (conftest.py), train and test."""
    return synthetic_stores


@pytest.fixture(scope="module")
def episode(stores, device):
    """A fixed float64 meta-batch of 4 tasks from the 3 synthetic modes (every mode present), on the test device."""
    return (
        MixtureSampler(stores["train"], ways=3, shots=2, queries=3, meta_batch=4, seed=3)
        .sample()
        .to_float(torch.float64)
        .to(device)
    )


def tiny_learner(seed: int = 0, perturb: float = 0.05, device: str | torch.device = "cpu", **method) -> torch.nn.Module:
    torch.manual_seed(seed)  # drawn on the CPU, then moved: the same learner on every device
    learner = build_learner(LearnerConfig(**{**TINY, **method})).double()
    with torch.no_grad():  # away from the identity start so that modulation matters
        for p in learner.parameters():
            p.add_(perturb * torch.randn_like(p))
    return learner.to(device).train()


def meta_gradients(learner, loss) -> dict[str, torch.Tensor]:
    names, params = zip(*learner.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


def assert_gradients_close(ours: dict, reference: dict, rtol: float = 1e-10) -> None:
    """Every meta-gradient equal to ``rtol`` relative to the largest gradient entry.

    (Some are exactly zero in theory, e.g. a conv bias before batch-statistics BatchNorm, so an
    elementwise relative test would compare rounding noise.) The gradients are float64: two paths that sum
    the same terms in another order differ by ~1e-16 per operation (measured: at most 5e-13 of the largest
    gradient), so 1e-10 holds on any kernels and still fails a wrong term."""
    scale = max(g.abs().max().item() for g in reference.values())
    assert scale > 0
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("batching", ["packed", "vmap"])
@pytest.mark.parametrize("method", METHODS)
def test_batched_path_equals_reference_loop(method, batching, episode):
    learner = tiny_learner(device=episode.device, **METHODS[method])
    learner.backend = batching
    batched = learner(episode)
    reference = learner.reference_forward(episode)
    torch.testing.assert_close(batched.task_loss, reference.task_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batched.task_accuracy, reference.task_accuracy)
    assert batched.task_accuracy.requires_grad is False
    assert_gradients_close(meta_gradients(learner, batched.loss), meta_gradients(learner, reference.loss))


@pytest.mark.parametrize("batching", ["packed", "vmap"])
@pytest.mark.parametrize(
    "method",
    ["kml-maml", "kml-protonet", "recipe-mmaml", "recipe-kml-protonet-released", "recipe-kml-protonet-as-released"],
)
def test_batched_path_equals_reference_in_eval_under_no_grad(method, batching, episode):
    learner = tiny_learner(device=episode.device, **METHODS[method]).eval()
    learner.backend = batching
    with torch.no_grad():
        batched = learner(episode)
        reference = learner.reference_forward(episode)
    torch.testing.assert_close(batched.task_loss, reference.task_loss, rtol=1e-10, atol=1e-12)
    # eval uses eval_inner_steps (3), training inner_steps (2): they differ for MAML.
    if METHODS[method]["algorithm"] == "maml":
        assert not torch.allclose(batched.task_loss, learner.train()(episode).task_loss.detach())


@pytest.mark.parametrize("batching", ["packed", "vmap"])
def test_multi_maml_uses_the_parameter_set_of_each_task_mode(batching, episode):
    learner = tiny_learner(device=episode.device, **METHODS["multi-maml"])
    learner.backend = batching
    output = learner(episode)
    grads = meta_gradients(learner, output.task_loss[0])
    mode = int(episode.mode[0])
    for m in range(3):
        touched = grads[f"models.{m}.backbone.conv1.weight"].abs().sum() > 0
        assert touched == (m == mode)


@pytest.mark.parametrize("batching", ["packed", "vmap"])
def test_second_order_meta_gradient_matches_finite_differences(batching, episode):
    learner = tiny_learner(device=episode.device, **{**METHODS["kml-maml"], "inner_lr": 0.05})
    learner.backend = batching
    small = episode.select([0, 1])
    params = dict(learner.named_parameters())
    gradient = meta_gradients(learner, learner(small).loss)
    generator = torch.Generator().manual_seed(0)
    direction = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for n, p in params.items()}
    analytic = sum((gradient[n] * direction[n]).sum() for n in params)
    # ReLU kinks and batch statistics over a few 1x1 maps make the loss rough at larger steps:
    # central differences only settle below ~1e-6 (measured: 1e-5 is off by 0.1%, 1e-7 agrees to 1e-8).
    eps = 1e-7

    def loss_at(sign: float) -> torch.Tensor:
        shifted = {n: p.detach() + sign * eps * direction[n] for n, p in params.items()}
        with torch.no_grad():
            return functional_call(learner, shifted, (small,)).loss

    numeric = (loss_at(1.0) - loss_at(-1.0)) / (2 * eps)
    assert abs(analytic.item() - numeric.item()) <= 1e-6 * max(1.0, abs(numeric.item()))


def test_first_order_differs_from_second_order_and_matches_its_definition(episode):
    second = tiny_learner(device=episode.device, **METHODS["maml"])
    first = tiny_learner(device=episode.device, **{**METHODS["maml"], "first_order": True})
    # same forward (first_order changes only the backward): the same float64 operations
    torch.testing.assert_close(first(episode).loss, second(episode).loss, rtol=1e-12, atol=0)
    g_first, g_second = meta_gradients(first, first(episode).loss), meta_gradients(second, second(episode).loss)
    name = "models.0.backbone.conv1.weight"
    assert (g_first[name] - g_second[name]).abs().max() > 1e-4 * g_second[name].abs().max()

    # First-order MAML's meta-gradient is the query-loss gradient at the adapted parameters.
    backbone = first.models[0].backbone
    expected = {n: torch.zeros_like(p) for n, p in backbone.named_parameters()}
    for t in range(episode.num_tasks):
        fast = {n: p.detach().clone().requires_grad_() for n, p in backbone.named_parameters()}
        for _ in range(TINY["inner_steps"]):
            loss = F.cross_entropy(functional_call(backbone, fast, (episode.support_x[t],)), episode.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {n: (p - TINY["inner_lr"] * g).detach().requires_grad_() for (n, p), g in zip(fast.items(), grads)}
        query_loss = F.cross_entropy(functional_call(backbone, fast, (episode.query_x[t],)), episode.query_y[t])
        for n, g in zip(fast, torch.autograd.grad(query_loss, list(fast.values()))):
            expected[n] += g / episode.num_tasks
    assert_gradients_close(
        {f"models.0.backbone.{n}": g_first[f"models.0.backbone.{n}"] for n in expected},
        {f"models.0.backbone.{n}": g for n, g in expected.items()},
    )


@pytest.mark.parametrize("method", ["maml", "kml-maml"])
def test_inner_steps_strictly_lower_the_support_loss(method, episode):
    learner = tiny_learner(device=episode.device, **{**METHODS[method], "inner_lr": 0.05})
    support_as_query = replace(episode, query_x=episode.support_x, query_y=episode.support_y)
    with torch.no_grad():
        losses = [learner(support_as_query, inner_steps=steps).task_loss for steps in range(5)]
    for before, after in zip(losses, losses[1:]):
        assert (after < before).all()


def test_meta_sgd_rates_are_learned_and_start_at_the_inner_lr(episode):
    learner = tiny_learner(perturb=0.0, device=episode.device, **METHODS["kml-maml-meta-sgd-clip"])
    rates = learner.inner_rates[0]
    assert all(torch.allclose(r, torch.full_like(r, TINY["inner_lr"])) for r in rates.values())
    grads = meta_gradients(learner, learner(episode).loss)
    assert grads["inner_rates.0.conv1__weight"].abs().sum() > 0


def test_inner_parameters_are_the_backbone_only():
    learner = tiny_learner(**METHODS["kml-maml"])
    inner = learner.inner_parameter_names()
    assert inner and all(".backbone." in n for n in inner)
    assert any(".generator." in n for n, _ in learner.named_parameters() if n not in inner)


def test_fresh_kml_learner_equals_plain_maml(episode):
    """Identity-at-start: a fresh KML learner computes exactly what the plain backbone computes."""
    torch.manual_seed(0)
    kml = build_learner(LearnerConfig(**{**TINY, "modulation": "kml"})).double().to(episode.device)
    plain = build_learner(LearnerConfig(**{**TINY, "modulation": "none"})).double().to(episode.device)
    plain.models[0].backbone.load_state_dict(kml.models[0].backbone.state_dict())
    # bit-equal on the CPU; CUDA's atomic adds (e.g. in the inner loop's pooling backward) may reorder a float64 sum
    exact = episode.device.type == "cpu"
    torch.testing.assert_close(kml(episode).task_loss, plain(episode).task_loss, rtol=0 if exact else 1e-12, atol=0)


LEARNING = {
    "maml": dict(algorithm="maml", modulation="none"),
    "multi-maml": dict(algorithm="maml", modulation="none", multi_maml=True),
    "mmaml": dict(algorithm="maml", modulation="film"),
    "kml-maml": dict(algorithm="maml", modulation="kml"),
    "protonet": dict(algorithm="protonet", modulation="none"),
    "kml-protonet": dict(algorithm="protonet", modulation="kml"),
}


@pytest.mark.parametrize("method", LEARNING)
def test_every_method_learns_and_beats_chance_on_held_out_classes(method, stores):
    torch.manual_seed(0)
    config = LearnerConfig(
        ways=5,
        image_size=16,
        base_channels=8,
        encoder_channels=4,
        num_modes=3,
        inner_steps=1,
        eval_inner_steps=3,
        inner_lr=0.4,
        **LEARNING[method],
    )
    learner = build_learner(config)
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-3)
    sampler = MixtureSampler(stores["train"], ways=5, shots=1, queries=5, meta_batch=4, seed=0, dtype=torch.uint8)
    for _ in range(200):
        loss = learner(sampler.sample().to_float()).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    results = evaluate(learner, stores["test"], 5, 1, 5, episodes=60, seed=0, progress=False)
    average = sum(r.accuracy for r in results) / len(results)
    assert average > 20 + 10, [(r.mode, r.accuracy) for r in results]  # 5-way chance is 20%


def test_parameters_saved_before_0_3_load():
    """kml 0.2 kept Meta-SGD rates inside each task model and kml.MAML's model under ``model.``: both load."""
    learner = tiny_learner(**METHODS["kml-maml-meta-sgd-clip"])
    saved = {
        name.replace("inner_rates.0.", "models.0.inner_rates."): value.clone()
        for name, value in learner.state_dict().items()
    }
    assert "models.0.inner_rates.conv1__weight" in saved  # the 0.2 layout
    fresh = tiny_learner(seed=1, **METHODS["kml-maml-meta-sgd-clip"])
    fresh.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), learner.state_dict().values()))

    user = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(3)
    )
    user(torch.zeros(2, 3, 8, 8))
    generic = MAML(user, inner_steps=1)
    # 0.2 saved the model under "model." and, having dropped its BatchNorm statistics, none of them
    old = {
        name.replace("models.0.", "model."): value.clone()
        for name, value in generic.state_dict().items()
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    other = MAML(copy.deepcopy(user).apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None))
    other.load_state_dict(old)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), generic.parameters()))
