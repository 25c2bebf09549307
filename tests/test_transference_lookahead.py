"""The optimizer lookahead of transference: one real optimizer.step() on a copy, from the optimiser's state.

For Adam, AdamW (weight decay, AMSGrad) and SGD (momentum, Nesterov, weight decay), after a few real training
steps: the lookahead parameters equal those a copy of the learner and optimiser reaches with task i's
meta-gradient alone, the analyzer's Z equals Z computed from those copies, and nothing is changed.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kml.algorithms import build_learner
from kml.config import LearnerConfig
from kml.data.sampler import MixtureSampler
from kml.errors import KMLError
from kml.transference.analyzer import parameter_names, task_transference
from kml.transference.lookahead import AdamLookahead, MomentumLookahead, optimizer_lookahead, resolve_lookahead

EPS = torch.finfo(torch.float64).eps

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, amsgrad=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
}


@pytest.fixture(scope="module")
def episodes(synthetic_stores):
    stores = synthetic_stores["train"]
    sample = lambda seed: MixtureSampler(stores, 3, 1, 2, meta_batch=3, seed=seed).sample().to_float(torch.float64)  # noqa: E731
    return sample(0), [sample(seed) for seed in (1, 2, 3)]


def trained(kind: str, training: list) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A tiny KML + MAML learner (float64) after three real steps of ``kind``: moments and step count set."""
    torch.manual_seed(0)
    config = LearnerConfig(
        ways=3, image_size=16, base_channels=4, encoder_channels=4, inner_steps=1, eval_inner_steps=1, inner_lr=0.1
    )
    learner = build_learner(config).double().train()
    optimizer = OPTIMIZERS[kind](learner.parameters())
    for episode in training:
        optimizer.zero_grad()
        learner(episode).loss.backward()
        optimizer.step()
    return learner, optimizer


def stepped_copy(kind: str, learner, optimizer, episode, source: int):
    """A copy of learner and optimiser after one real optimizer.step() on task ``source``'s meta-gradient alone."""
    twin = copy.deepcopy(learner)
    twin_optimizer = OPTIMIZERS[kind](twin.parameters())
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    twin_optimizer.zero_grad(set_to_none=True)
    twin(episode.select([source])).task_loss[0].backward()
    twin_optimizer.step()
    return twin


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_optimizer_lookahead_is_one_real_step_on_a_copy(kind, episodes):
    episode, training = episodes
    learner, optimizer = trained(kind, training)
    names = parameter_names(learner, "all")
    theta = {n: p.detach() for n, p in learner.named_parameters() if n in names}
    before = copy.deepcopy(optimizer.state_dict())
    for rule in (optimizer_lookahead(optimizer, learner), optimizer_lookahead(optimizer.state_dict(), learner)):
        assert rule.kind == kind and rule.rate == optimizer.param_groups[0]["lr"]
        for source in range(episode.num_tasks):
            loss = learner(episode.select([source])).task_loss[0]
            grads = dict(zip(names, torch.autograd.grad(loss, [dict(learner.named_parameters())[n] for n in names])))
            steps = rule.updates(theta, {n: g.unsqueeze(0) for n, g in grads.items()})
            twin = dict(stepped_copy(kind, learner, optimizer, episode, source).named_parameters())
            for name in names:
                # theta + step against torch's in-place update: the same float64 operations up to their order (a
                # fused addcdiv, the decay applied first), so a few roundings of |theta| + |step| (measured 1.9)
                expected = twin[name].detach()
                got = theta[name] + steps[name][0]
                scale = theta[name].abs() + steps[name][0].abs()
                assert ((got - expected).abs() <= 8 * EPS * scale).all(), (kind, name)
    after = optimizer.state_dict()  # the lookahead read the state and changed none of it
    for key, state in before["state"].items():
        assert all(torch.equal(v, after["state"][key][k]) for k, v in state.items() if torch.is_tensor(v))


