"""Each released-code quirk switch does what the released code does, on constructed inputs (issue 26).

The released codes: sutd-visual-computing-group/KML-Classification (``scripts/trainer.py``) and
shaohua0116/MMAML-Classification (``maml/datasets/multimodal_few_shot.py``, ``maml/trainer.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_recipes import assert_scheduler_follows_the_schedule

from kml.algorithms import build_learner
from kml.algorithms.losses import refine_prototypes, refine_prototypes_as_released
from kml.algorithms.reference import released_refinement
from kml.cli import results as results_cli
from kml.cli import train as train_cli
from kml.config import LearnerConfig
from kml.config.checks import check_run_combinations
from kml.config.recipes import RECIPES, recipe_values
from kml.config.run import RELEASED_QUIRKS, RunConfig, learning_rate_at
from kml.data.episode import Episode
from kml.data.sampler import MixtureSampler
from kml.errors import KMLError
from kml.evaluation import ModeResult, evaluate, released_ci95, released_protocol

F64 = torch.float64


def soft_weights(query: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``[M, N]`` softmax over classes of ``-|q - p|^2`` (the released ``_update_proto``'s ``p_y``)."""
    return torch.softmax(-((query[:, None] - centres[None]) ** 2).sum(-1), dim=1)


# ----------------------------------------------------------------------------- the refinement as released
def test_released_refinement_ignores_the_support_in_one_shot():
    torch.manual_seed(0)
    ways, dim = 4, 6
    support, query = torch.randn(ways, dim, dtype=F64), torch.randn(9, dim, dtype=F64)
    centres = support.clone()  # 1-shot prototypes are the support features
    refined = refine_prototypes_as_released(centres, support, query)
    w = soft_weights(query, centres)
    only_queries = (w.T @ query) / (1 + w.sum(0))[:, None]  # K = 1 in the denominator, no support image summed
    torch.testing.assert_close(refined, only_queries, rtol=1e-12, atol=1e-12)
    # the support enters only through the starting prototypes: other support features, same result
    torch.testing.assert_close(refine_prototypes_as_released(centres, support + 5.0, query), refined)
    fixed = refine_prototypes(centres, support, torch.arange(ways), query)  # kml's: every support image counts
    assert not torch.allclose(fixed, refined)


