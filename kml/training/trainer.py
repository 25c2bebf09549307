"""The meta-training loop: sampler -> learner -> Adam, with logs, validation and checkpoints.

Everything a run writes lands in ``train_dir/<run>/``:
``config.json``, ``metrics.csv``, ``log.txt``, TensorBoard events (when
tensorboard is installed) and ``checkpoints/`` (``last.pt``, ``best.pt``,
``step_XXXXXX.pt``). A checkpoint holds model, optimiser, scheduler, sampler
RNG state, step and the running metric sums, so ``--resume`` continues with
exactly the batches and numbers an uninterrupted run would have produced.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import kml
from kml.algorithms import LearnerOutput, MetaLearner, build_learner
from kml.algorithms.chunking import accumulate_meta_gradient
from kml.data.episode import Episode
from kml.data.modes import ROTATED_BY_DEFAULT, expand_modes, load_stores
from kml.data.sampler import MixtureSampler
from kml.errors import KMLError
from kml.evaluation import average, evaluate
from kml.runtime import autocast, check_bf16
from kml.training.checkpoint import load_checkpoint, load_model_state, remove_stale_temp_files, save_checkpoint
from kml.training.distributed import DistInfo, barrier, resolve_device, sum_gradients, sum_tensor
from kml.training.run_config import RunConfig, build_scheduler
from kml.training.run_lock import RunLock
from kml.validation import check_run_combinations, check_run_name

Callback = Callable[["Trainer", int, Episode], None]


def default_run_name(config: RunConfig) -> str:
    learner = config.learner
    method = f"{'multi-' if learner.multi_maml else ''}{learner.algorithm}-{learner.modulation}"
    return f"{method}_{'-'.join(m.replace('folder:', '').replace('/', '_') for m in config.modes)}_{config.ways}w{config.shots}s"


def run_directory(config: RunConfig) -> Path:
    return Path(config.train_dir) / check_run_name(config.run_name or default_run_name(config))


def _existing_run(run_dir: Path, overwrite: bool) -> bool:
    """True when ``run_dir`` holds a run that ``overwrite`` will replace; a one-line error when it may not."""
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise KMLError(f"{run_dir} exists and is not a run folder (a file or a link); move it away or choose another --run-name")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return False
    if not overwrite:
        if (run_dir / "checkpoints" / "last.pt").is_file():
            raise KMLError(f"run {run_dir} already exists; pass --resume to continue it or --overwrite to delete it and start again")
        raise KMLError(
            f"run {run_dir} already exists but has no checkpoint to resume (it stopped before its first save); "
            f"add --overwrite to delete it and start again"
        )
    if not (run_dir / "config.json").is_file() and not (run_dir / "checkpoints").is_dir():
        raise KMLError(f"{run_dir} is not a kml run folder (no config.json); --overwrite deletes only runs: choose another --run-name")
    return True


def _discard(run_dir: Path) -> None:
    """Delete the run that ``--overwrite`` replaces: first renamed aside (one atomic step), then removed."""
    aside = run_dir.parent / f".{run_dir.name}.overwritten-{os.getpid()}"
    try:
        os.replace(run_dir, aside)
    except OSError as error:
        raise KMLError(f"cannot move the old run {run_dir} aside for --overwrite: {error.strerror or error}") from None
    shutil.rmtree(aside, ignore_errors=True)  # leftovers (a kill meanwhile) go at the next start


def _step_of(row: dict[str, str]) -> int | None:
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return None


def _resume_config(config_path: Path, last: Path) -> RunConfig:
    """The run's settings from config.json, or from last.pt when config.json is missing or corrupt."""
    try:
        return RunConfig.load(config_path)
    except KMLError as error:
        if not last.is_file():
            if not config_path.is_file():
                raise KMLError(f"cannot resume: {config_path} not found (is {config_path.parent} a kml run folder?)") from None
            raise KMLError(
                f"cannot resume: {error}; and there is no {last} to recover the settings from: start it again with "
                f"the same kml-train command, --overwrite instead of --resume"
            ) from None
        reason = error
    config = RunConfig.from_dict(load_checkpoint(last)["config"])
    config.save(config_path, {"versions": versions()})
    print(f"warning: {reason}; rewrote it from the settings saved in {last}", file=sys.stderr)
    return config


