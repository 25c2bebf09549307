"""Transference of saved checkpoints on seeded episodes: the work behind ``kml-transference``.

Two designs: :class:`MixedDesign` (all ordered pairs of the run's mixed meta-batches) and :class:`PaperDesign`
(the paper's: many source tasks from one mode's meta-train classes against target tasks from another mode's
meta-test classes). The episodes depend only on the seed, so every checkpoint of a run (and every run with the
same modes, N, K and Q) is analysed on the same tasks: stages and runs compare pair by pair.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from kml.data.episode import Episode
from kml.data.modes import ROTATED_BY_DEFAULT, canonical_mode, expand_modes, load_stores
from kml.data.sampler import MixtureSampler
from kml.data.store import check_run_caches
from kml.errors import KMLError, setting
from kml.transference.analyzer import parameter_names, result_rows, task_transference
from kml.transference.lookahead import Lookahead, SGDLookahead, optimizer_lookahead

__all__ = ["CheckpointAnalyser", "MixedDesign", "PaperDesign"]

# sources drawn (and analysed) at once in the paper design
SOURCE_CHUNK = 10


@dataclass(frozen=True)
class MixedDesign:
    """Every ordered pair of ``batches`` meta-batches of ``meta_batch`` tasks mixed over ``modes`` (default: the
    run's modes and meta-batch), from the ``split`` classes."""

    modes: list[str] | None = None
    split: str = "train"
    batches: int = 10
    meta_batch: int | None = None


@dataclass(frozen=True)
class PaperDesign:
    """``sources`` tasks of ``source_mode``'s ``source_split`` classes against ``targets`` tasks of
    ``target_mode``'s ``target_split`` classes. Each source task is its own sampling unit (``batch`` column)."""

    source_mode: str
    target_mode: str
    source_split: str = "train"
    target_split: str = "test"
    sources: int = 100
    targets: int = 1

    @property
    def name(self) -> str:
        """``<source mode>-<target mode>``: names the run folder's table and figures."""
        return f"{canonical_mode(self.source_mode)}-{canonical_mode(self.target_mode)}"


class CheckpointAnalyser:
    """Transference records of checkpoints of one run, the images loaded once for all of them.

    Args:
        device: where the learner runs.
        lookahead: ``"optimizer"`` (the saved optimiser's next update from its saved state) or ``"sgd"``.
        rate: the SGD rate, or the optimiser's learning rate replaced (default: the rate of the checkpoint's
            next update, schedule included).
        parameters: the meta-parameters that take the step (``all``, ``backbone``, ``modulation``).
        seed: the episodes' seed.
        data_root: the dataset caches (default: the run's).
        progress: progress bars.
    """

    def __init__(
        self,
        device: str,
        lookahead: str = "optimizer",
        rate: float | None = None,
        parameters: str = "all",
        seed: int = 0,
        data_root: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        if lookahead not in ("optimizer", "sgd"):
            raise KMLError(f"unknown lookahead {lookahead!r}; choose optimizer or sgd")
        self.device, self.lookahead, self.rate, self.parameters = device, lookahead, rate, parameters
        self.seed, self.data_root, self.progress = seed, data_root, progress
        self._stores: dict[tuple, list] = {}

    # ------------------------------------------------------------ one checkpoint
    def records(self, checkpoint: str | os.PathLike, design: MixedDesign | PaperDesign) -> pd.DataFrame:
        """The tidy records (:data:`~kml.transference.analyzer.COLUMNS`) of ``checkpoint`` under ``design``."""
        from kml.training.checkpoint import checkpoint_step, load_learner

        learner, config, state = load_learner(checkpoint, self.device)
        step = checkpoint_step(state, checkpoint)
        learner.train()  # the training inner loop, as during meta-training
        if not parameter_names(learner, self.parameters):  # no lookahead step at all: every Z would be 0
            raise KMLError(
                f"{setting('parameters', self.parameters)}: this checkpoint ({config.learner.method}) has no such "
                f"meta-parameters, so every Z would be 0; use {setting('parameters', 'all')}"
            )
        rule = self.rule(learner, config, state)
        context = _Context(self, learner, config, state, rule, step)
        rows = context.paper(design) if isinstance(design, PaperDesign) else context.mixed(design)
        records = pd.DataFrame(rows)
        broken = int((~np.isfinite(records["Z"].to_numpy(dtype=float))).sum())
        if broken:  # before anything is written: a table of NaN would be kept, and the plots cannot be drawn
            raise KMLError(
                f"rate {rule.rate:g} makes {broken} of {len(records)} lookahead losses non-finite; "
                f"pass a smaller {setting('rate')} (the run's outer lr is {config.lr:g})"
            )
        return records

    def rule(self, learner: torch.nn.Module, config: Any, state: dict[str, Any]) -> Lookahead:
        """The lookahead of a checkpoint: its optimiser's next update, or SGD at the rate of that update."""
        saved = state.get("optimizer")
        if self.lookahead == "optimizer":
            if not saved:
                raise KMLError(
                    f"the checkpoint holds no optimizer state; use {setting('lookahead', 'sgd')} with a rate"
                )
            return optimizer_lookahead(saved, learner, self.rate)
        if self.rate is not None:
            return SGDLookahead(float(self.rate))
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        current = float(groups[0]["lr"]) if groups else float(config.lr)  # the schedule's rate at this step
        return SGDLookahead(current)

    def stores(self, modes: list[str], split: str, config: Any, state: dict[str, Any]) -> list:
        """The modes' image stores of ``split`` (loaded once per analyser), checked against the run's caches."""
        root = self.data_root or config.data_root
        key = (tuple(modes), split, str(root), config.image_size)
        if key not in self._stores:
            self._stores[key] = load_stores(
                modes, split, root, config.image_size, 3, self.device, progress=self.progress
            )
        check_run_caches(state.get("data"), self._stores[key])
        return self._stores[key]


class _Context:
    """One loaded checkpoint under analysis (its learner, config, lookahead and step)."""

    def __init__(self, owner: CheckpointAnalyser, learner, config, state, rule: Lookahead, step: int) -> None:
        self.owner, self.learner, self.config, self.state, self.rule, self.step = (
            owner,
            learner,
            config,
            state,
            rule,
            step,
        )
        learner_config = config.learner
        # Multi-MAML and per-mode inner rates/steps pick by the task's mode index: it must be the run's own index
        self.by_mode = (
            learner_config.multi_maml
            or learner_config.mode_inner_lr is not None
            or learner_config.mode_inner_steps is not None
        )

    def sampler(self, modes: list[str], split: str, tasks: int, seed: int) -> MixtureSampler:
        config = self.config
        if self.by_mode and set(modes) - set(config.modes):
            raise KMLError(
                f"this learner ({config.learner.method}, per-mode settings) only knows its training modes "
                f"{config.modes}; got {modes}"
            )
        stores = self.owner.stores(modes, split, config, self.state)
        rotate = [config.rotate_omniglot and s.mode in ROTATED_BY_DEFAULT for s in stores]
        return MixtureSampler(stores, config.ways, config.shots, config.queries, tasks, "mixed", None, rotate, seed)

    def run_indices(self, episode: Episode) -> Episode:
        """The episode with each task's mode as the run's index (a sampler of a subset counts from 0)."""
        if not self.by_mode:
            return episode
        modes = self.config.modes
        lookup = torch.tensor([modes.index(m) for m in episode.mode_names], device=episode.mode.device)
        return dataclasses.replace(episode, mode=lookup[episode.mode], mode_names=tuple(modes))

    def transference(self, sources: Episode, targets: Episode | None = None) -> Any:
        return task_transference(
            self.learner, sources, targets=targets, parameters=self.owner.parameters, lookahead=self.rule
        )

    def mixed(self, design: MixedDesign) -> list[dict]:
        from tqdm.auto import tqdm

        modes = expand_modes(design.modes) if design.modes else self.config.modes
        tasks = design.meta_batch if design.meta_batch is not None else self.config.meta_batch
        if tasks < 2:  # Z is defined for pairs of tasks of one meta-batch
            raise KMLError(
                f"the run's meta-batch has {tasks} task, so there are no task pairs; "
                f"pass {setting('meta_batch', 2)} or more"
            )
        sampler = self.sampler(modes, design.split, tasks, self.owner.seed)
        rows = []
        for batch in tqdm(
            range(design.batches), desc=f"step {self.step}: meta-batches", disable=not self.owner.progress
        ):
            rows += result_rows(self.transference(self.run_indices(sampler.sample())), self.step, batch)
        return rows

    def paper(self, design: PaperDesign) -> list[dict]:
        from tqdm.auto import tqdm

        seed = self.owner.seed
        source, target = canonical_mode(design.source_mode), canonical_mode(design.target_mode)
        sources = self.sampler([source], design.source_split, min(design.sources, SOURCE_CHUNK), seed)
        targets = self.run_indices(self.sampler([target], design.target_split, design.targets, seed + 1).sample())
        rows, drawn = [], 0
        with tqdm(total=design.sources, desc=f"step {self.step}: source tasks", disable=not self.owner.progress) as bar:
            while drawn < design.sources:
                batch = self.run_indices(sources.sample())
                batch = batch.select(slice(0, min(batch.num_tasks, design.sources - drawn)))
                for row in result_rows(self.transference(batch, targets), self.step):
                    row["task_i"] += drawn
                    row["batch"] = row["task_i"]  # each source task is a sampling unit (the targets are shared)
                    rows.append(row)
                drawn += batch.num_tasks
                bar.update(batch.num_tasks)
        return rows
