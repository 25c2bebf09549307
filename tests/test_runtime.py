"""Process settings (kml.runtime): bf16 autocast on CPU and GPU, the CPU allocator, and the float32 distance."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from kml.algorithms import build_learner
from kml.algorithms.losses import cross_entropy, distance_logits, squared_distances
from kml.config import LearnerConfig
from kml.data.modes import load_stores
from kml.data.sampler import MixtureSampler
from kml.errors import KMLError
from kml.runtime import autocast, bf16_native, check_bf16

needs_cpu_bf16 = pytest.mark.skipif(not bf16_native("cpu"), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")


@pytest.fixture(scope="module")
def episode(synthetic_stores):
    stores = synthetic_stores["train"]
    return MixtureSampler(stores, ways=3, shots=2, queries=3, meta_batch=4, seed=3).sample().to_float()


def test_squared_distances_equal_the_direct_formula():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(4, 7, 30, dtype=torch.float64, generator=generator)
    prototypes = torch.randn(4, 3, 30, dtype=torch.float64, generator=generator)
    direct = (queries.unsqueeze(-2) - prototypes.unsqueeze(-3)).pow(2).sum(-1)
    torch.testing.assert_close(squared_distances(queries, prototypes), direct, rtol=1e-12, atol=1e-12)
    # A query equal to a prototype is at distance 0, never negative through cancellation.
    scaled = prototypes * 1e3
    same = squared_distances(scaled[:, :1], scaled)
    assert (same >= 0).all() and (same[..., 0] <= 1e-12 * scaled[:, :1].pow(2).sum(-1)).all()


def test_squared_distances_in_float32_on_post_relu_features():
    """Realistic features (non-negative, D = 1152): the matrix-product form keeps float32 accuracy."""
    generator = torch.Generator().manual_seed(1)
    queries = torch.relu(torch.randn(3, 75, 1152, generator=generator))
    prototypes = torch.relu(torch.randn(3, 5, 1152, generator=generator))
    direct = (queries.double().unsqueeze(-2) - prototypes.double().unsqueeze(-3)).pow(2).sum(-1)  # exact to 1e-16
    error = (squared_distances(queries, prototypes).double() - direct).abs()
    # float32 is what this form is for. Its rounding bound, in any summation order (Higham's gamma_n = n*u/(1 - n*u),
    # u the float32 unit roundoff): the D-term products and squared norms err by at most gamma_D times the sum of
    # their |terms|, the two subtractions by u each, so at most gamma_(D+2) * sum_k (|q_k| + |p_k|)^2; measured
    # 1/500 of that, while the same inputs rounded to bf16 err by 5 times it.
    n, u = queries.shape[-1] + 2, torch.finfo(torch.float32).eps / 2
    magnitude = (queries.double().abs().unsqueeze(-2) + prototypes.double().abs().unsqueeze(-3)).pow(2).sum(-1)
    assert (error <= n * u / (1 - n * u) * magnitude).all(), float(error.max())


def test_packed_channels_last_equals_default_layout():
    """Same values; features without a head come flattened (H, W, C) instead of (C, H, W)."""
    from kml.models.backbone import Backbone, packed_forward

    torch.manual_seed(0)
    backbone = Backbone(3, 4, 32, ways=None).double()  # last map 2x2, so the two orders differ
    params = {
        name: p.detach().expand(3, *p.shape).clone() + 0.01 * torch.randn(3, *p.shape, dtype=torch.float64)
        for name, p in backbone.named_parameters()
    }
    images = torch.randn(3, 6, 3, 32, 32, dtype=torch.float64)
    default = packed_forward(params, images, None, "published")
    spatial_major = default.view(3, 6, 32, 2, 2).permute(0, 1, 3, 4, 2).reshape(3, 6, -1)
    assert not torch.equal(spatial_major, default)
    torch.testing.assert_close(
        packed_forward(params, images, None, "published", channels_last=True), spatial_major, rtol=1e-12, atol=1e-12
    )


def test_packed_channels_last_with_a_head_gives_the_same_logits_and_contiguous_weight_gradients():
    """The head's columns follow the (H, W, C) flatten; weight gradients come back contiguous, as in the
    default layout (channels-last ones would meet MAML's default-layout inner loop in its double backward)."""
    from kml.models.backbone import Backbone, packed_forward

    torch.manual_seed(0)
    backbone = Backbone(3, 4, 32, ways=5).double()
    params = {
        name: (
            p.detach().expand(3, *p.shape).clone() + 0.01 * torch.randn(3, *p.shape, dtype=torch.float64)
        ).requires_grad_()
        for name, p in backbone.named_parameters()
    }
    images = torch.randn(3, 6, 3, 32, 32, dtype=torch.float64)
    default = packed_forward(params, images, None, "published")
    packed = packed_forward(params, images, None, "published", channels_last=True)
    torch.testing.assert_close(packed, default, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(packed.square().sum(), list(params.values()))
    expected = torch.autograd.grad(default.square().sum(), list(params.values()))
    for name, ours, theirs in zip(params, grads, expected):
        assert ours.is_contiguous(), name
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("label_ways", [None, 3])
def test_packed_task_embedding_equals_the_encoder_per_task(label_ways, channels_last):
    from kml.models.encoder import TaskEncoder, packed_task_embedding

    torch.manual_seed(0)
    encoder = TaskEncoder(3, 4, label_ways).double()
    params = {
        name: p.detach().expand(4, *p.shape).clone() + 0.05 * torch.randn(4, *p.shape, dtype=torch.float64)
        for name, p in encoder.named_parameters()
    }
    images, labels = torch.randn(4, 6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 3, (4, 6))
    expected = torch.stack(
        [
            torch.func.functional_call(encoder, {n: p[t] for n, p in params.items()}, (images[t], labels[t]))
            for t in range(4)
        ]
    )
    packed = packed_task_embedding(params, images, labels, label_ways, channels_last)
    torch.testing.assert_close(packed, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "method",
    [
        dict(algorithm="protonet", modulation="kml", proto_refine=True),
        dict(algorithm="maml", modulation="kml", encoder_uses_labels=True),
    ],
)
def test_packed_path_equals_reference_where_the_last_map_is_larger_than_1x1(method, tmp_path):
    """At 32 px the maps end 2x2, so the channels-last feature order and the encoder's pooling matter."""
    stores = load_stores(["synthetic"], "train", root=tmp_path, side=32)
    episode = MixtureSampler(stores, ways=3, shots=2, queries=3, meta_batch=3, seed=1).sample().to_float(torch.float64)
    torch.manual_seed(0)
    learner = (
        build_learner(
            LearnerConfig(ways=3, image_size=32, base_channels=4, encoder_channels=4, inner_steps=1, **method)
        )
        .double()
        .train()
    )
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    packed, reference = learner(episode), learner.reference_forward(episode)
    torch.testing.assert_close(packed.task_loss, reference.task_loss, rtol=1e-10, atol=1e-12)
    params = list(learner.parameters())
    for ours, theirs in zip(torch.autograd.grad(packed.loss, params), torch.autograd.grad(reference.loss, params)):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)


def test_distance_logits_are_negative_distances_up_to_a_per_query_constant():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 7, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    prototypes = torch.randn(2, 3, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, 3, (2, 7), generator=generator)
    direct = -(queries.unsqueeze(-2) - prototypes.unsqueeze(-3)).pow(2).sum(-1)
    logits = distance_logits(queries, prototypes)
    offset = logits - direct
    torch.testing.assert_close(
        offset, offset[..., :1].expand_as(offset), rtol=1e-12, atol=1e-12
    )  # same for every class
    assert offset.abs().max() > 1  # not equal to the distances themselves
    ours, theirs = cross_entropy(logits, labels).sum(), cross_entropy(direct, labels).sum()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad(ours, [queries, prototypes]), torch.autograd.grad(theirs, [queries, prototypes])
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_cpu_bf16
def test_squared_distances_stay_float32_under_bf16_autocast():
    queries, prototypes = torch.randn(2, 5, 64), torch.randn(2, 3, 64)
    with autocast("cpu", True):
        distances = squared_distances(queries.bfloat16(), prototypes.bfloat16())
    assert distances.dtype == torch.float32
    expected = squared_distances(queries.bfloat16().float(), prototypes.bfloat16().float())
    # the same float32 operations on the same values (autocast is off inside): equal, not close
    torch.testing.assert_close(distances, expected, rtol=0, atol=0)


@needs_cpu_bf16
@pytest.mark.parametrize("algorithm, inner_steps", [("protonet", 0), ("maml", 0), ("maml", 2)])
def test_cpu_bf16_forward_and_meta_gradient_follow_float32(algorithm, inner_steps, episode):
    """bf16 autocast moves the loss by under 3% and keeps the meta-gradient's direction.

    With MAML inner steps this holds because the inner loop runs in float32 (``float32_inner_loop``):
    in bf16 the adapted weights drifted and this meta-gradient's cosine with float32 was 0.47.
    """
    torch.manual_seed(0)
    config = LearnerConfig(
        algorithm=algorithm,
        modulation="kml",
        ways=3,
        image_size=16,
        base_channels=8,
        encoder_channels=8,
        num_modes=3,
        inner_steps=inner_steps,
        inner_lr=0.1,
    )
    learner = build_learner(config).train()
    params = list(learner.parameters())

    def loss_and_gradient(bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast("cpu", bf16):
            output = learner(episode)
        assert output.loss.dtype == torch.float32 and output.task_accuracy.dtype == torch.float32
        grads = torch.autograd.grad(output.loss, params, allow_unused=True)
        assert all(g is None or g.dtype == torch.float32 for g in grads)  # parameters stay float32
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])
        return output.loss.detach(), flat

    full_loss, full_grad = loss_and_gradient(False)
    half_loss, half_grad = loss_and_gradient(True)
    # bf16 is a speed path with no float64 form: its 8-bit significand rounds every conv input and weight by up to
    # 2^-9 (the same rounding on every CPU; the float32 accumulation around it differs by ~1e-7). Measured: the loss
    # moves 2.2% (ProtoNet, whose distance logits are large) or 0.3% (MAML), the cosine is at least 0.989.
    assert abs(half_loss - full_loss) <= 0.03 * abs(full_loss)
    assert torch.isfinite(half_grad).all()
    assert torch.nn.functional.cosine_similarity(half_grad, full_grad, dim=0) > 0.97


