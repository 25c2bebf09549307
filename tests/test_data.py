"""Foundation: image store, episode sampler, mixture policies, synthetic modes, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from kml.data.episode import Episode
from kml.data.modes import canonical_mode, expand_modes, load_store, load_stores
from kml.data.sampler import EpisodeSampler, MixtureSampler
from kml.data.store import FORMAT_VERSION, ImageStore
from kml.data.synthetic import SYNTHETIC_MODES, generate_store
from kml.errors import KMLError

SPLIT_CODE = {"train": 1, "val": 2, "test": 3}


def coded_store(
    mode: str = "coded", split: str = "train", classes: int = 12, per_class: int = 20, side: int = 6
) -> ImageStore:
    """A store whose every image says who it is: pixel (0,0)=class, (0,1)=index in class, (0,2)=split.

    The rest of the image is random so that rotations are visible.
    """
    g = torch.Generator().manual_seed(classes * 1000 + per_class)
    arrays = []
    for c in range(classes):
        images = torch.randint(0, 256, (per_class, 1, side, side), generator=g, dtype=torch.uint8)
        images[:, 0, 0, 0] = c
        images[:, 0, 0, 1] = torch.arange(per_class, dtype=torch.uint8)
        images[:, 0, 0, 2] = SPLIT_CODE[split]
        arrays.append(images)
    return ImageStore.from_class_arrays(arrays, [f"{mode}-{c}" for c in range(classes)], mode, split)


def identities(x: torch.Tensor) -> torch.Tensor:
    """``[..., C, H, W]`` float images of a coded store -> int ``[..., 3]`` (class, index, split)."""
    return (x[..., 0, 0, :3] * 255).round().long()


def test_episode_shapes_and_dtypes():
    sampler = EpisodeSampler(coded_store(), ways=5, shots=2, queries=3, meta_batch=4)
    episode = sampler.sample()
    assert episode.support_x.shape == (4, 10, 1, 6, 6) and episode.support_x.dtype == torch.float32
    assert episode.query_x.shape == (4, 15, 1, 6, 6)
    assert episode.support_y.shape == (4, 10) and episode.support_y.dtype == torch.int64
    assert episode.query_y.shape == (4, 15) and episode.query_y.dtype == torch.int64
    assert episode.mode.shape == (4,) and episode.classes.shape == (4, 5)
    assert (episode.ways, episode.shots, episode.queries, episode.num_tasks) == (5, 2, 3, 4)
    assert 0.0 <= float(episode.support_x.min()) and float(episode.support_x.max()) <= 1.0


def test_labels_match_classes_and_support_query_are_disjoint():
    sampler = EpisodeSampler(coded_store(), ways=5, shots=3, queries=7, meta_batch=20, seed=3)
    episode = sampler.sample()
    for t in range(episode.num_tasks):
        assert sorted(Counter(episode.support_y[t].tolist()).items()) == [(n, 3) for n in range(5)]
        assert sorted(Counter(episode.query_y[t].tolist()).items()) == [(n, 7) for n in range(5)]
        support_ids = identities(episode.support_x[t])
        query_ids = identities(episode.query_x[t])
        # the class an image comes from is the class its label stands for
        assert torch.equal(support_ids[:, 0], episode.classes[t][episode.support_y[t]])
        assert torch.equal(query_ids[:, 0], episode.classes[t][episode.query_y[t]])
        assert len(set(episode.classes[t].tolist())) == 5
        support_images = {tuple(i) for i in support_ids[:, :2].tolist()}
        query_images = {tuple(i) for i in query_ids[:, :2].tolist()}
        assert len(support_images) == 15 and len(query_images) == 35
        assert not support_images & query_images


def test_label_order_is_random_across_tasks():
    episode = EpisodeSampler(coded_store(), ways=5, shots=1, queries=1, meta_batch=50).sample()
    # label 0 must not always stand for the smallest class drawn
    assert (episode.classes[:, 0] != episode.classes.min(dim=1).values).any()


def test_split_never_yields_other_split_images(tmp_path):
    for split in ("train", "val", "test"):
        coded_store("coded", split).save(tmp_path / split)
    for split in ("train", "val", "test"):
        store = ImageStore.load(tmp_path / split)
        episode = EpisodeSampler(store, 5, 1, 5, meta_batch=30).sample()
        codes = torch.cat(
            [identities(episode.support_x)[..., 2].flatten(), identities(episode.query_x)[..., 2].flatten()]
        )
        assert set(codes.tolist()) == {SPLIT_CODE[split]}


def test_synthetic_splits_have_disjoint_classes():
    train, test = generate_store("glyphs", "train", classes=8), generate_store("glyphs", "test", classes=8)
    flat_train = train.images.view(8, 20, -1).float().mean(1)
    flat_test = test.images.view(8, 20, -1).float().mean(1)
    # class means of different splits are further apart than a class from itself
    assert torch.cdist(flat_train, flat_test).min() > 0


def test_same_seed_same_episodes_different_seed_different():
    store = coded_store()
    a = EpisodeSampler(store, 5, 1, 2, meta_batch=3, seed=7)
    b = EpisodeSampler(store, 5, 1, 2, meta_batch=3, seed=7)
    c = EpisodeSampler(store, 5, 1, 2, meta_batch=3, seed=8)
    for _ in range(3):
        ea, eb, ec = a.sample(), b.sample(), c.sample()
        assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.query_x, eb.query_x)
        assert torch.equal(ea.classes, eb.classes)
    assert not torch.equal(ea.support_x, ec.support_x)


def test_sampler_state_dict_resumes_exactly():
    stores = [coded_store("a"), coded_store("b")]
    sampler = MixtureSampler(stores, 5, 1, 2, meta_batch=4, policy="random", seed=1)
    sampler.sample()
    state = sampler.state_dict()
    expected = [sampler.sample() for _ in range(3)]
    resumed = MixtureSampler(stores, 5, 1, 2, meta_batch=4, policy="random", seed=99)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.sample()
        assert torch.equal(got.support_x, want.support_x) and torch.equal(got.mode, want.mode)


def test_rotation_turns_whole_classes():
    store = coded_store(side=6)
    episode = EpisodeSampler(store, 5, 2, 3, meta_batch=10, rotate=True, seed=0).sample()
    images = torch.cat([episode.support_x.view(10, 5, 2, 1, 6, 6), episode.query_x.view(10, 5, 3, 1, 6, 6)], dim=2)
    raw = store.images.float() / 255
    turns_seen = set()
    for t in range(10):
        for n in range(5):
            c = int(episode.classes[t, n])
            turns = set()
            for image in images[t, n]:
                # find which stored image of class c, rotated by which quarter, this is
                for quarter in range(4):
                    original = torch.rot90(image, -quarter, dims=(-2, -1))
                    index = int(round(float(original[0, 0, 1]) * 255))
                    if int(round(float(original[0, 0, 0]) * 255)) == c and torch.allclose(
                        original, raw[store.class_offsets[c] + index]
                    ):
                        turns.add(quarter)
                        break
            assert len(turns) == 1, "every image of one class in a task shares one rotation"
            turns_seen |= turns
    assert turns_seen == {0, 1, 2, 3}


@pytest.mark.parametrize("policy", ["mixed", "per-batch", "alternate", "random"])
def test_mixture_policies(policy):
    stores = [coded_store(name) for name in ("a", "b", "c")]
    sampler = MixtureSampler(stores, 5, 1, 1, meta_batch=10, policy=policy, seed=0)
    batches = [sampler.sample() for _ in range(300)]
    counts = [torch.bincount(b.mode, minlength=3).tolist() for b in batches]
    totals = torch.tensor(counts).sum(0).float() / (300 * 10)
    if policy == "mixed":
        assert all(sorted(c) == [3, 3, 4] for c in counts)
        assert Counter(c.index(4) for c in counts).keys() == {0, 1, 2}  # the mode with 4 tasks rotates
    elif policy in ("per-batch", "alternate"):
        assert all(sorted(c) == [0, 0, 10] for c in counts)
        if policy == "alternate":
            assert [c.index(10) for c in counts[:6]] == [0, 1, 2, 0, 1, 2]
    else:
        assert any(sorted(c) not in ([3, 3, 4], [0, 0, 10]) for c in counts)
    assert torch.allclose(totals, torch.full((3,), 1 / 3), atol=0.05)
    for batch in batches[:5]:
        assert batch.mode_names == ("a", "b", "c")
        for t in range(10):  # every task's images come from the store its mode names
            store_classes = identities(batch.support_x[t])[:, 0]
            assert torch.equal(store_classes, batch.classes[t][batch.support_y[t]])


def test_mixture_weights():
    stores = [coded_store(name) for name in ("a", "b")]
    for policy in ("random", "per-batch"):
        sampler = MixtureSampler(stores, 5, 1, 1, meta_batch=10, policy=policy, weights=[3, 1], seed=0)
        modes = torch.cat([sampler.sample().mode for _ in range(400)])
        assert abs(float((modes == 0).float().mean()) - 0.75) < 0.04
    mixed = MixtureSampler(stores, 5, 1, 1, meta_batch=8, policy="mixed", weights=[3, 1], seed=0)
    assert torch.bincount(mixed.sample().mode).tolist() == [6, 2]


def test_mixed_counts_for_two_and_five_modes():
    for modes, expected in ((2, [5, 5]), (5, [2, 2, 2, 2, 2])):
        sampler = MixtureSampler([coded_store(str(m)) for m in range(modes)], 5, 1, 1, meta_batch=10, seed=0)
        assert torch.bincount(sampler.sample().mode, minlength=modes).tolist() == expected


def test_store_roundtrip_and_conform(tmp_path):
    store = coded_store(side=6)
    store.save(tmp_path / "s")
    loaded = ImageStore.load(tmp_path / "s")
    assert torch.equal(loaded.images, store.images) and loaded.class_names == store.class_names
    assert torch.equal(loaded.labels, torch.arange(12).repeat_interleave(20))
    rgb = loaded.conformed(12, 3)
    assert rgb.image_shape == (3, 12, 12)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])  # grey tiled to three channels
    assert generate_store("textures", "val", classes=2).conformed(16, 1).image_shape == (1, 16, 16)


def test_synthetic_modes_are_deterministic_and_distinct():
    a = generate_store("shapes", "train", classes=4)
    b = generate_store("shapes", "train", classes=4)
    assert torch.equal(a.images, b.images)
    assert generate_store("shapes", "train", classes=4, seed=1).images.float().sub(a.images.float()).abs().mean() > 1
    shapes = {m: generate_store(m, "val", classes=3).image_shape for m in SYNTHETIC_MODES}
    assert shapes == {"glyphs": (1, 32, 32), "textures": (3, 32, 32), "shapes": (3, 32, 32)}
    store = generate_store("glyphs", "val", classes=3)
    images = store.images.view(3, 20, -1).float()
    within = (images - images.mean(1, keepdim=True)).abs().mean()
    assert within > 5, "images of one class vary"


def test_load_stores_caches_synthetic_and_conforms(tmp_path):
    stores = load_stores(["Synthetic"], "test", root=tmp_path, side=28)
    assert [s.mode for s in stores] == list(SYNTHETIC_MODES)
    assert {s.image_shape for s in stores} == {(3, 28, 28)}
    assert (tmp_path / "cache" / "glyphs" / "test" / "manifest.json").is_file()
    manifest = json.loads((tmp_path / "cache" / "glyphs" / "test" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["num_classes"] == 64


def test_synthetic_cache_is_generated_once_by_processes_that_ask_at_once(tmp_path):
    """As the ranks of a torchrun job do: 4 processes load the 3 synthetic modes into one empty cache.

    Each mode is generated once, under the cache lock, and the others wait and load it. Before the lock
    every process generated and saved its own copy, and one could find the folder that another had just
    renamed into place ("could not write cache ...: Directory not empty"; the torchrun test failed so
    1 run in 5). Generation is slowed by 1 s here so that all 4 ask before the first one finishes."""
    script = (
        "import sys, time; import kml.data.synthetic as synthetic; from kml.data.modes import load_stores\n"
        "generate = synthetic.generate_store\n"
        "def slow(*args, **kwargs):\n    time.sleep(1); print('generated', flush=True); return generate(*args, **kwargs)\n"
        "synthetic.generate_store = slow\n"
        "stores = load_stores(['synthetic'], 'train', root=sys.argv[1], side=28)\n"
        "print(sum(int(s.images.sum()) for s in stores))"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    results = [process.communicate(timeout=300) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err for _, err in results]
    outputs = [out.split() for out, _ in results]
    assert sum(out.count("generated") for out in outputs) == 3  # once per mode
    assert len({out[-1] for out in outputs}) == 1  # every process got the same images


def test_mode_names():
    assert canonical_mode("FC100") == "fc100" and canonical_mode("bird") == "cub"
    assert canonical_mode("MiniImageNet") == "miniimagenet"
    assert expand_modes(["synthetic", "glyphs", "omniglot"]) == [*SYNTHETIC_MODES, "omniglot"]
    assert canonical_mode("folder:/x/y") == "folder:/x/y"


# ---------------------------------------------------------------- bad input
def test_unknown_mode_lists_known_ones():
    with pytest.raises(KMLError, match=r"unknown mode 'imagenet21k'; known modes: omniglot, miniimagenet"):
        canonical_mode("imagenet21k")


def test_missing_dataset_cache_says_command(tmp_path):
    with pytest.raises(KMLError, match=r"; run: kml-download --datasets omniglot --root"):
        load_store("omniglot", "train", tmp_path)


def test_too_many_ways():
    with pytest.raises(KMLError, match=r"mode 'coded' split 'train' has 12 classes; 20-way tasks need at least 20"):
        EpisodeSampler(coded_store(), ways=20, shots=1)


def test_too_many_shots_names_mode_and_class():
    arrays = [torch.zeros(20, 1, 4, 4, dtype=torch.uint8)] * 4 + [torch.zeros(5, 1, 4, 4, dtype=torch.uint8)]
    store = ImageStore.from_class_arrays(arrays, list("abcde"), "tiny", "val")
    with pytest.raises(
        KMLError, match=r"mode 'tiny' split 'val': class 'e' has 5 images, fewer than shots \+ queries = 1 \+ 15"
    ):
        EpisodeSampler(store, ways=5, shots=1, queries=15)


def test_wrong_format_version(tmp_path):
    coded_store().save(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["format_version"] = 0
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KMLError, match=r"format version 0, this kml reads version 1; delete .* and rebuild"):
        ImageStore.load(tmp_path / "s")


def test_corrupt_cache_file(tmp_path):
    coded_store().save(tmp_path / "s")
    data = (tmp_path / "s" / "images.npy").read_bytes()
    (tmp_path / "s" / "images.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(KMLError, match=r"corrupt cache file .*images.npy"):
        ImageStore.load(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(KMLError, match=r"corrupt cache manifest"):
        ImageStore.load(tmp_path / "s")


def test_interrupted_cache_is_not_complete(tmp_path):
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "s" / "images.npy", np.zeros((2, 1, 4, 4), np.uint8))
    with pytest.raises(KMLError, match=r"no complete cache .* \(missing manifest.json\)"):
        ImageStore.load(tmp_path / "s")


def test_mismatched_image_sizes():
    with pytest.raises(
        KMLError, match=r"mismatched image sizes, class 'b' has \[1, 5, 5\] but class 'a' has \[1, 4, 4\]"
    ):
        ImageStore.from_class_arrays(
            [np.zeros((3, 1, 4, 4), np.uint8), np.zeros((3, 1, 5, 5), np.uint8)], ["a", "b"], "m", "train"
        )
    with pytest.raises(KMLError, match=r"must share one image shape"):
        MixtureSampler([coded_store("a", side=4), coded_store("b", side=5)], 5, 1, 1)


def test_bad_policy_and_weights():
    with pytest.raises(
        KMLError, match=r"unknown mixture policy 'roundrobin'; choose one of mixed, random, per-batch, alternate"
    ):
        MixtureSampler([coded_store()], 5, 1, 1, policy="roundrobin")
    with pytest.raises(KMLError, match=r"one non-negative weight per mode"):
        MixtureSampler([coded_store("a"), coded_store("b")], 5, 1, 1, weights=[1.0])


def test_episode_select_and_concat():
    episode = EpisodeSampler(coded_store(), 5, 1, 2, meta_batch=6).sample()
    parts = [episode.select(slice(0, 3)), episode.select([3, 4, 5])]
    joined = Episode.concat(parts)
    assert torch.equal(joined.query_x, episode.query_x) and torch.equal(joined.classes, episode.classes)


def test_import_kml_is_light():
    code = "import sys, kml, kml.data.sampler, kml.data.modes; print(sorted(m for m in ('matplotlib','pandas','torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_mixture_rotates_only_the_rotated_modes():
    stores = [coded_store("a"), coded_store("b")]
    sampler = MixtureSampler(stores, 5, 2, 2, meta_batch=10, policy="mixed", rotate=[True, False], seed=0)
    episode = sampler.sample()
    raw = torch.cat([s.images for s in stores]).float() / 255
    for t in range(10):
        if int(episode.mode[t]) == 0:
            continue  # rotated classes: covered by test_rotation_turns_whole_classes
        ids = identities(episode.support_x[t])
        base = len(stores[0].images)
        originals = raw[base + stores[0].class_offsets[ids[:, 0]] + ids[:, 1]]
        unchanged = torch.isclose(episode.support_x[t], originals).flatten(1).all(1)
        if int(episode.mode[t]) == 1:
            assert unchanged.all()


def test_uint8_episodes_match_float_episodes():
    stores = [coded_store("a"), coded_store("b")]
    raw = MixtureSampler(stores, 5, 1, 3, meta_batch=6, seed=4, rotate=[True, False], dtype=torch.uint8).sample()
    scaled = MixtureSampler(stores, 5, 1, 3, meta_batch=6, seed=4, rotate=[True, False]).sample()
    assert raw.support_x.dtype == torch.uint8
    converted = raw.to_float()
    assert torch.equal(converted.support_x, scaled.support_x) and torch.equal(converted.query_x, scaled.query_x)


# ------------------------------------------------------------------ which stored images an episode holds
def expected_images(episode: Episode, stores: list[ImageStore], which: str) -> torch.Tensor:
    """The episode's ``which`` images rebuilt from the stores by its indices and turns, in the episode's dtype."""
    index, labels = getattr(episode, f"{which}_index"), getattr(episode, f"{which}_y")
    out = []
    for t in range(episode.num_tasks):
        images = stores[int(episode.mode[t])].images[index[t]]
        if episode.turns is not None:
            turns = episode.turns[t][labels[t]]
            images = torch.stack([torch.rot90(image, int(k), dims=(-2, -1)) for image, k in zip(images, turns)])
        out.append(images)
    images = torch.stack(out)
    return images if episode.support_x.dtype == torch.uint8 else images.to(episode.support_x.dtype).mul_(1.0 / 255)


def assert_indices_match(episode: Episode, stores: list[ImageStore]) -> None:
    assert episode.support_index.dtype == torch.int64 and episode.query_index.dtype == torch.int64
    assert episode.support_index.shape == episode.support_y.shape and episode.query_index.shape == episode.query_y.shape
    assert torch.equal(expected_images(episode, stores, "support"), episode.support_x)
    assert torch.equal(expected_images(episode, stores, "query"), episode.query_x)
    for t in range(episode.num_tasks):  # and the class of every indexed image is the class its label stands for
        labels = stores[int(episode.mode[t])].labels
        assert torch.equal(labels[episode.support_index[t]], episode.classes[t][episode.support_y[t]])
        assert torch.equal(labels[episode.query_index[t]], episode.classes[t][episode.query_y[t]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("rotate", [False, True])
def test_episode_indices_point_at_its_images(dtype, rotate):
    store = coded_store(side=6)
    episode = EpisodeSampler(store, 5, 2, 3, meta_batch=8, rotate=rotate, seed=2, dtype=dtype).sample()
    assert (episode.turns is not None) == rotate
    if rotate:
        assert episode.turns.shape == (8, 5) and episode.turns.dtype == torch.int64
        assert set(episode.turns.flatten().tolist()) == {0, 1, 2, 3}
    assert_indices_match(episode, [store])
    assert_indices_match(episode.to("cpu").to_float(), [store])
    assert_indices_match(episode.select([5, 1]), [store])
    assert_indices_match(Episode.concat([episode.select(slice(4, None)), episode.select(slice(0, 4))]), [store])


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_mixture_episode_indices_index_each_tasks_own_mode_store(dtype):
    # distinct stores of different sizes: an index into the wrong store (or into the joined images) would not match
    stores = [
        coded_store("a", classes=12, per_class=20),
        coded_store("b", classes=9, per_class=17),
        coded_store("c", classes=7, per_class=22),
    ]
    sampler = MixtureSampler(stores, 5, 1, 3, meta_batch=9, rotate=[True, False, True], seed=5, dtype=dtype)
    episodes = [sampler.sample() for _ in range(3)]
    for episode in episodes:
        assert set(episode.mode.tolist()) == {0, 1, 2}
        assert not episode.turns[episode.mode == 1].any()  # mode b is not rotated
        assert_indices_match(episode, stores)
    joined = Episode.concat([episodes[0].select([8, 0, 4]), episodes[2]])
    assert_indices_match(joined, stores)
    plain = MixtureSampler(stores, 5, 1, 3, meta_batch=4, seed=5, dtype=dtype).sample()
    assert plain.turns is None
    mixed = Episode.concat([plain, episodes[1]])  # a part without turns was not rotated
    assert mixed.turns.shape == (13, 5) and not mixed.turns[:4].any()
    assert_indices_match(mixed, stores)


def test_episodes_built_without_indices_still_work():
    episode = Episode(
        torch.rand(2, 4, 1, 5, 5),
        torch.arange(2).repeat_interleave(2).expand(2, -1),
        torch.rand(2, 2, 1, 5, 5),
        torch.arange(2).expand(2, -1),
        torch.zeros(2, dtype=torch.int64),
        torch.zeros(2, 2, dtype=torch.int64),
        ("m",),
    )
    assert episode.support_index is None and episode.query_index is None and episode.turns is None
    for other in (episode.select([1]), episode.to("cpu"), episode.to_float(), Episode.concat([episode, episode])):
        assert other.support_index is None and other.query_index is None and other.turns is None
    sampled = EpisodeSampler(coded_store(), 2, 2, 1, meta_batch=2).sample()
    joined = Episode.concat([sampled, replace(sampled, support_index=None, query_index=None)])
    assert joined.support_index is None and joined.query_index is None and joined.num_tasks == 4


# ------------------------------------------------------------------ stores from in-memory arrays
def labelled_arrays(layout: str, count: int = 30, side: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixel (0, 0, channel 0) is their own position in the input, and shuffled labels 10, 20, 30."""
    rng = np.random.default_rng(0)
    shape = {"last": (count, side, side, 3), "first": (count, 3, side, side), "grey": (count, side, side)}[layout]
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    corner = {"last": (slice(None), 0, 0, 0), "first": (slice(None), 0, 0, 0), "grey": (slice(None), 0, 0)}[layout]
    images[corner] = np.arange(count)
    labels = rng.permutation(np.repeat([30, 10, 20], count // 3))
    return images, labels


@pytest.mark.parametrize("layout", ["last", "first", "grey"])
def test_store_from_arrays_groups_images_by_label(layout):
    images, labels = labelled_arrays(layout)
    store = ImageStore.from_arrays(images, labels, mode="mine", split="train")
    channels = 1 if layout == "grey" else 3
    assert store.image_shape == (channels, 5, 5) and store.images.dtype == torch.uint8
    assert store.class_names == ["10", "20", "30"] and store.class_sizes.tolist() == [10, 10, 10]
    assert (store.mode, store.split) == ("mine", "train")
    positions = store.images[:, 0, 0, 0].long()
    assert labels[positions.numpy()].tolist() == [10] * 10 + [20] * 10 + [30] * 10
    assert all(bool((p[1:] > p[:-1]).all()) for p in positions.view(3, 10))  # order kept inside a class
    original = torch.from_numpy(images[positions.numpy()])
    original = (
        original.unsqueeze(1) if layout == "grey" else original.permute(0, 3, 1, 2) if layout == "last" else original
    )
    assert torch.equal(store.images, original)
    named = ImageStore.from_arrays(
        torch.from_numpy(images), torch.from_numpy(labels), class_names={10: "cat", 20: "dog", 30: "eel"}
    )
    assert named.class_names == ["cat", "dog", "eel"] and named.mode == "arrays"
    episode = EpisodeSampler(store, 3, 2, 3, meta_batch=4, seed=1, dtype=torch.uint8).sample()
    assert_indices_match(episode, [store])


def test_store_from_arrays_errors_are_one_line():
    images, labels = labelled_arrays("last")
    cases = [
        (images.astype(np.float32), labels, {}, r"images are torch.float32, expected uint8"),
        (images, labels[:-1], {}, r"need one label per image \(30\), got labels of shape \[29\]"),
        (images, labels.astype(float), {}, r"labels must be integers"),
        (images[:, :, :, :2], labels, {}, r"cannot tell the channel axis"),
        (np.zeros((4, 3, 5, 3), np.uint8), [0, 0, 1, 1], {}, r"cannot tell the channel axis of images \[4, 3, 5, 3\]"),
        (np.zeros((4, 2, 5, 5), np.uint8), [0, 0, 1, 1], {"channels_last": False}, r"2 channels, expected 1 or 3"),
        (np.zeros((4, 5), np.uint8), [0, 0, 1, 1], {}, r"images must be \[num_images, H, W, C\]"),
        (images, labels, {"class_names": ["a", "b"]}, r"2 class names for 3 distinct labels"),
        (images, labels, {"class_names": {10: "a"}}, r"no name for label\(s\) \[20, 30\]"),
    ]
    for array, label, options, message in cases:
        with pytest.raises(KMLError, match=message) as error:
            ImageStore.from_arrays(array, label, **options)
        assert "\n" not in str(error.value)
    forced = ImageStore.from_arrays(np.zeros((4, 3, 5, 3), np.uint8), [0, 0, 1, 1], channels_last=True)
    assert forced.image_shape == (3, 3, 5)


# ------------------------------------------------------------------ plot_episode
@pytest.mark.parametrize("channels,dtype", [(1, torch.float32), (3, torch.uint8)])
def test_plot_episode_draws_one_row_per_class(tmp_path, channels, dtype):
    from matplotlib.figure import Figure

    from kml.data.plots import plot_episode

    stores = [coded_store("a").conformed(8, channels), coded_store("b", classes=9).conformed(8, channels)]
    episode = MixtureSampler(stores, 4, 2, 3, meta_batch=4, rotate=True, seed=0, dtype=dtype).sample()
    figure = plot_episode(episode, task=3)
    assert isinstance(figure, Figure)
    drawn = [ax for ax in figure.get_axes() if ax.images]
    assert len(drawn) == 4 * (2 + 3)
    assert episode.mode_names[int(episode.mode[3])] in figure.get_suptitle()
    assert {ax.images[0].get_array().ndim for ax in drawn} == {2 if channels == 1 else 3}
    figure.savefig(tmp_path / "episode.png")
    assert (tmp_path / "episode.png").read_bytes()[:4] == b"\x89PNG"
    figure = plot_episode(episode.to_float(), max_classes=2, title="two classes")
    assert len([ax for ax in figure.get_axes() if ax.images]) == 2 * (2 + 3) and figure.get_suptitle() == "two classes"
    with pytest.raises(KMLError, match="task 4 is out of range"):
        plot_episode(episode, task=4)


def test_plots_module_imports_matplotlib_only_when_drawing():
    code = "import sys, kml.data.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_episodes_notebook_executes_headless_and_draws(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    from pathlib import Path

    monkeypatch.setenv("KML_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures
    path = Path(__file__).resolve().parents[1] / "notebooks" / "episodes.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 2
