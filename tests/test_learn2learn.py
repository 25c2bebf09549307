"""The learn2learn integration: kml's MAML inner loop against ``learn2learn.algorithms.MAML``
(adapted parameters, query loss and meta-gradients, first and second order), learn2learn task
sets driving kml training (as a kml mode through the trainer, and as an episode source), a kml
backbone adapted by learn2learn's MAML, and kml episodes in learn2learn's ``(data, labels)`` form.

The tests that need learn2learn are marked ``l2l`` and skipped with the install command when it
does not import, except under CI (``CI=true``) or with ``KML_REQUIRE_LEARN2LEARN=1``, where a
missing learn2learn fails them: ``.ci/run`` installs it with
``python -m kml.integrations.install_learn2learn``.
"""

from __future__ import annotations

import operator
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kml.algorithms import build_learner
from kml.config import LearnerConfig
from kml.data.modes import load_store, load_stores
from kml.data.sampler import EpisodeSampler
from kml.errors import KMLError
from kml.integrations import learn2learn as integration

REQUIRED = os.environ.get("KML_REQUIRE_LEARN2LEARN", "") not in ("", "0") or os.environ.get("CI", "").lower() in (
    "1",
    "true",
)
TINY = dict(ways=3, image_size=16, base_channels=4, encoder_channels=4, inner_steps=2, eval_inner_steps=2, inner_lr=0.3)
# float64 on both sides, which differ in summation order only: ~1e-16 per operation (measured: at most 1.6e-12 on
# gradients of size 40), so 1e-10 of the compared values' size (at least 1) holds on any kernels
TOLERANCE = 1e-10


