"""Meta-batches larger than memory: chunked meta-gradients and inner-loop activation checkpointing give the same update."""

from __future__ import annotations

import pytest
import torch

from kml.algorithms import build_learner
from kml.algorithms.chunking import accumulate_meta_gradient, chunk_slices
from kml.cli import train as train_cli
from kml.config import LearnerConfig
from kml.data.episode import Episode
from kml.data.sampler import MixtureSampler
from kml.training.trainer import Trainer

TINY = dict(ways=3, image_size=16, base_channels=4, encoder_channels=4, inner_steps=2, eval_inner_steps=2, inner_lr=0.3)
METHODS = {
    "maml": dict(algorithm="maml", modulation="none"),
    "kml-maml": dict(algorithm="maml", modulation="kml"),
    "film-maml-meta-sgd": dict(algorithm="maml", modulation="film", meta_sgd=True),
    "multi-maml": dict(algorithm="maml", modulation="none", multi_maml=True, num_modes=3),
    "kml-protonet": dict(algorithm="protonet", modulation="kml"),
}


@pytest.fixture(scope="module")
def episode(synthetic_stores, device):
    """A float64 meta-batch of 5 tasks from the 3 synthetic modes, on the test device."""
    stores = synthetic_stores["train"]
    return (
        MixtureSampler(stores, ways=3, shots=2, queries=3, meta_batch=5, seed=1)
        .sample()
        .to_float(torch.float64)
        .to(device)
    )


def learner_for(method: str, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    learner = build_learner(LearnerConfig(**{**TINY, **METHODS[method]})).double().to(device)
    with torch.no_grad():  # away from the identity start so that the modulation matters
        for p in learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return learner.train()


def gradients(learner) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in learner.named_parameters()}


def assert_same_gradients(ours: dict, reference: dict) -> None:
    scale = max(g.abs().max().item() for g in reference.values())
    assert scale > 0
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-10, atol=1e-10 * scale, msg=name)


def test_chunk_slices_cover_every_task_once():
    assert chunk_slices(5, None) == [slice(0, 5)]
    assert chunk_slices(5, 8) == [slice(0, 5)]
    assert chunk_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    with pytest.raises(ValueError):
        chunk_slices(5, 0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_meta_gradient_equals_the_whole_batch(method, chunk, episode):
    learner = learner_for(method, episode.device)
    whole = learner(episode)
    whole.loss.backward()
    reference = gradients(learner)
    learner.zero_grad()
    chunked = accumulate_meta_gradient(learner, episode, task_chunk=chunk)
    torch.testing.assert_close(chunked.loss, whole.loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked.task_accuracy, whole.task_accuracy)
    assert_same_gradients(gradients(learner), reference)


def test_chunked_first_order_maml_equals_the_whole_batch(episode):
    learner = learner_for("kml-maml", episode.device)
    learner.config.first_order = True
    learner(episode).loss.backward()
    reference = gradients(learner)
    learner.zero_grad()
    accumulate_meta_gradient(learner, episode, task_chunk=2)
    assert_same_gradients(gradients(learner), reference)


@pytest.mark.parametrize("method", ["maml", "kml-maml", "film-maml-meta-sgd", "multi-maml"])
def test_activation_checkpointing_gives_the_same_meta_gradient(method, episode):
    learner = learner_for(method, episode.device)
    learner(episode).loss.backward()
    reference = gradients(learner)
    learner.zero_grad()
    learner.activation_checkpointing = True
    output = learner(episode)
    output.loss.backward()
    assert_same_gradients(gradients(learner), reference)


def saved_bytes(learner, episode) -> int:
    """Bytes of the tensors autograd keeps for the outer backward of one forward pass."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        learner(episode)
    return total


def test_activation_checkpointing_keeps_less_of_the_inner_loop(episode):
    learner = learner_for("kml-maml", episode.device)
    learner.config.inner_steps = 4
    stored = saved_bytes(learner, episode)
    learner.activation_checkpointing = True
    # without it every inner step's forward and double-backward graph is kept; with it, each step's parameters
    assert saved_bytes(learner, episode) < stored / 3


def test_trainer_step_with_task_chunks_and_checkpointing_gives_the_plain_meta_gradient(tmp_path, device, monkeypatch):
    flags = [
        "--modes",
        "synthetic",
        "--image-size",
        "16",
        "--base-channels",
        "4",
        "--encoder-channels",
        "4",
        "--meta-batch",
        "5",
        "--queries",
        "3",
        "--inner-steps",
        "2",
        "--device",
        device,
        "--train-dir",
        str(tmp_path / "runs"),
        "--data-root",
        str(tmp_path / "data"),
    ]
    # float64, as the other equality tests: the two steps sum the same terms in another order, which moved float32
    # meta-gradients by 1.4e-5 of the largest on one CPU. The trainer makes each task chunk float with
    # Episode.to_float just before the learner sees it: here it makes them float64, and the learner is float64.
    to_float = Episode.to_float
    monkeypatch.setattr(Episode, "to_float", lambda episode, dtype=torch.float64: to_float(episode, dtype))
    grads = {}
    for name, extra in {"plain": [], "chunked": ["--task-chunk", "2", "--activation-checkpointing"]}.items():
        values = {
            k: v for k, v in vars(train_cli.build_parser().parse_args([*flags, "--run-name", name, *extra])).items()
        }
        trainer = Trainer.create(train_cli.config_from_values(values), progress=False)
        trainer.learner.double()  # in place: the optimiser and the trainer keep the same parameters
        trainer.train_step(trainer.sampler.sample())
        grads[name] = gradients(trainer.learner)
        assert all(g.dtype == torch.float64 for g in grads[name].values())
    assert trainer.config.task_chunk == 2 and trainer.learner.activation_checkpointing
    assert_same_gradients(grads["chunked"], grads["plain"])
