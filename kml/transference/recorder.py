"""Recording transference during training, into ``train_dir/<run>/transference.csv``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from kml.data.sampler import MixtureSampler
from kml.errors import KMLError
from kml.files import continue_advice, write_failure
from kml.transference.analyzer import COLUMNS, result_rows, task_transference
from kml.transference.lookahead import optimizer_lookahead

__all__ = ["TransferenceRecorder", "append_rows", "header_of"]


def header_of(path: Path) -> list[str] | None:
    """The columns of an existing CSV file (None when it is missing or empty)."""
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        return next(csv.reader(handle), None)


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` under the file's own header (a table begun before the diagnostics keeps its columns)."""
    header = header_of(path)
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header or list(COLUMNS), extrasaction="ignore")
        if header is None:
            writer.writeheader()
        writer.writerows(rows)


class TransferenceRecorder:
    """A training callback: every ``every`` steps, Z for all task pairs of ``batches`` fresh meta-batches.

    The meta-batches come from a sampler of its own (seeded by the step), so recording never changes the
    training batches, and two runs with one seed record the same episodes (a paired comparison). The lookahead
    is the training optimiser's next update from its state (``lookahead="optimizer"``; Adam, AdamW or SGD, else
    plain SGD) or ``"sgd"`` at the current outer rate. A table begun without the lookahead column (an older
    run, resumed) continues with the SGD lookahead its rows were recorded with.
    """

    def __init__(
        self,
        sampler: MixtureSampler,
        path: Path,
        every: int,
        batches: int = 1,
        seed: int = 0,
        lookahead: str = "optimizer",
    ) -> None:
        if lookahead not in ("optimizer", "sgd"):
            raise KMLError(f"unknown lookahead {lookahead!r}; choose optimizer or sgd")
        self.sampler, self.path, self.every, self.batches, self.seed = sampler, path, every, batches, seed
        self.lookahead = lookahead

    @classmethod
    def from_trainer(cls, trainer: Any, lookahead: str = "optimizer") -> TransferenceRecorder:
        config = trainer.config
        # the training sampler's draws from the start (its quirks included), without advancing the trainer's
        sampler = trainer.sampler.restarted()
        return cls(
            sampler,
            trainer.run_dir / "transference.csv",
            config.transference_every,
            config.transference_batches,
            config.seed,
            lookahead,
        )

    def _rule(self, trainer: Any) -> Any:
        """The lookahead of this record: the optimiser's update, or SGD at the current outer rate."""
        rate = trainer.optimizer.param_groups[0]["lr"]  # the next update's rate (the scheduler has stepped)
        header = header_of(self.path)
        if self.lookahead == "sgd" or (header is not None and "lookahead" not in header):
            return "sgd", rate
        try:
            return optimizer_lookahead(trainer.optimizer, trainer.learner), None
        except KMLError:  # an optimiser the lookahead does not model (say RMSprop): the plain step, recorded as sgd
            return "sgd", rate

    def __call__(self, trainer: Any, step: int, episode: Any) -> None:  # noqa: ARG002 - the batch is not reused
        if step % self.every or not trainer.dist.is_main:
            return
        state = self.sampler.state_dict()
        self.sampler.generator.manual_seed(self.seed * 1_000_003 + step)
        self.sampler.plan_generator.manual_seed(self.seed * 1_000_003 + step + 1)
        lookahead, rate = self._rule(trainer)
        rows = []
        for batch in range(self.batches):
            result = task_transference(trainer.learner, self.sampler.sample().to_float(), rate, lookahead=lookahead)
            rows += result_rows(result, step, batch)
        self.sampler.load_state_dict(state)
        try:
            append_rows(self.path, rows)
        except OSError as error:  # a full disk: the run's one-line error, not a traceback
            raise write_failure(self.path, error, continue_advice()) from None