@pytest.mark.parametrize("kind", ["adam", "sgd-momentum"])
def test_analyzer_with_optimizer_lookahead_equals_z_of_stepped_copies(kind, episodes):
    episode, training = episodes
    learner, optimizer = trained(kind, training)
    result = task_transference(learner, episode, lookahead=optimizer)
    base = torch.stack([learner(episode.select([j])).task_loss[0] for j in range(episode.num_tasks)]).detach()
    for source in range(episode.num_tasks):
        twin = stepped_copy(kind, learner, optimizer, episode, source)
        with torch.no_grad():
            after = torch.stack([twin(episode.select([j])).task_loss[0] for j in range(episode.num_tasks)])
        # Both float64 and exact; the analyzer evaluates all tasks in one batch and the lookaheads under vmap, the
        # copy one task at a time: summation order only (measured: 7e-14 for Adam, 3.6e-13 for SGD's larger
        # Nesterov step, |Z| ~ 0.5); 1e-11 is far below what a wrong rule changes (next assertion).
        torch.testing.assert_close(result.z[source], 1 - after / base, rtol=0, atol=1e-11)
        if source == 0:  # the plain SGD step at the same rate is another lookahead: Z differs by far more
            plain = task_transference(learner, episode, optimizer.param_groups[0]["lr"]).z[0]
            assert float((plain - (1 - after / base)).abs().max()) > 1e-3
    assert result.lookahead == kind and float(result.z.abs().max()) > 1e-3


def test_rescaled_rate_scales_the_adam_step(episodes):
    episode, training = episodes
    learner, optimizer = trained("adam", training)
    rule, half = optimizer_lookahead(optimizer, learner), optimizer_lookahead(optimizer, learner, rate=5e-4)
    assert isinstance(rule, AdamLookahead) and half.rate == 5e-4
    names = parameter_names(learner, "all")
    theta = {n: p.detach() for n, p in learner.named_parameters()}
    grads = {n: torch.randn(2, *theta[n].shape, dtype=torch.float64) for n in names}
    full, halved = rule.updates(theta, grads), half.updates(theta, grads)
    assert all(torch.allclose(halved[n], full[n] / 2, rtol=1e-14, atol=0) for n in names)


def test_parameters_a_source_does_not_reach_take_no_step(synthetic_stores):
    """Multi-MAML: a task of one mode reaches only its mode's parameter set; Adam moves no other set."""
    torch.manual_seed(0)
    config = LearnerConfig(
        ways=3, image_size=16, base_channels=4, modulation="none", multi_maml=True, num_modes=3, inner_steps=1
    )
    learner = build_learner(config).double().train()
    episode = MixtureSampler(synthetic_stores["train"], 3, 1, 2, meta_batch=3, seed=0).sample().to_float(torch.float64)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    learner(episode).loss.backward()
    optimizer.step()  # every set now has momentum: a step from the state alone would move it
    z = task_transference(learner, episode, lookahead=optimizer).z
    across = episode.mode.unsqueeze(1) != episode.mode.unsqueeze(0)
    # Across modes the target's parameters are not moved, so only the rounding of two evaluations of the same loss
    # remains (batched lookahead against the plain forward: measured 2e-15); momentum alone moved them by Z ~ 0.2.
    assert across.any() and (z[across].abs() < 1e-12).all(), z
    assert (z[~across].abs() > 1e-6).all()


def test_lookahead_errors_are_one_line(episodes):
    episode, training = episodes
    learner, optimizer = trained("adam", training)
    with pytest.raises(KMLError, match="knows Adam, AdamW and SGD, not RMSprop; use lookahead='sgd'"):
        optimizer_lookahead(torch.optim.RMSprop(learner.parameters()), learner)
    rmsprop = torch.optim.RMSprop(learner.parameters())
    with pytest.raises(KMLError, match="not Adam's, AdamW's or SGD's"):
        optimizer_lookahead(rmsprop.state_dict(), learner)
    partial = torch.optim.Adam(list(learner.parameters())[:2]).state_dict()
    with pytest.raises(KMLError, match="holds 2 parameters and the learner trains"):
        optimizer_lookahead(partial, learner)
    with pytest.raises(KMLError, match="the sgd lookahead needs a rate"):
        resolve_lookahead("sgd", learner, None)
    with pytest.raises(KMLError, match="lookahead='optimizer' needs the optimiser"):
        task_transference(learner, episode, lookahead="optimizer")
    momentum = optimizer_lookahead(torch.optim.SGD(learner.parameters(), lr=0.1), learner)
    assert isinstance(momentum, MomentumLookahead) and momentum.kind == "sgd"  # no momentum: the plain step
