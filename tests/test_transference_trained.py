"""Transference of a trained model (not only at initialisation), float64: the batched analyzer against a per-pair
loop written out by hand, for both lookahead kinds; and Z against its first-order prediction as the rate shrinks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kml.algorithms import build_learner
from kml.config import LearnerConfig
from kml.data.sampler import MixtureSampler
from kml.transference.analyzer import parameter_names, task_transference
from kml.transference.diagnostics import linearisation

TASKS = 4
METHODS = [dict(algorithm="maml", modulation="kml"), dict(algorithm="protonet", modulation="film")]


@pytest.fixture(scope="module", params=METHODS, ids=lambda m: f"{m['algorithm']}-{m['modulation']}")
def run(request, synthetic_stores):
    """A tiny learner after six Adam steps on synthetic meta-batches (float64), its optimiser, and a fresh episode."""
    torch.manual_seed(0)
    config = LearnerConfig(
        ways=3, image_size=16, base_channels=4, encoder_channels=4, inner_steps=1, eval_inner_steps=1, inner_lr=0.1,
        **request.param,
    )  # fmt: skip
    learner = build_learner(config).double().train()
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    stores = synthetic_stores["train"]
    training = MixtureSampler(stores, 3, 1, 2, meta_batch=TASKS, seed=1)
    for _ in range(6):
        optimizer.zero_grad()
        learner(training.sample().to_float(torch.float64)).loss.backward()
        optimizer.step()
    episode = MixtureSampler(stores, 3, 1, 2, meta_batch=TASKS, seed=0).sample().to_float(torch.float64)
    return learner, optimizer, episode


def by_hand(learner, optimizer, episode, rate: float | None) -> torch.Tensor:
    """Z(i->j) pair by pair: a copy of the learner takes one step on task i alone (SGD at ``rate``, or a copy of
    ``optimizer`` steps when ``rate`` is None), then task j is evaluated alone, against task j alone before."""
    names = parameter_names(learner, "all")
    before = [learner(episode.select([j])).task_loss[0].detach() for j in range(TASKS)]
    z = torch.zeros(TASKS, TASKS, dtype=torch.float64)
    for i in range(TASKS):
        for j in range(TASKS):
            twin = copy.deepcopy(learner)
            parameters = dict(twin.named_parameters())
            loss = twin(episode.select([i])).task_loss[0]
            grads = torch.autograd.grad(loss, [parameters[n] for n in names], allow_unused=True)
            if rate is None:
                stepper = torch.optim.Adam(twin.parameters(), lr=1e-3)
                stepper.load_state_dict(copy.deepcopy(optimizer.state_dict()))
                for name, grad in zip(names, grads):
                    parameters[name].grad = grad
                stepper.step()
            else:
                with torch.no_grad():
                    for name, grad in zip(names, grads):
                        if grad is not None:
                            parameters[name].sub_(rate * grad)
            with torch.no_grad():
                z[i, j] = 1 - twin(episode.select([j])).task_loss[0] / before[j]
    return z


@pytest.mark.parametrize("lookahead", ["sgd", "optimizer"])
def test_batched_analyzer_equals_the_pair_by_pair_loop(run, lookahead):
    learner, optimizer, episode = run
    rate = 1e-4 if lookahead == "sgd" else None
    result = task_transference(learner, episode, rate, lookahead="sgd" if lookahead == "sgd" else optimizer)
    expected = by_hand(learner, optimizer, episode, rate)
    # float64 on both sides, exact Z, differing only in the order of sums (all tasks in one batch and the lookaheads
    # under vmap, against one task at a time): each loss and gradient is within ~1e-15 relative of the other's
    # (measured: Z within 5e-14, |Z| ~ 0.5); 1e-12 leaves room for other BLAS kernels and still fails on any real
    # difference (a step on the wrong task, a missed bias correction or the wrong rate moves Z by > 1e-4 here).
    torch.testing.assert_close(result.z, expected, rtol=0, atol=1e-12)
    assert float(result.z.abs().max()) > 1e-4


@pytest.mark.parametrize("lookahead", ["sgd", "optimizer"])
def test_first_order_prediction_agrees_for_small_rates(run, lookahead):
    """Z - Z_linear is curvature: of order rate^2 while Z is of order rate, so halving the rate quarters the
    error and halves the linearisation ratio; and at a small rate Z_linear predicts Z closely."""
    learner, optimizer, episode = run
    # Small enough that no step crosses a kink of these piecewise-smooth losses (ReLUs; BatchNorm over 3 support
    # images): the expansion below holds for step norms under ~1e-6 here (measured: at 1e-4 the error still grows
    # like the rate, a kink crossed). Adam's step is ~lr per element, SGD's lr * |g| with |g| ~ 1e2.
    rates = (1e-8, 5e-9) if lookahead == "sgd" else (1e-7, 5e-8)

    def measure(rate: float):
        given = "sgd" if lookahead == "sgd" else optimizer
        result = task_transference(learner, episode, rate, lookahead=given)
        return result.z, result.z_linear

    (z1, lin1), (z2, lin2) = measure(rates[0]), measure(rates[1])
    error1, error2 = (z1 - lin1).abs().sum(), (z2 - lin2).abs().sum()
    # e(r) = c2 r^2 + c3 r^3: the ratio is 4 (1 + c3 r / (2 c2)) to first order; at these rates the linearisation
    # ratio is below 1e-2, so the third-order share c3 r / c2 is too, and 4 +- 0.5 holds with room to spare.
    assert 3.5 < float(error1 / error2) < 4.5, float(error1 / error2)
    ratio1, ratio2 = linearisation(z1.numpy(), lin1.numpy()), linearisation(z2.numpy(), lin2.numpy())
    assert ratio1 < 1e-2 and 1.75 < ratio1 / ratio2 < 2.25
    # Z_linear is linear in the rate exactly (the step is), so the two predictions differ by the rates' ratio.
    torch.testing.assert_close(lin1, 2 * lin2, rtol=1e-12, atol=0)
