"""FLOP counting (kml.runtime.flops): grouped-convolution weight gradients counted right, against hand counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kml.algorithms import build_learner
from kml.config import LearnerConfig
from kml.data.episode import Episode
from kml.runtime.flops import conv_flops, count_flops


def _grouped_step(tasks: int, batch: int = 6, c_in: int = 4, c_out: int = 8, side: int = 9):
    """A packed layer of ``tasks`` tasks: ``[B, T*C_in, s, s]`` through ``groups=T`` kernels, forward and backward."""
    x = torch.randn(batch, tasks * c_in, side, side, requires_grad=True)
    w = torch.randn(tasks * c_out, c_in, 3, 3, requires_grad=True)

    def step() -> None:
        F.conv2d(x, w, None, stride=2, padding=1, groups=tasks).sum().backward()

    out_side = (side + 2 - 3) // 2 + 1
    # each pass: every output element is a dot product of C_in * 9 pairs (2 FLOPs each), per task
    one_pass = 2 * batch * tasks * c_out * out_side**2 * c_in * 9
    return step, one_pass


@pytest.mark.parametrize("tasks", [1, 4, 10])
def test_grouped_convolution_counted_as_by_hand(tasks):
    step, one_pass = _grouped_step(tasks)
    work = count_flops(step)
    assert work.total == 3 * one_pass  # forward, input gradient, weight gradient
    assert work.by_operator == {"aten.convolution": one_pass, "aten.convolution_backward": 2 * one_pass}
    (shape,) = work.convolutions
    assert conv_flops(shape) == work.convolution_flops == 3 * one_pass
    assert conv_flops(shape.shared()) == conv_flops(shape)  # the groups as images: the same work
    assert shape.shared().groups == 1 and shape.shared().input_shape[0] == 6 * tasks


def test_torch_counter_overcounts_the_grouped_weight_gradient():
    """What the correction is for: torch counts the weight gradient ``groups`` times over (as of torch 2.14)."""
    tasks = 10
    step, one_pass = _grouped_step(tasks)
    with FlopCounterMode(display=False) as counter:
        step()
    # torch's count is either right (a future torch) or over by (groups - 1) weight gradients, never ours
    assert counter.get_total_flops() in (3 * one_pass, 3 * one_pass + (tasks - 1) * one_pass)
    assert count_flops(step).total == 3 * one_pass


def _episode(tasks: int = 3, ways: int = 3, side: int = 16) -> Episode:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).expand(tasks, -1).contiguous()
    return Episode(
        support_x=torch.rand(tasks, ways, 3, side, side, generator=g),
        support_y=labels,
        query_x=torch.rand(tasks, ways * 2, 3, side, side, generator=g),
        query_y=labels.repeat_interleave(2, dim=1),
        mode=torch.zeros(tasks, dtype=torch.long),
        classes=labels,
        mode_names=("m",),
    )


def _outer_step(forward, episode):
    def step() -> None:
        forward(episode).loss.backward()

    return step


def test_protonet_step_convolutions_counted_as_by_hand():
    """A ProtoNet step's convolutions: forward and weight gradient of every layer, input gradient from layer 2."""
    torch.manual_seed(0)
    config = LearnerConfig(algorithm="protonet", modulation="none", ways=3, image_size=16, base_channels=4)
    learner = build_learner(config).train()
    episode = _episode()
    work = count_flops(_outer_step(learner, episode))
    images = episode.num_tasks * (episode.support_x.shape[1] + episode.query_x.shape[1])
    expected, side, c_in = 0, 16, 3
    for layer, c_out in enumerate([4, 8, 16, 32], start=1):
        side = (side + 1) // 2
        one_pass = 2 * images * c_out * c_in * 9 * side**2
        expected += one_pass * (3 if layer > 1 else 2)  # the images need no gradient
        c_in = c_out
    conv_counted = work.by_operator["aten.convolution"] + work.by_operator["aten.convolution_backward"]
    assert conv_counted == expected


@pytest.mark.parametrize(
    "algorithm, modulation", [("protonet", "none"), ("protonet", "kml"), ("maml", "none"), ("maml", "kml")]
)
def test_batched_step_does_the_work_of_the_per_task_loop(algorithm, modulation):
    """The packed path (grouped convolutions, one autograd graph) counts the same FLOPs as the per-task loop,
    second-order MAML included: batching adds no arithmetic, and the correction makes the two comparable."""
    torch.manual_seed(0)
    config = LearnerConfig(
        algorithm=algorithm, modulation=modulation, ways=3, image_size=16, base_channels=4, encoder_channels=4
    )
    learner = build_learner(config).train()
    episode = _episode()
    batched = count_flops(_outer_step(learner, episode))
    loop = count_flops(_outer_step(learner.reference_forward, episode))
    assert batched.total == loop.total

    def convolution(work):
        return sum(flops for name, flops in work.by_operator.items() if "convolution" in name)

    assert convolution(batched) == convolution(loop) > 0