@pytest.fixture(scope="module")
def l2l():
    """The learn2learn module; skipped (failed under CI) when it does not import."""
    try:
        return integration.require_learn2learn()
    except KMLError as error:
        if REQUIRED:
            pytest.fail(f"{error}; CI (or KML_REQUIRE_LEARN2LEARN=1) must run the learn2learn tests, not skip them")
        pytest.skip(f"{error} (learn2learn 0.2.0 from PyPI does not build on Python 3.11+; that script rebuilds it)")


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {split: load_stores(["glyphs"], split, root=root, side=16)[0] for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def episode(glyphs):
    """A fixed float64 meta-batch: 3 tasks, 3-way 2-shot, 3 queries per class."""
    return (
        EpisodeSampler(glyphs["train"], ways=3, shots=2, queries=3, meta_batch=3, seed=5)
        .sample()
        .to_float(torch.float64)
    )


def tiny_learner(seed: int = 0, **method) -> torch.nn.Module:
    torch.manual_seed(seed)
    learner = build_learner(LearnerConfig(**{**TINY, **method})).double()
    with torch.no_grad():  # away from the identity start so that the modulation matters
        for p in learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return learner.train()


def grads_of(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype == torch.float64, what
    difference, size = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert difference <= TOLERANCE * size, f"{what}: max difference {difference:.2e} at size {size:.2e}"


def kml_adapted_parameters(learner, episode) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """kml's own per-task adapted backbone parameters (from ``reference_forward``) and its output.

    A forward pre-hook on the backbone sees the parameters ``functional_call`` substituted; each
    task calls the backbone ``inner_steps`` times on the support set, then once on the query set
    with the adapted parameters.
    """
    backbone = learner.models[0].backbone
    names = [name for name, _ in backbone.named_parameters()]
    calls: list[dict[str, torch.Tensor]] = []
    handle = backbone.register_forward_pre_hook(
        lambda module, args: calls.append({n: operator.attrgetter(n)(module).detach().clone() for n in names})
    )
    try:
        output = learner.reference_forward(episode)
    finally:
        handle.remove()
    per_task = learner.config.inner_steps + 1
    assert len(calls) == per_task * episode.num_tasks
    return calls[per_task - 1 :: per_task], output


# ----------------------------------------------------------------- kml's inner loop == learn2learn's MAML
@pytest.mark.l2l
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("modulation", ["none", "kml"])
def test_inner_loop_matches_learn2learn_maml(l2l, episode, modulation, first_order):
    learner = tiny_learner(modulation=modulation, first_order=first_order)
    names, params = zip(*learner.named_parameters())
    params = list(params)

    # learn2learn: per task, MAML(backbone with the task's modulation).clone(), adapt() on the support set.
    l2l_adapted, l2l_losses = [], []
    for t in range(episode.num_tasks):
        support_x, support_y = episode.support_x[t], episode.support_y[t]
        module = integration.task_module(learner, support_x, support_y, detach=False)
        assert [id(p) for p in module.parameters()] == [id(p) for p in learner.models[0].backbone.parameters()]
        maml = l2l.algorithms.MAML(module, lr=learner.config.inner_lr, first_order=first_order)
        clone = maml.clone()
        for _ in range(learner.config.inner_steps):
            clone.adapt(F.cross_entropy(clone(support_x), support_y))
        l2l_adapted.append({n.removeprefix("backbone."): p for n, p in clone.module.named_parameters()})
        l2l_losses.append(F.cross_entropy(clone(episode.query_x[t]), episode.query_y[t]))
    l2l_loss = torch.stack(l2l_losses).mean()
    l2l_grads = grads_of(l2l_loss, params)

    # kml: adapted parameters from the reference loop; loss and meta-gradients from both paths.
    kml_adapted, reference = kml_adapted_parameters(learner, episode)
    batched = learner(episode)
    for t in range(episode.num_tasks):
        assert kml_adapted[t].keys() == l2l_adapted[t].keys()
        for name in kml_adapted[t]:
            assert_close(kml_adapted[t][name], l2l_adapted[t][name].detach(), f"task {t} adapted {name}")
        assert (kml_adapted[t]["head.weight"] - learner.models[0].backbone.head.weight).abs().max() > 1e-3  # it adapted
    assert_close(batched.task_loss.detach(), torch.stack(l2l_losses).detach(), "batched query loss per task")
    assert_close(reference.task_loss.detach(), torch.stack(l2l_losses).detach(), "reference query loss per task")
    for path, output in (("batched", batched), ("reference", reference)):
        for name, g_kml, g_l2l in zip(names, grads_of(output.loss, params), l2l_grads):
            assert_close(g_kml, g_l2l, f"{path} meta-gradient {name}")
    moved = {n for n, g in zip(names, l2l_grads) if g.abs().max() > 0}
    assert any(n.startswith("models.0.backbone.") for n in moved)
    if modulation == "kml":  # the meta-gradient reaches the task encoder and the generator through the modulation
        assert any(".encoder." in n for n in moved) and any(".generator." in n for n in moved)


@pytest.mark.l2l
def test_maml_forward_equals_learner_forward(l2l, episode):
    learner = tiny_learner(modulation="film")
    names, params = zip(*learner.named_parameters())
    kml, ours = learner(episode), integration.maml_forward(learner, episode)
    assert_close(kml.task_loss.detach(), ours.task_loss.detach(), "query loss")
    assert torch.equal(kml.task_accuracy, ours.task_accuracy)
    for name, a, b in zip(names, grads_of(kml.loss, list(params)), grads_of(ours.loss, list(params))):
        assert_close(a, b, f"meta-gradient {name}")
    learner.eval()
    with torch.no_grad():  # evaluation: eval_inner_steps, and the inner loop still differentiates
        assert_close(
            learner(episode, inner_steps=3).task_loss, integration.maml_forward(learner, episode, 3).task_loss, "eval"
        )
    with pytest.raises(KMLError, match="MetaSGD"):
        integration.maml_forward(tiny_learner(meta_sgd=True), episode)
    with pytest.raises(KMLError, match="MAML learner"):
        integration.maml_forward(tiny_learner(algorithm="protonet"), episode)


@pytest.mark.l2l
def test_maml_forward_equals_learner_forward_for_mmaml_network(l2l, episode):
    """The MMAML recipe's pieces (spatial-mean head, non-affine BatchNorm, 128-d-style encoder layer, default init)
    give the same loss and meta-gradients through learn2learn's MAML as through kml's forward."""
    learner = tiny_learner(
        modulation="film", head="avgpool", batchnorm_affine=False, encoder_hidden=8, init="pytorch", identity_init=False
    )
    names, params = zip(*learner.named_parameters())
    kml, ours = learner(episode), integration.maml_forward(learner, episode)
    assert_close(kml.task_loss.detach(), ours.task_loss.detach(), "query loss")
    for name, a, b in zip(names, grads_of(kml.loss, list(params)), grads_of(ours.loss, list(params))):
        assert_close(a, b, f"meta-gradient {name}")
    with pytest.raises(KMLError, match="clamp"):
        integration.maml_forward(tiny_learner(inner_grad_clamp=20.0), episode)


# ----------------------------------------------------------------- learn2learn's MAML adapts a kml backbone
@pytest.mark.l2l
def test_learn2learn_maml_adapts_kml_backbone(l2l, episode):
    learner = tiny_learner(modulation="kml")
    backbone = learner.models[0].backbone
    support_x, support_y = episode.support_x[0], episode.support_y[0]
    module = integration.task_module(learner, support_x, support_y)  # detached modulation: a fixed task module
    assert set(dict(module.named_parameters())) == {f"backbone.{n}" for n, _ in backbone.named_parameters()}
    assert set(module.modulation) == {f"{kind}{layer}" for kind in ("kernel", "bias") for layer in range(1, 5)}
    assert not any(v.requires_grad for v in module.modulation.values())
    assert module.state_dict().keys() == {f"backbone.{k}" for k in backbone.state_dict()}  # modulation not saved
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}

    maml = l2l.algorithms.MAML(module, lr=0.3)
    clone = maml.clone()
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(clone(support_x), support_y)
        losses.append(loss.item())
        clone.adapt(loss)
    losses.append(F.cross_entropy(clone(support_x), support_y).item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(p, before[n]) for n, p in backbone.named_parameters())  # the original is untouched
    assert all(not torch.equal(p, before[n.removeprefix("backbone.")]) for n, p in clone.module.named_parameters())
    # The query loss of the adapted clone differentiates back to the original backbone only.
    F.cross_entropy(clone(episode.query_x[0]), episode.query_y[0]).backward()
    # (conv biases feed a batch-statistics BatchNorm, which removes them: their gradient is ~0)
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in backbone.named_parameters() if "weight" in n)
    assert all(p.grad is None for p in learner.models[0].encoder.parameters())
    # The modulation moves with the module and changes what it computes.
    assert module.float().modulation["kernel1"].dtype == torch.float32
    plain = integration.ModulatedBackbone(backbone.float())
    assert plain.modulation is None
    assert not torch.allclose(plain(support_x.float()), module(support_x.float()))