def test_released_refinement_drops_the_last_image_and_pairs_blocks_by_position():
    torch.manual_seed(1)
    shots, dim = 3, 5
    labels = torch.tensor([2, 2, 2, 0, 0, 0, 1, 1, 1])  # blocks in order of first appearance: 2, 0, 1
    support, query = torch.randn(9, dim, dtype=F64), torch.randn(7, dim, dtype=F64)
    centres = torch.stack([support[labels == c].mean(0) for c in range(3)])
    w = soft_weights(query, centres)
    # row j takes block j's first K-1 images, whatever their label (released features_sum[j])
    expected = torch.stack(
        [(support[j * shots : j * shots + 2].sum(0) + w[:, j] @ query) / (shots + w[:, j].sum()) for j in range(3)]
    )
    torch.testing.assert_close(refine_prototypes_as_released(centres, support, query), expected, rtol=1e-12, atol=0)
    # the reference loop (written as the released loops) agrees; with labels in block order too
    torch.testing.assert_close(released_refinement(support, labels, query, 3), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(KMLError, match="blocks of K"):
        refine_prototypes_as_released(centres, support[:8], query)


def test_refinement_quirk_is_the_learners_and_needs_the_refinement():
    with pytest.raises(KMLError, match="has no effect"):
        check_run_combinations(run(learner=protonet(proto_refine=False, released_refinement=True)))
    with pytest.raises(KMLError, match="has no effect"):
        check_run_combinations(run(learner=LearnerConfig(algorithm="maml", released_refinement=True)))


def test_released_layout_labels_the_class_blocks_in_a_random_order(synthetic_stores):
    """The released loaders lay a task out in class blocks by first appearance under random labels
    (KML scripts/datasets/omniglot.py lines 141-168): with released_refinement, kml's episodes are laid out so too,
    so that its pairing by position pairs a prototype with a random class's support, as in the authors' runs."""
    stores = synthetic_stores["train"]
    plain = MixtureSampler(stores, 4, 2, 3, meta_batch=6, seed=5).sample()
    shuffled = MixtureSampler(stores, 4, 2, 3, meta_batch=6, seed=5, shuffle_block_labels=True).sample()
    assert torch.equal(plain.support_x, shuffled.support_x) and torch.equal(plain.query_x, shuffled.query_x)
    block = shuffled.support_y.view(6, 4, 2)[:, :, 0]  # each block's label
    assert torch.equal(shuffled.support_y.view(6, 4, 2), block[:, :, None].expand(6, 4, 2))
    assert torch.equal(shuffled.query_y.view(6, 4, 3), block[:, :, None].expand(6, 4, 3))
    assert torch.equal(block.sort(dim=1).values, torch.arange(4).expand(6, 4))  # a permutation per task
    assert not torch.equal(block, torch.arange(4).expand(6, 4))
    # label l still names its class: block n's class is classes[label of block n]
    assert torch.equal(shuffled.classes.gather(1, block), plain.classes)


def test_evaluation_in_the_released_layout_sees_the_same_images(synthetic_stores):
    torch.manual_seed(0)
    learner = build_learner(protonet(ways=4))
    runs = [
        evaluate(learner, synthetic_stores["test"][:1], 4, 2, 2, episodes=6, progress=False, shuffle_block_labels=flag)
        for flag in (False, True)
    ]
    # kml's ProtoNet does not depend on which label a class block carries: the same accuracy, episode by episode
    assert runs[0][0].episode_accuracy == runs[1][0].episode_accuracy


# ----------------------------------------------------------------------------- the query pass modulation
def protonet(**values) -> LearnerConfig:
    return LearnerConfig(
        **{"algorithm": "protonet", "ways": 3, "image_size": 16, "base_channels": 4, "encoder_channels": 4, **values}
    )


def run(**values) -> RunConfig:
    return RunConfig(**values)


def test_query_modulation_encodes_the_query_images_as_released():
    torch.manual_seed(0)
    config = protonet(modulation="kml", identity_init=False, proto_refine=False)
    fixed = build_learner(config).double().train()
    released = build_learner(dataclasses.replace(config, released_query_modulation=True)).double().train()
    released.load_state_dict(fixed.state_dict())
    g = torch.Generator().manual_seed(1)
    episode = Episode(
        support_x=torch.rand(2, 6, 3, 16, 16, generator=g, dtype=F64),
        support_y=torch.tensor([[0, 0, 1, 1, 2, 2]] * 2),
        query_x=torch.rand(2, 9, 3, 16, 16, generator=g, dtype=F64),
        query_y=torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2]] * 2),
        mode=torch.zeros(2, dtype=torch.long),
        classes=torch.arange(3).expand(2, 3),
        mode_names=("m",),
    )
    ours = released(episode).task_loss
    model = released.models[0]
    by_hand = []
    for t in range(2):  # released trainer.py: embeddings = embedding_model(val task) before the query features
        support = model(episode.support_x[t], model.modulation(episode.support_x[t], episode.support_y[t]))
        query = model(episode.query_x[t], model.modulation(episode.query_x[t], episode.query_y[t]))
        support, query = support.flatten(1), query.flatten(1)
        centres = torch.stack([support[episode.support_y[t] == c].mean(0) for c in range(3)])
        logits = -((query[:, None] - centres[None]) ** 2).sum(-1)
        by_hand.append(torch.nn.functional.cross_entropy(logits, episode.query_y[t]))
    torch.testing.assert_close(ours, torch.stack(by_hand), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(ours, fixed(episode).task_loss)  # kml's: the support's modulation for both passes
    torch.testing.assert_close(ours, released.reference_forward(episode).task_loss, rtol=1e-10, atol=1e-12)


def test_query_modulation_needs_a_protonet_encoder_without_labels():
    with pytest.raises(KMLError, match="has no effect"):
        check_run_combinations(run(learner=protonet(modulation="none", released_query_modulation=True)))
    with pytest.raises(KMLError, match="encoder_uses_labels"):
        protonet(released_query_modulation=True, encoder_uses_labels=True)


# ----------------------------------------------------------------------------- with-replacement meta-batches
def distinct_moments(picks: int, pool: int) -> tuple[float, float]:
    """Mean and variance of the number of distinct values among ``picks`` uniform draws from ``pool``.

    ``D = sum_i 1[i drawn]``: ``E[D] = n p1``, ``E[D^2] = n p1 + n (n - 1) p2`` with ``p1 = 1 - (1 - 1/n)^c`` and
    ``p2 = P(i and j drawn) = 1 - 2 (1 - 1/n)^c + (1 - 2/n)^c``.
    """
    n, c = pool, picks
    p1 = 1 - (1 - 1 / n) ** c
    p2 = 1 - 2 * (1 - 1 / n) ** c + (1 - 2 / n) ** c
    mean = n * p1
    return mean, n * p1 + n * (n - 1) * p2 - mean**2


def released_distinct(counts: list[int], pool: int) -> tuple[float, float]:
    """The released meta-batch: mode m fills ``counts[m]`` slots, each picking one of its ``pool`` tasks."""
    moments = [distinct_moments(c, pool) for c in counts]
    return sum(m for m, _ in moments), sum(v for _, v in moments)


def test_expected_distinct_tasks_of_the_released_meta_batch():
    # 10 slots round robin over the modes (5/5, 4/3/3, 2 each); separate Multi-MAML runs: 4 slots among 4
    assert released_distinct([5, 5], 10)[0] == pytest.approx(8.1902, abs=1e-4)
    assert released_distinct([4, 3, 3], 10)[0] == pytest.approx(8.859, abs=1e-4)
    assert released_distinct([2] * 5, 10)[0] == pytest.approx(9.5, abs=1e-12)
    assert released_distinct([4], 4)[0] == pytest.approx(2.734375, abs=1e-12)


@pytest.mark.parametrize(("pool", "count"), [(10, 4), (10, 3), (4, 4)])
def test_pool_picks_have_the_released_distinct_count(synthetic_stores, pool, count):
    sampler = MixtureSampler(synthetic_stores["train"], 3, 1, 1, meta_batch=10, seed=0, replacement_pool=pool)
    draws = 4000
    distinct = torch.tensor([len(set(sampler.pool_picks(count).tolist())) for _ in range(draws)], dtype=F64)
    mean, variance = distinct_moments(count, pool)
    # 5 standard errors of the mean of independent draws: a false failure once in ~3.5 million runs
    assert abs(float(distinct.mean()) - mean) < 5 * math.sqrt(variance / draws)


def test_released_sampling_repeats_whole_tasks_and_keeps_the_mode_counts(synthetic_stores):
    sampler = MixtureSampler(synthetic_stores["train"], 3, 1, 2, meta_batch=10, seed=0, replacement_pool=10)
    draws, distinct = 150, []
    for _ in range(draws):
        episode = sampler.sample()
        assert sorted(torch.bincount(episode.mode, minlength=3).tolist()) == [3, 3, 4]  # still 4/3/3
        keys = [
            (int(m), tuple(s.tolist()), tuple(q.tolist()))
            for m, s, q in zip(episode.mode, episode.support_index, episode.query_index)
        ]
        for i, key in enumerate(keys):  # a repeated task is the same images, rotations and classes
            j = keys.index(key)
            assert torch.equal(episode.support_x[i], episode.support_x[j])
            assert torch.equal(episode.classes[i], episode.classes[j])
        distinct.append(len(set(keys)))
    mean, variance = released_distinct([4, 3, 3], 10)
    assert abs(np.mean(distinct) - mean) < 5 * math.sqrt(variance / draws)
    fresh = MixtureSampler(synthetic_stores["train"], 3, 1, 2, meta_batch=10, seed=0)
    episode = fresh.sample()
    assert (
        len({(tuple(s.tolist()), tuple(q.tolist())) for s, q in zip(episode.support_index, episode.query_index)}) == 10
    )


def test_a_restarted_sampler_draws_the_first_batches_again_with_the_quirks(synthetic_stores):
    """What the transference recorder samples from: the training sampler from its start, quirks included."""
    sampler = MixtureSampler(
        synthetic_stores["train"], 3, 1, 2, meta_batch=10, seed=0, replacement_pool=10, shuffle_block_labels=True
    )
    first = [sampler.sample() for _ in range(2)]
    again = sampler.restarted()
    for episode in first:
        repeat = again.sample()
        assert torch.equal(episode.support_index, repeat.support_index)
        assert torch.equal(episode.support_y, repeat.support_y) and torch.equal(episode.classes, repeat.classes)
    assert again.replacement_pool == 10 and again.shuffle_block_labels
    assert sampler.step == 2  # the original is not advanced


# ----------------------------------------------------------------------------- the rate-halving timing
def test_released_rate_timing_halves_one_step_early():
    kml = RunConfig(lr=1e-3, lr_halve_every=10000)
    released = dataclasses.replace(kml, released_lr_timing=True)
    steps = (0, 9998, 9999, 10000, 19999, 29999)
    assert [learning_rate_at(kml, s) for s in steps] == [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]
    # released scripts/trainer.py: `if i % 10000 == 0: lr *= 0.5` before update i, i counted from 1
    assert [learning_rate_at(released, s) for s in steps] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 1.25e-4]
    for every in (1, 3):  # the scheduler the trainer builds follows it
        assert_scheduler_follows_the_schedule(dataclasses.replace(released, lr_halve_every=every))
    with pytest.raises(KMLError, match="released_lr_timing"):
        check_run_combinations(RunConfig(lr_schedule="constant", released_lr_timing=True))


