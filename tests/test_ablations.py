"""The KML-vs-FiLM ablation switch: KML's bias shift after the BatchNorm (kml_bias="after_norm").

It must keep every batched path equal to the reference loop, and it must make the bias branch live: as the
method is defined, a bias shift before a batch-statistics BatchNorm is normalised away.
"""

from __future__ import annotations

import pytest
import torch

from kml.algorithms import build_learner
from kml.config import LearnerConfig
from kml.data.sampler import MixtureSampler

TINY = dict(ways=3, image_size=16, base_channels=4, encoder_channels=4, inner_steps=2, eval_inner_steps=2, inner_lr=0.3)


@pytest.fixture(scope="module")
def episode(synthetic_stores, device):
    stores = synthetic_stores["train"]
    return (
        MixtureSampler(stores, ways=3, shots=2, queries=3, meta_batch=3, seed=2)
        .sample()
        .to_float(torch.float64)
        .to(device)
    )


def learner_for(device, **method) -> torch.nn.Module:
    torch.manual_seed(0)
    learner = build_learner(LearnerConfig(**{**TINY, **method})).double().to(device)
    with torch.no_grad():  # away from the identity start so that the modulation matters
        for p in learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return learner.train()


def gradients(learner, loss) -> dict[str, torch.Tensor]:
    names, params = zip(*learner.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
@pytest.mark.parametrize("batching", ["packed", "vmap"])
def test_bias_after_norm_keeps_batched_paths_equal_to_the_reference(algorithm, batching, episode):
    learner = learner_for(episode.device, algorithm=algorithm, modulation="kml", kml_bias="after_norm")
    reference = learner.reference_forward(episode)
    expected = gradients(learner, reference.loss)
    with learner.using_backend(batching):
        output = learner(episode)
    torch.testing.assert_close(output.task_loss, reference.task_loss, rtol=1e-10, atol=1e-10)
    ours = gradients(learner, output.loss)
    scale = max(g.abs().max().item() for g in expected.values())
    for name in expected:
        # float64: the paths differ in summation order only (measured 1e-13 of the largest gradient)
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-10, atol=1e-10 * scale, msg=name)


@pytest.mark.parametrize(("kml_bias", "live"), [("conv", False), ("after_norm", True)])
def test_the_bias_branch_reaches_the_output_only_after_the_norm(kml_bias, live, episode):
    learner = learner_for(episode.device, algorithm="protonet", modulation="kml", kml_bias=kml_bias)
    model = learner.models[0]
    x, y = episode.support_x[0], episode.support_y[0]
    before = model(episode.query_x[0], model.modulation(x, y))
    with torch.no_grad():
        for layer in model.generator.layers:  # move only the generated bias shifts
            for name, parameter in layer.named_parameters():
                if "beta" in name:
                    parameter.add_(1.0)
    after = model(episode.query_x[0], model.modulation(x, y))
    changed = (after - before).abs().max().item()
    assert (changed > 1e-3) if live else (changed < 1e-8), changed