# ----------------------------------------------------------------- learn2learn task sets drive kml training
@pytest.mark.l2l
def test_taskset_sampler_drives_training_loop(l2l, glyphs):
    import random

    random.seed(0)
    taskset = integration.taskset_from_store(glyphs["train"], ways=3, samples=1 + 4, classes=40)
    sampler = integration.TasksetSampler(taskset, shots=1, meta_batch=4, seed=0)
    episode = sampler.sample()
    assert episode.support_x.shape == (4, 3, 3, 16, 16) and episode.query_x.shape == (4, 12, 3, 16, 16)
    assert episode.support_x.dtype == torch.float32 and 0 <= episode.support_x.min() and episode.support_x.max() <= 1
    assert episode.support_y[0].tolist() == [0, 1, 2] and episode.query_y[0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert episode.mode_names == ("learn2learn",) and episode.classes.shape == (4, 3)

    fixed = [sampler.sample() for _ in range(3)]  # fixed meta-batches to measure on
    torch.manual_seed(0)
    learner = build_learner(
        LearnerConfig(**{**TINY, "modulation": "none", "base_channels": 8, "inner_steps": 1, "inner_lr": 0.1})
    )
    optimizer = torch.optim.Adam(learner.train().parameters(), lr=1e-2)

    def held_out_loss() -> float:
        return sum(learner(e).loss.item() for e in fixed) / len(fixed)

    start = held_out_loss()
    for _, episode in zip(range(40), sampler):  # a short explicit kml training loop on learn2learn's tasks
        output = learner(episode)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    assert held_out_loss() < 0.8 * start

    state = sampler.state_dict()
    again = sampler.sample()
    sampler.load_state_dict(state)
    assert torch.equal(sampler.sample().support_x, again.support_x)


@pytest.mark.l2l
def test_benchmark_tasksets_as_kml_mode_train_with_trainer(l2l, glyphs, tmp_path):
    from kml.config.run import RunConfig
    from kml.training.trainer import Trainer

    # A learn2learn benchmark (what get_tasksets returns), over small data: no download.
    tasksets = l2l.vision.benchmarks.BenchmarkTasksets(
        *(
            integration.taskset_from_store(glyphs[split], 3, 2, classes)
            for split, classes in (("train", 8), ("val", 4), ("test", 4))
        )
    )
    stores = integration.stores_from_tasksets(tasksets, mode="l2l-glyphs", max_per_class=6)
    assert {s: (st.num_classes, len(st.images)) for s, st in stores.items()} == {
        "train": (8, 48),
        "val": (4, 24),
        "test": (4, 24),
    }
    assert torch.equal(stores["train"].class_images(2), glyphs["train"].class_images(2)[:6])
    mode = integration.export_folder(stores, tmp_path / "l2l-glyphs")
    assert mode == f"folder:{tmp_path / 'l2l-glyphs'}"
    with pytest.raises(KMLError, match="not empty"):
        integration.export_folder(stores, tmp_path / "l2l-glyphs")
    assert load_store(mode, "val", tmp_path / "data").num_classes == 4

    config = RunConfig(
        modes=[mode],
        ways=3,
        shots=1,
        queries=2,
        meta_batch=2,
        steps=4,
        val_every=4,
        val_episodes=2,
        checkpoint_every=4,
        log_every=2,
        device="cpu",
        data_root=str(tmp_path / "data"),
        train_dir=str(tmp_path / "train_dir"),
        run_name="l2l",
        image_size=16,
        learner=LearnerConfig(base_channels=4, encoder_channels=4, inner_steps=1, eval_inner_steps=1, inner_lr=0.1),
    )
    trainer = Trainer.create(config, progress=False)
    start = {n: p.detach().clone() for n, p in trainer.learner.named_parameters()}
    checkpoint = trainer.fit()
    assert checkpoint.is_file() and trainer.step == 4
    assert (tmp_path / "train_dir" / "l2l" / "validation.csv").is_file()
    assert any(not torch.equal(p, start[n]) for n, p in trainer.learner.named_parameters())


# ----------------------------------------------------------------- data conversions
@pytest.mark.l2l
def test_store_dataset_round_trip(l2l, glyphs):
    store = glyphs["val"]
    dataset = integration.dataset_from_store(store)
    assert isinstance(dataset, l2l.data.MetaDataset) and len(dataset.labels) == store.num_classes
    image, label = dataset[25]
    assert image.shape == (3, 16, 16) and label == 1 and image.dtype == torch.float32
    back = integration.store_from_dataset(dataset, mode="back", split="val")
    assert torch.equal(back.images, store.images) and torch.equal(back.class_offsets, store.class_offsets)
    assert back.class_names == [str(c) for c in range(store.num_classes)] and back.mode == "back"


def test_store_from_plain_datasets():
    """No learn2learn needed: any dataset of (image, label) pairs; PIL images, arrays, grey, sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = [
        (Image.fromarray(rng.integers(0, 256, (10 + i % 3, 12), dtype=np.uint8)), "b" if i % 2 else "a")
        for i in range(8)
    ]
    with pytest.raises(KMLError, match="several sizes"):
        integration.store_from_dataset(grey)
    store = integration.store_from_dataset(grey, split="test", side=8)
    assert store.image_shape == (1, 8, 8) and store.class_names == ["a", "b"] and store.class_sizes.tolist() == [4, 4]
    colour = [(rng.random((3, 8, 8), dtype=np.float32), i % 2) for i in range(4)]  # float [0, 1], channels first
    colour.append((torch.from_numpy(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), 1))  # HWC tensor
    mixed = integration.store_from_dataset([*colour, (np.zeros((8, 8), dtype=np.uint8), 0)])
    assert mixed.image_shape == (3, 8, 8) and mixed.class_sizes.tolist() == [3, 3]
    assert torch.equal(mixed.class_images(0)[0], torch.from_numpy(np.round(colour[0][0] * 255).astype(np.uint8)))
    assert integration.store_from_dataset(colour, channels=1, max_per_class=1).image_shape == (1, 8, 8)
    with pytest.raises(KMLError, match="normalised"):
        integration.store_from_dataset([(torch.randn(3, 8, 8), 0)])
    with pytest.raises(KMLError, match="unknown split"):
        integration.store_from_dataset(colour, split="validation")


@pytest.mark.l2l
def test_episode_export_in_learn2learn_form(l2l, glyphs, episode):
    for t, ((sx, sy), (qx, qy)) in enumerate(integration.episode_to_tasks(episode)):
        assert torch.equal(sx, episode.support_x[t]) and torch.equal(qy, episode.query_y[t])

    batches = integration.episode_to_batches(episode)
    for t, (data, labels, support) in enumerate(batches):
        assert data.shape == (15, 3, 16, 16) and labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
        (sx, sy), (qx, qy) = l2l.data.partition_task(data, labels, shots=2)  # learn2learn's own split
        assert torch.equal(sx, episode.support_x[t]) and torch.equal(sy, episode.support_y[t])
        assert torch.equal(qx, episode.query_x[t]) and torch.equal(qy, episode.query_y[t])
        assert torch.equal(data[support], sx) and torch.equal(data[~support], qx)
    back = integration.episode_from_tasks([(d, y) for d, y, _ in batches], shots=2, dtype=torch.float64)
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(back, name), getattr(episode, name)), name
    shuffled = integration.episode_from_tasks(
        [(d, y) for d, y, _ in batches], 2, generator=torch.Generator().manual_seed(1)
    )
    assert sorted(shuffled.classes[0].tolist()) == [0, 1, 2]

    # The interleaved layout: learn2learn's example scripts take the even positions as the support set.
    even = EpisodeSampler(glyphs["train"], ways=3, shots=2, queries=2, meta_batch=2, seed=1).sample()
    data, labels, support = integration.episode_to_batches(even, layout="interleaved")[1]
    adaptation = np.zeros(data.size(0), dtype=bool)
    adaptation[np.arange(2 * 3) * 2] = True  # as learn2learn's examples/vision/maml_miniimagenet.py does
    assert torch.equal(torch.from_numpy(adaptation), support)
    assert torch.equal(data[support], even.support_x[1]) and torch.equal(labels[support], even.support_y[1])
    assert torch.equal(data[~support], even.query_x[1]) and torch.equal(labels[~support], even.query_y[1])
    with pytest.raises(KMLError, match="as many queries as shots"):
        integration.episode_to_batches(episode, layout="interleaved")
    with pytest.raises(KMLError, match="KShots"):
        integration.episode_from_tasks([(batches[0][0][:-1], batches[0][1][:-1])], shots=2)


# ----------------------------------------------------------------- without learn2learn
def test_missing_learn2learn_names_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # makes `import learn2learn` raise ImportError
    with pytest.raises(KMLError, match=r"install it with: python -m kml\.integrations\.install_learn2learn"):
        integration.require_learn2learn()


def test_installer_help_and_toolchain_check():
    result = subprocess.run(
        [sys.executable, "-m", "kml.integrations.install_learn2learn", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "current Cython" in result.stdout and "--force" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "kml.integrations.install_learn2learn", "--force"],
        capture_output=True,
        text=True,
        env={**os.environ, "CC": "no-such-compiler"},
    )
    assert (
        result.returncode == 2 and result.stderr.startswith("error: no C compiler") and result.stderr.count("\n") == 1
    )


@pytest.mark.l2l
def test_benchmark_smoke_run_prints_its_figures(l2l, tmp_path):
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "learn2learn_maml.py")
    done = subprocess.run(
        [sys.executable, script, "--smoke", "--methods", "kml-maml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tasks/s" in done.stdout and "ratio" in done.stdout and "kml batched / learn2learn" in done.stdout, (
        done.stdout
    )