def versions() -> dict[str, str]:
    return {"kml": kml.__version__, "torch": torch.__version__, "cuda": str(torch.version.cuda)}


class Trainer:
    """One training run. Build it with :meth:`create` (new run) or :meth:`resume`."""

    def __init__(self, config: RunConfig, run_dir: Path, dist_info: DistInfo | None = None, progress: bool = True) -> None:
        self.dist = dist_info or DistInfo()
        self.device = resolve_device(config.device, self.dist)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise KMLError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
        if config.bf16:
            check_bf16(self.device)
        self.run_dir = run_dir
        self.checkpoint_dir = run_dir / "checkpoints"
        self.progress = progress and self.dist.is_main
        torch.manual_seed(config.seed)

        rotate = [config.rotate_omniglot and mode in ROTATED_BY_DEFAULT for mode in config.modes]
        train_stores = load_stores(config.modes, "train", config.data_root, config.image_size, 3, self.device)
        side = train_stores[0].image_shape[1]
        learner_config = dataclasses.replace(config.learner, image_size=side, in_channels=3)
        self.config = dataclasses.replace(config, image_size=side, learner=learner_config)
        self.val_stores = load_stores(config.modes, "val", config.data_root, side, 3, self.device)
        self.rotate = rotate
        self.sampler = MixtureSampler(
            train_stores, config.ways, config.shots, config.queries, config.meta_batch,
            config.policy, config.weights, rotate, config.seed, dtype=torch.uint8,
        )
        if config.meta_batch < self.dist.world_size:
            raise KMLError(
                f"--meta-batch {config.meta_batch} is smaller than the {self.dist.world_size} processes that share its tasks; "
                f"use --meta-batch {self.dist.world_size} or more"
            )
        self.learner: MetaLearner = build_learner(learner_config).to(self.device)
        self.learner.activation_checkpointing = config.activation_checkpointing
        self.parameters = [p for p in self.learner.parameters() if p.requires_grad]
        # torch.compile wraps the forward only; checkpoints keep the plain module's state_dict.
        self.forward = self.learner
        if config.compile:
            if learner_config.algorithm == "maml" and not learner_config.first_order:
                raise KMLError(
                    "--compile cannot run second-order MAML (torch.compile does not differentiate twice); "
                    "add --first-order or drop --compile"
                )
            self.forward = torch.compile(self.learner)
        self.optimizer = torch.optim.Adam(self.parameters, lr=config.lr)
        self.scheduler = build_scheduler(self.optimizer, config)  # per-recipe schedule (halved or constant)
        self.step = 0
        self.best_val = -math.inf
        self.callbacks: list[Callback] = []
        self._stop_signal: int | None = None  # the signal this process received
        self._stop_agreed = False  # under torchrun: some rank was signalled, as of the last step's all-reduce
        self._reset_window()
        self.lock: RunLock | None = None  # held by the main process from create/resume to the end of fit
        self.logger = self._make_logger()  # log.txt and TensorBoard open only when the run starts (_open_run_files)
        self.tensorboard = None

    # ------------------------------------------------------------ creation
    @classmethod
    def create(cls, config: RunConfig, overwrite: bool = False, dist_info: DistInfo | None = None, progress: bool = True) -> Trainer:
        """Start a new run. With ``overwrite`` an existing run of the same name is deleted, but only once the
        new one has been built (data loaded, learner made): a setting that fails leaves the old run intact."""
        config = config.resolved()
        check_run_combinations(config)
        run_dir = run_directory(config)
        info = dist_info or DistInfo()
        lock = RunLock(run_dir).acquire() if info.is_main else None
        try:
            replace = _existing_run(run_dir, overwrite)
            barrier(info)
            trainer = cls(config, run_dir, info, progress)
            trainer.lock = lock
            if info.is_main:
                if replace:
                    _discard(run_dir)
                trainer._open_run_files()
                trainer.config.save(run_dir / "config.json", {"versions": versions()})
                trainer.save("last.pt")  # step 0: a run killed before its first checkpoint can still --resume
            barrier(info)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        trainer.logger.info("new run %s: %s", run_dir, trainer.config.to_dict())
        return trainer

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict[str, Any] | None = None, dist_info: DistInfo | None = None, progress: bool = True) -> Trainer:
        """Continue the run in ``run_dir`` from ``checkpoints/last.pt``.

        ``overrides`` may change ``steps``, ``device``, ``data_root``, logging cadence and ``bf16`` (a
        device without native bf16 continues in float32: rounding differs, the method does not), and
        ``lr`` / ``grad_clip`` (to continue past a non-finite loss); any other change would make the
        continuation differ from the uninterrupted run and is refused.
        """
        run_dir = Path(run_dir)
        info = dist_info or DistInfo()
        lock = RunLock(run_dir).acquire() if info.is_main else None
        try:
            trainer = cls._resumed(run_dir, overrides or {}, info, progress)
            trainer.lock = lock
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        trainer.logger.info("resumed %s at step %d", run_dir, trainer.step)
        return trainer

    @classmethod
    def _resumed(cls, run_dir: Path, overrides: dict[str, Any], info: DistInfo, progress: bool) -> Trainer:
        last = run_dir / "checkpoints" / "last.pt"
        if not run_dir.is_dir():
            raise KMLError(f"cannot resume: there is no run folder {run_dir}; start the run by leaving out --resume")
        config = _resume_config(run_dir / "config.json", last)
        allowed = {"steps", "device", "data_root", "log_every", "val_every", "checkpoint_every", "val_episodes", "train_dir",
                   "run_name", "bf16", "task_chunk", "activation_checkpointing", "lr", "grad_clip"}
        changed = {}
        for key, value in overrides.items():
            current = getattr(config, key) if hasattr(config, key) else getattr(config.learner, key, None)
            if key == "modes":
                value = expand_modes(value)
            if value != current and key not in allowed:
                changed[key] = (current, value)
        if changed:
            diff = ", ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in changed.items())
            raise KMLError(f"cannot resume {run_dir} with different settings ({diff}); start a new run instead")
        config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in allowed})
        if config.run_name != run_dir.name or Path(config.train_dir) != run_dir.parent:
            config = dataclasses.replace(config, train_dir=str(run_dir.parent), run_name=run_dir.name)
        if not last.is_file():
            raise KMLError(
                f"cannot resume {run_dir}: it has no checkpoint (it stopped before its first save); "
                f"start it again: the same kml-train command with --overwrite instead of --resume"
            )
        trainer = cls(config, run_dir, info, progress)
        trainer.load_state(load_checkpoint(last, trainer.device))
        trainer._set_base_lr(config.lr)
        if info.is_main:
            trainer._open_run_files()
        trainer._truncate_metrics()
        return trainer

    def _set_base_lr(self, lr: float) -> None:
        """A learning rate changed on resume: the schedule continues from it (halvings already due included)."""
        if self.scheduler.base_lrs == [lr]:
            return
        self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]
        halvings = self.scheduler.last_epoch // self.scheduler.step_size
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.scheduler.gamma**halvings
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _open_run_files(self) -> None:
        """Create the run folder and open log.txt and TensorBoard; drop temp files a killed run left behind."""
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(self.run_dir / "log.txt")
        except OSError as error:
            raise KMLError(f"cannot write in run folder {self.run_dir}: {error.strerror or error}") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self.logger.addHandler(handler)
        if self.lock is not None and self.lock.stale_holder:
            self.logger.info("took over the lock of %s, which ended without releasing it", self.lock.stale_holder)
        for stale in [*remove_stale_temp_files(self.checkpoint_dir), *remove_stale_temp_files(self.run_dir)]:  # ours: we hold the lock
            self.logger.info("removed %s, left by a process killed while writing it", stale)
        for stale in self.run_dir.parent.glob(f".{self.run_dir.name}.overwritten-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tensorboard = self._make_tensorboard()

    def release(self) -> None:
        """Let go of the run folder (end of fit, or a trainer used without fit)."""
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "versions": versions(),
            "step": self.step,
            "best_val": self.best_val,
            "model": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "window": {k: v.cpu() for k, v in self.window.items()},
            "torch_rng": torch.get_rng_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        saved = RunConfig.from_dict(state["config"])
        if saved.learner != self.config.learner:
            ours, theirs = self.config.learner.to_dict(), saved.learner.to_dict()
            diff = ", ".join(f"{k}: checkpoint {theirs[k]!r} vs run {ours[k]!r}" for k in ours if ours[k] != theirs.get(k))
            raise KMLError(f"checkpoint is from another learner ({diff})")
        load_model_state(self.learner, state["model"], str(self.checkpoint_dir / "last.pt"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.best_val = float(state["best_val"])
        self.window = {k: v.to(self.device) for k, v in state["window"].items()}
        torch.set_rng_state(state["torch_rng"])

    def save(self, name: str = "last.pt") -> Path | None:
        if not self.dist.is_main:
            return None
        if not self._parameters_finite():  # a checkpoint on disk is always one that can be resumed
            self._stop_on_non_finite_loss("non-finite parameters", self.step)
        return save_checkpoint(self.checkpoint_dir / name, self.state())

    def _parameters_finite(self) -> bool:
        tensors = [t for t in self.learner.state_dict().values() if t.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True

    def _stop_on_non_finite_loss(self, what: str = "non-finite loss", step: int | None = None) -> None:
        """Leave on disk parameters that are finite and from before the bad step, and stop with what to change.

        The loss of step k is checked before step k's update, so finite parameters now are exactly those before
        it; non-finite ones come from an earlier update that overflowed, and then last.pt is left as it was.
        """
        last = self.checkpoint_dir / "last.pt"
        if self._parameters_finite():
            if self.dist.is_main:
                save_checkpoint(last, self.state())
            kept = f"saved the parameters from before it (step {self.step}) in {last}"
        elif self.dist.is_main and last.is_file():
            kept = (f"the parameters had already overflowed, so {last} keeps the last checkpoint "
                    f"(step {load_checkpoint(last)['step']}), all finite")
        else:
            kept = f"the parameters had already overflowed; {last} keeps the last checkpoint"
        run = f"--train-dir {self.run_dir.parent} --run-name {self.run_dir.name}"
        raise KMLError(
            f"{what} at step {self.step + 1 if step is None else step}; {kept}; continue with a smaller outer learning rate: "
            f"kml-train --resume {run} --lr {self.config.lr / 10:g} (or add --grad-clip 10); "
            f"a lower --inner-lr needs a new run"
        )

    # ------------------------------------------------------------ logging
    def _make_logger(self) -> logging.Logger:
        logger = logging.getLogger(f"kml.train.{id(self)}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        return logger

    def _make_tensorboard(self):
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        try:
            return SummaryWriter(str(self.run_dir / "tensorboard"))
        except (OSError, RuntimeError) as error:  # e.g. a full disk: train on, the CSV files hold the metrics
            self.logger.info("no TensorBoard events: %s", error)
            return None

    def _reset_window(self) -> None:
        modes = len(self.config.modes)
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        self.window = {"loss": zeros(1), "accuracy": zeros(modes), "tasks": zeros(modes), "steps": zeros(1)}

    def _metric_columns(self) -> list[str]:
        return ["step", "loss", "accuracy", *[f"accuracy_{m}" for m in self.config.modes], "lr", "time"]

    def _truncate_metrics(self) -> None:
        """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
        if not self.dist.is_main:
            return
        for name in ("metrics.csv", "validation.csv", "transference.csv"):
            path = self.run_dir / name
            if not path.is_file():
                continue
            text = path.read_text()
            if text and not text.endswith("\n"):  # a row cut by a kill: drop it (it is logged again)
                text = text[: text.rfind("\n") + 1]
            reader = csv.DictReader(text.splitlines())
            fields = reader.fieldnames or []
            rows = [row for row in reader if _step_of(row) is not None and _step_of(row) <= self.step]
            tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
            with tmp.open("w", newline="") as handle:  # written aside and renamed: a kill now loses no row
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)

    def _write_metrics(self, rows: list[dict[str, Any]]) -> None:
        path = self.run_dir / "metrics.csv"
        new = not path.is_file()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._metric_columns())
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def _log_window(self, started: float) -> dict[str, float]:
        window = {k: sum_tensor(v.clone(), self.dist) for k, v in self.window.items()}
        tasks = window["tasks"].clamp(min=1)
        per_mode = (window["accuracy"] / tasks).tolist()
        row = {
            "step": self.step,
            "loss": float(window["loss"] / window["steps"].clamp(min=1)),
            "accuracy": float(window["accuracy"].sum() / tasks.sum()),
            **{f"accuracy_{m}": a if n > 0 else "" for m, a, n in zip(self.config.modes, per_mode, window["tasks"].tolist())},
            "lr": self.scheduler.get_last_lr()[0],
            "time": round(time.time() - started, 3),
        }
        self._reset_window()
        if self.dist.is_main:
            self._write_metrics([row])
            if self.tensorboard:
                for key, value in row.items():
                    if key not in ("step", "time") and value != "":
                        self.tensorboard.add_scalar(f"train/{key}", value, self.step)
        return row

    # ------------------------------------------------------------ loop
    def _handle_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def _should_stop(self) -> bool:
        # Under torchrun all ranks must leave after the same step, or the others wait forever in the next all-reduce.
        return self._stop_agreed if self.dist.enabled else self._stop_signal is not None

    def validate(self) -> float:
        results = evaluate(
            self.learner, self.val_stores, self.config.ways, self.config.shots, self.config.queries,
            self.config.val_episodes, seed=self.config.seed, tasks_per_batch=self.config.meta_batch,
            rotate=self.rotate, bf16=self.config.bf16, progress=False,
        )
        mean = average(results)
        self.logger.info(
            "step %d validation: %s", self.step,
            ", ".join(f"{r.mode} {r.accuracy:.2f}±{r.ci95:.2f}" for r in [*results, mean]),
        )
        if self.tensorboard:
            for r in [*results, mean]:
                self.tensorboard.add_scalar(f"val/accuracy_{r.mode}", r.accuracy, self.step)
        with (self.run_dir / "validation.csv").open("a") as handle:
            if handle.tell() == 0:
                handle.write("step,mode,accuracy,ci95\n")
            for r in [*results, mean]:
                handle.write(f"{self.step},{r.mode},{r.accuracy:.4f},{r.ci95:.4f}\n")
        return mean.accuracy

    def train_step(self, episode: Episode) -> None:
        """One outer step on this rank's share of the meta-batch, ``task_chunk`` tasks at a time."""
        total_tasks = episode.num_tasks
        local = episode.select(slice(self.dist.rank, None, self.dist.world_size))

        def forward(chunk: Episode) -> LearnerOutput:
            with autocast(self.device, self.config.bf16):
                return self.forward(chunk)

        self.optimizer.zero_grad(set_to_none=False)
        # rank shares sum to the full mean; each chunk of the share is converted to float only when it runs
        output = accumulate_meta_gradient(forward, local, self.config.task_chunk, local.num_tasks / total_tasks,
                                          preprocess=Episode.to_float)
        global_loss = (output.loss * (local.num_tasks / total_tasks)).double()
        if self.dist.enabled:
            # The stop request travels with the loss: every rank learns in the same all-reduce that one was signalled.
            requested = torch.tensor(float(self._stop_signal is not None), dtype=torch.float64, device=global_loss.device)
            global_loss, requests = sum_tensor(torch.stack([global_loss, requested]), self.dist)
            if requests > 0:
                self._stop_agreed = True
        if not torch.isfinite(global_loss):
            self._stop_on_non_finite_loss()
        sum_gradients(self.parameters, self.dist)
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            modes = len(self.config.modes)
            self.window["loss"] += global_loss if self.dist.is_main else 0.0
            self.window["steps"] += 1.0 if self.dist.is_main else 0.0
            self.window["accuracy"] += torch.zeros(modes, dtype=torch.float64, device=self.device).index_add_(
                0, local.mode, output.task_accuracy.double()
            )
            self.window["tasks"] += torch.bincount(local.mode, minlength=modes).double()

    def fit(self) -> Path:
        """Train to ``config.steps`` (see :meth:`_fit`), then let go of the run folder's lock."""
        try:
            return self._fit()
        finally:
            self.release()

    def _fit(self) -> Path:
        """Train to ``config.steps``; on SIGINT/SIGTERM save ``last.pt`` and return early.

        Alone, a signal stops the run after the current step. Under torchrun the ranks learn of it in the
        next step's all-reduce, so all of them stop after that same step (the signalled one runs one more).
        """
        from tqdm.auto import tqdm

        config = self.config
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        started = time.time()
        bar = tqdm(total=config.steps, initial=self.step, desc="meta-train", disable=not self.progress, dynamic_ncols=True)
        self.learner.train()
        try:
            while self.step < config.steps and not self._should_stop():
                episode = self.sampler.sample()
                try:
                    self.train_step(episode)
                except torch.OutOfMemoryError:
                    chunk = max(1, (config.task_chunk or config.meta_batch) // 2)
                    raise KMLError(
                        f"out of GPU memory at step {self.step + 1} with --meta-batch {config.meta_batch}; the same update "
                        f"in less memory: kml-train --resume --train-dir {self.run_dir.parent} --run-name {self.run_dir.name} "
                        f"--task-chunk {chunk} (MAML: add --activation-checkpointing; or --bf16)"
                    ) from None
                self.step += 1
                bar.update(1)
                for callback in self.callbacks:
                    callback(self, self.step, episode)
                if self.step % config.log_every == 0:
                    row = self._log_window(started)
                    bar.set_postfix(
                        loss=f"{row['loss']:.3f}",
                        **{m[:8]: f"{row[f'accuracy_{m}']:.2f}" for m in config.modes if row[f"accuracy_{m}"] != ""},
                    )
                if self.step % config.val_every == 0 or self.step == config.steps:
                    if self.dist.is_main:
                        accuracy = self.validate()
                        if accuracy > self.best_val:
                            self.best_val = accuracy
                            self.save("best.pt")
                    barrier(self.dist)
                if self.step % config.checkpoint_every == 0:
                    self.save("last.pt")
                    self.save(f"step_{self.step:06d}.pt")
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        path = self.checkpoint_dir / "last.pt"
        self.save("last.pt")
        if self._stop_signal is not None:
            self.logger.info("stopped by signal %d at step %d; checkpoint %s", self._stop_signal, self.step, path)
        elif self._stop_agreed:
            self.logger.info("stopped at step %d because another rank was signalled; checkpoint %s", self.step, path)
        else:
            self.logger.info("finished at step %d", self.step)
        if self.tensorboard:
            self.tensorboard.flush()
        return path

    @property
    def interrupted(self) -> bool:
        return self._stop_signal is not None or self._stop_agreed