# ----------------------------------------------------------------------------- the checkpoint before the last update
def tiny_run(tmp_path, name: str, steps: int, *extra: str) -> dict:
    argv = [
        "--modes", "synthetic", "--algorithm", "protonet", "--modulation", "none", "--image-size", "16",
        "--base-channels", "4", "--meta-batch", "3", "--queries", "2", "--steps", str(steps), "--val-every", "1",
        "--val-episodes", "2", "--checkpoint-every", "1", "--no-progress", "--train-dir", str(tmp_path),
        "--run-name", name, "--data-root", str(tmp_path / "data"), *extra,
    ]  # fmt: skip
    assert train_cli.main(argv) == 0
    return torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=False)


def test_released_checkpoint_holds_all_updates_but_the_last(tmp_path):
    released = tiny_run(tmp_path, "released", 3, "--released-checkpoint")
    two = tiny_run(tmp_path, "two", 2)
    assert released["step"] == 3 and released["config"]["released_checkpoint"] is True
    for name, value in two["model"].items():  # the released model_*_3.pt: saved before update 3
        assert torch.equal(released["model"][name], value), name
    assert not (tmp_path / "released" / "checkpoints" / "best.pt").exists()  # no best-validation model
    assert (tmp_path / "two" / "checkpoints" / "best.pt").exists()


