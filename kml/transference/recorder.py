"""Recording transference during training, into ``train_dir/<run>/transference.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

from kml.data.sampler import MixtureSampler
from kml.files import continue_advice, write_failure
from kml.transference.analyzer import COLUMNS, result_rows, task_transference

__all__ = ["append_rows", "TransferenceRecorder"]


def append_rows(path: Path, rows: list[dict]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        if new:
            writer.writeheader()
        writer.writerows(rows)


class TransferenceRecorder:
    """A training callback: every ``every`` steps, Z for all task pairs of ``batches`` fresh meta-batches.

    The meta-batches come from a sampler of its own (seeded by the step), so recording
    never changes the training batches, and the lookahead rate is the current outer lr.
    """

    def __init__(self, sampler: MixtureSampler, path: Path, every: int, batches: int = 1, seed: int = 0) -> None:
        self.sampler, self.path, self.every, self.batches, self.seed = sampler, path, every, batches, seed

    @classmethod
    def from_trainer(cls, trainer) -> TransferenceRecorder:
        config = trainer.config
        sampler = MixtureSampler(
            [s.store for s in trainer.sampler.samplers],
            config.ways,
            config.shots,
            config.queries,
            config.meta_batch,
            config.policy,
            config.weights,
            trainer.rotate,
            config.seed,
            dtype=trainer.sampler.dtype,
        )
        return cls(
            sampler,
            trainer.run_dir / "transference.csv",
            config.transference_every,
            config.transference_batches,
            config.seed,
        )

    def __call__(self, trainer, step: int, episode) -> None:  # noqa: ARG002 - the training batch is not reused
        if step % self.every or not trainer.dist.is_main:
            return
        state = self.sampler.state_dict()
        self.sampler.generator.manual_seed(self.seed * 1_000_003 + step)
        self.sampler.plan_generator.manual_seed(self.seed * 1_000_003 + step + 1)
        rate = trainer.scheduler.get_last_lr()[0]
        rows = []
        for batch in range(self.batches):
            result = task_transference(trainer.learner, self.sampler.sample().to_float(), rate)
            rows += result_rows(result, step, batch)
        self.sampler.load_state_dict(state)
        try:
            append_rows(self.path, rows)
        except OSError as error:  # a full disk: the run's one-line error, not a traceback
            raise write_failure(self.path, error, continue_advice()) from None