@needs_cpu_bf16
@pytest.mark.parametrize("batching", ["packed", "vmap", "reference"])
def test_maml_inner_loop_runs_in_float32_under_bf16_autocast(batching, episode, monkeypatch):
    """Every path adapts in float32 under autocast: the support-set convolutions see float32 inputs."""
    import torch.nn.functional as F

    seen = []
    conv2d = F.conv2d

    def recording_conv2d(x, weight, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return conv2d(x, weight, *args, **kwargs)

    torch.manual_seed(0)
    config = LearnerConfig(
        algorithm="maml",
        modulation="none",
        ways=3,
        image_size=16,
        base_channels=4,
        num_modes=3,
        inner_steps=1,
        inner_lr=0.1,
    )
    learner = build_learner(config).train()
    monkeypatch.setattr(F, "conv2d", recording_conv2d)
    with autocast("cpu", True):
        if batching == "reference":
            learner.reference_forward(episode)
        else:
            with learner.using_backend(batching):
                learner(episode)
    assert False in seen and True in seen  # the inner loop without autocast, the query pass with it


def test_bf16_refused_where_it_would_be_emulated(monkeypatch):
    monkeypatch.setattr("kml.runtime.precision.bf16_native", lambda device: False)
    with pytest.raises(KMLError, match="drop --bf16"):
        check_bf16("cpu")


def test_autocast_off_is_a_no_op():
    with autocast("cpu", False):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", True):
        assert torch.is_autocast_enabled("cpu")


STEP_FAULTS = """
import resource, torch
from kml.algorithms import build_learner
from kml.config import LearnerConfig
from kml.data.episode import Episode
from kml.runtime import tune_cpu_allocator
tuned = tune_cpu_allocator()
torch.manual_seed(0)
learner = build_learner(LearnerConfig(algorithm="protonet", modulation="kml", ways=5, image_size=84, base_channels=16,
                                      encoder_channels=16)).train()
labels = lambda n: torch.arange(5).repeat_interleave(n).expand(4, -1)
episode = Episode(torch.rand(4, 5, 3, 84, 84), labels(1), torch.rand(4, 75, 3, 84, 84), labels(15),
                  torch.zeros(4, dtype=torch.long), torch.arange(5).expand(4, -1), ("mode0",))
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    learner(episode).loss.backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, sum(faults[3:]) / 5)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc mallopt")
def test_allocator_tuning_cuts_page_faults_of_training_steps():
    """Steady-state training steps page-fault far less once tuned (measured ~10x fewer), and not with KML_MALLOC=system."""

    def run(setting: str) -> tuple[str, float]:
        env = {"KML_MALLOC": setting, "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, "-c", STEP_FAULTS], env=env, capture_output=True, text=True, check=True)
        tuned, faults = out.stdout.split()
        return tuned, float(faults)

    (tuned_flag, tuned_faults), (system_flag, system_faults) = run(""), run("system")
    assert (tuned_flag, system_flag) == ("True", "False")
    assert system_faults > 10_000  # each step maps its large activations afresh (about 70k pages here)
    assert tuned_faults < 0.25 * system_faults