# ----------------------------------------------------------------------------- the released test protocols
def results(accuracies: list[list[float]]) -> list[ModeResult]:
    return [ModeResult(f"m{m}", float(np.mean(a)), 0.0, 0.0, len(a), a) for m, a in enumerate(accuracies)]


def test_released_mmaml_protocol_is_the_mean_of_mixed_batch_means_with_a_ddof0_interval():
    rng = np.random.default_rng(0)
    modes = [list(rng.uniform(0, 100, 40)) for _ in range(3)]
    summary = released_protocol(results(modes), "mmaml", meta_batch=10)
    # the released test loader's slot g takes mode (g + 10) % 3: modes 1, 2, 0, 1, ...
    stream = [modes[(g + 10) % 3][g // 3] for g in range(120)]
    batch_means = np.array(stream).reshape(12, 10).mean(axis=1)
    assert summary["batches"] == 12
    assert summary["accuracy"] == pytest.approx(batch_means.mean(), rel=1e-12)
    # maml/trainer.py compute_confidence_interval: np.std (ddof 0) * 1.96 / sqrt(n)
    assert summary["ci95"] == pytest.approx(np.std(batch_means) * 1.96 / np.sqrt(12), rel=1e-12)
    assert released_ci95(torch.tensor(batch_means)) == pytest.approx(summary["ci95"], rel=1e-12)


def test_released_kml_protocol_reports_per_mode_windows_of_1000_tasks():
    rng = np.random.default_rng(1)
    modes = [list(rng.uniform(0, 100, 700)) for _ in range(3)]  # 2100 tasks: two full windows of 1000
    summary = released_protocol(results(modes), "kml", meta_batch=10)
    assert len(summary["windows"]) == 2
    stream = [(g + 10) % 3 for g in range(2100)]
    first = [modes[(g + 10) % 3][g // 3] for g in range(1000) if stream[g] == 0]
    window = summary["windows"][0]["modes"]["m0"]
    assert window["accuracy"] == pytest.approx(np.mean(first), rel=1e-12)
    assert window["ci95"] == pytest.approx(np.std(first) * 1.96 / np.sqrt(len(first)), rel=1e-12)
    with pytest.raises(KMLError, match="window is 1000 tasks"):
        released_protocol(results([[50.0] * 10]), "kml")


# ----------------------------------------------------------------------------- switches, recipes, records
def test_every_quirk_is_a_recorded_switch_off_by_default_and_old_configs_load():
    config = RunConfig()
    record = config.to_dict()
    assert all(record.get(name, record["learner"].get(name)) is False for name in RELEASED_QUIRKS)
    for name in RELEASED_QUIRKS:  # a config.json written before the switches: kml's fixes
        record.pop(name, None)
        record["learner"].pop(name, None)
    loaded = RunConfig.from_dict(json.loads(json.dumps(record)))
    assert not any(getattr(loaded, n, getattr(loaded.learner, n, None)) for n in RELEASED_QUIRKS)
    with pytest.raises(KMLError, match="released_sampling must be true or false"):
        RunConfig(released_sampling="yes")


@pytest.mark.parametrize(
    ("name", "on"),
    [
        ("kml-protonet-as-released", set(RELEASED_QUIRKS)),
        ("protonet-as-released", set(RELEASED_QUIRKS) - {"released_query_modulation"}),
        ("mmaml-as-released", {"released_sampling", "released_checkpoint"}),
        ("maml-as-released", {"released_sampling", "released_checkpoint"}),
        ("multi-maml-as-released", {"released_sampling", "released_checkpoint"}),
    ],
)
def test_as_released_recipes_are_their_fixed_recipe_plus_the_quirks(name, on):
    fixed = {"kml-protonet-as-released": "kml-protonet-released"}.get(name, name.removesuffix("-as-released"))
    released, base = dict(RECIPES[name].settings), dict(RECIPES[fixed].settings)
    assert {k for k, v in released.items() if k in RELEASED_QUIRKS and v} == on
    assert {k: v for k, v in released.items() if k not in RELEASED_QUIRKS} == base
    # one kml-results row per fix: the recipe with one switch off, recorded as an override
    values = recipe_values(name, {"modes": ["synthetic"], sorted(on)[0]: False})
    assert values["recipe_overrides"] == [sorted(on)[0]]


def test_kml_results_rows_as_released_as_intended_and_one_fix(tmp_path, capsys):
    """kml-results makes one row per switch: the released code as released, as intended (kml's fixes), and as
    released with one fix; each run's config.json records its switches."""
    tiny = [
        "image_size=16",
        "base_channels=4",
        "encoder_channels=4",
        "meta_batch=3",
        "queries=2",
        "val_every=2",
        "val_episodes=2",
        "checkpoint_every=2",
        "allow_data_departure=true",
    ]
    methods = [
        "as-released=kml-protonet-as-released",
        "as-intended=kml-protonet-released",
        "fix-query=kml-protonet-as-released,released_query_modulation=false",
    ]
    out = tmp_path / "out"
    argv = ["--methods", *methods, "--seeds", "0", "--steps", "2", "--episodes", "3", "--out", str(out)]
    argv += ["--data-root", str(tmp_path / "data"), "--no-progress", "--set", *tiny]
    assert results_cli.main(argv) == 0
    assert capsys.readouterr().out.count("trained, step 2") == 3
    summary = pd.read_csv(out / "results.csv")
    assert set(summary["method"]) == {"as-released", "as-intended", "fix-query"}

    def switches(label: str) -> dict[str, bool]:
        config = json.loads((out / "runs" / "5w1s" / label / "seed0" / "config.json").read_text())
        return {name: config.get(name, config.get("learner", {}).get(name)) for name in RELEASED_QUIRKS}

    assert all(switches("as-released").values())
    assert not any(switches("as-intended").values())
    assert switches("fix-query") == {**switches("as-released"), "released_query_modulation": False}
