"""The meta-training loop: sampler -> learner -> optimiser, with validation, checkpoints and exact resume.

:class:`Trainer` composes any learner that returns a :class:`~kml.algorithms.contract.LearnerOutput`, any episode
sampler, any torch optimiser and (optionally) a learning-rate scheduler; its settings are a
:class:`~kml.config.run.RunConfig`'s (:mod:`kml.training.settings`). :mod:`kml.training.launch` builds the parts
from a RunConfig as ``kml-train`` does. A run writes into its folder (:mod:`kml.training.run_folder`); a checkpoint
holds model, optimiser, scheduler, sampler and RNG state, step and the running metric sums, so a resumed run
continues with exactly the batches and numbers an uninterrupted run would have produced.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from kml.algorithms.chunking import accumulate_meta_gradient
from kml.algorithms.contract import LearnerOutput
from kml.config.run import RunConfig
from kml.data.episode import Episode
from kml.data.modes import mode_label
from kml.data.store import ImageStore
from kml.errors import KMLError
from kml.runtime import autocast, check_bf16
from kml.training import recovery
from kml.training import settings as loop
from kml.training.advice import RunStopped
from kml.training.checkpoint import load_model_state, save_checkpoint
from kml.training.distributed import DistInfo, barrier, sum_gradients, sum_tensor
from kml.training.metrics_log import ACCURACY_UNIT, add_to_window, new_window, window_row
from kml.training.run_folder import (
    RunFolder,
    prune_step_checkpoints,
    remove_failed_start,
    take_run,
)
from kml.training.run_record import check_recorded, custom_record, qualified_name, versions
from kml.training.settings import Sampler
from kml.training.validation import validation_results

__all__ = ["Callback", "Sampler", "Trainer"]

Callback = Callable[["Trainer", int, Episode], None]


def _launch() -> ModuleType:
    """kml.training.launch, which builds trainers (imported when first asked for: it imports this module)."""
    from kml.training import launch

    return launch


class Trainer:
    """One training run: ``learner`` meta-trained on ``sampler``'s meta-batches by ``optimizer``.

    Args:
        learner: an ``nn.Module`` called as ``learner(episode)`` on a float :class:`~kml.data.episode.Episode`
            of T tasks (``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]``, ``query_x [T, N*Q, C, H, W]``,
            ``query_y [T, N*Q]``, ``mode [T]``), returning a :class:`~kml.algorithms.contract.LearnerOutput`:
            ``loss`` (scalar mean query loss), ``task_loss [T]`` (differentiable) and ``task_accuracy [T]`` in
            [0, 1]. Called as ``learner(episode, inner_steps=k)`` only where an inner-step count is asked for.
        sampler: draws the training meta-batches (see :class:`Sampler`); uint8 images are made float one task
            chunk at a time.
        optimizer: any torch optimiser over the learner's parameters.
        scheduler: a learning-rate scheduler stepped once per outer step; ``None`` keeps the optimiser's rate.
        run_dir: the run folder (see the module docstring); its parent holds the run's lock file.
        config: a ``kml-train`` :class:`~kml.config.run.RunConfig` to take the settings from (keywords override
            them). With the learner it describes (one whose ``config`` is ``config.learner``, as
            :func:`~kml.training.launch.build_trainer` builds it), checkpoints are ``kml-train``'s; with any other
            learner the run is a custom one. Without it, a RunConfig of the sampler's modes, N, K, Q, meta-batch.
        val_stores: meta-validation image stores, one per mode; without them there is no validation (no best.pt).
        device: where the learner runs (default: where its parameters are).
        dist_info: rank and world size under ``torchrun`` (default: a single process).
        progress: show a progress bar (in the main process).
        resume: continue the run in ``run_dir`` from ``checkpoints/last.pt`` (model, optimiser, scheduler, sampler
            and RNG state, step): the same batches and numbers as without the interruption. The parts must be
            built as for the interrupted run; settings not given here are the run's. ``None``: take no run folder
            now; :meth:`fit` starts a new run (:mod:`kml.training.launch` starts or continues one itself).
        overwrite: delete an existing run in ``run_dir`` and start again (without it an existing run is refused).
        **settings: the RunConfig fields the loop reads (:data:`~kml.training.settings.LOOP_SETTINGS`): ``steps``,
            ``log_every``, ``val_every``, ``val_episodes``, ``checkpoint_every``, ``keep_checkpoints`` (periodic
            checkpoints kept, the newest; default 3, ``None``: all), ``grad_clip``, ``task_chunk``,
            ``bf16``, ``compile``, ``activation_checkpointing``, ``seed``, ``ways``, ``shots``, ``queries`` and
            ``meta_batch`` (of validation), ``transference_every``, ``transference_batches``.

    Building a trainer takes the run folder (:mod:`kml.training.run_folder`: a lock, then a new run with a step-0
    ``last.pt``, or with ``resume`` the loaded one). :meth:`fit` trains and lets go of the lock. SIGINT and SIGTERM
    stop it after the current step with ``last.pt`` saved; a non-finite loss stops it with the last finite
    parameters saved. A start that fails leaves no run folder it made. Accuracies are in percent in every file.
    """

    def __init__(
        self,
        learner: nn.Module,
        sampler: Sampler,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        run_dir: str | os.PathLike,
        config: RunConfig | None = None,
        val_stores: Sequence[ImageStore] | None = None,
        device: str | torch.device | None = None,
        dist_info: DistInfo | None = None,
        progress: bool = True,
        resume: bool | None = False,
        overwrite: bool = False,
        **settings: Any,
    ) -> None:
        self.dist = dist_info or DistInfo()
        loop.check_parts(sampler, settings, self.dist.world_size)
        self.learner, self.sampler, self.optimizer, self.scheduler = learner, sampler, optimizer, scheduler
        if device is not None:  # episodes follow it in train_step
            learner.to(device)
        self.device = str(device) if device is not None else loop.device_of(learner)
        self.folder = RunFolder(run_dir, self.dist.is_main)  # not touched before the run is taken
        self.run_dir, self.checkpoint_dir, self.logger = self.folder.path, self.folder.checkpoints, self.folder.logger
        self.progress = progress and self.dist.is_main
        # None for the learner a kml-train config describes; else the custom learner's class, recorded in checkpoints
        described = config is not None and getattr(learner, "config", None) == config.learner
        self.learner_name: str | None = None if described else qualified_name(learner)
        self.val_stores = list(val_stores or [])
        self.config = config if config is not None else loop.parts_config(sampler, settings, bool(self.val_stores))
        self._given = set(settings)  # on resume, a custom run's own settings fill the others
        self._update_settings(**settings)
        self.rotation = loop.rotation_by_mode(sampler)  # mode name -> rotated (validation follows training)
        self.rotate = [self.rotation.get(name, False) for name in sampler.mode_names]  # per training mode
        self.parameters = [p for p in learner.parameters() if p.requires_grad]
        self.step, self.best_val = 0, -math.inf
        self.callbacks: list[Callback] = []
        self.data_identity: dict[str, Any] | None = None  # the caches' identity, checked on resume (kml-train's runs)
        self._stop_signal: int | None = None  # the signal this process received
        self._stop_agreed = False  # under torchrun: some rank was signalled, as of the last step's all-reduce
        self._recording = False  # transference_every's callback attached
        self._reset_window()
        self._taken = False  # the run folder is ours: started or resumed
        self._made_folder = False  # this trainer's start made the run folder: a failed start removes it
        self._resumed_from: Path | None = None  # the checkpoint resumed from: never deleted by keep_checkpoints
        self._fraction_rows = False  # the checkpoint resumed from predates percent accuracies in metrics.csv
        self.validation_line = ""  # the last validation's accuracies, as printed
        if resume is not None:
            take_run(self, resume, overwrite)

    def _update_settings(self, **values: Any) -> None:
        """Change settings (checked by RunConfig) and what follows from them."""
        self.config = dataclasses.replace(self.config, **values)
        if self.config.bf16:
            check_bf16(self.device)
        if "activation_checkpointing" in values and self.custom:  # a kml-train learner has it from its build
            loop.set_activation_checkpointing(self.learner, self.config.activation_checkpointing, self.learner_name)
        # torch.compile wraps the forward only; checkpoints keep the plain module's state_dict.
        if getattr(self, "forward", None) is None or (self.forward is not self.learner) != self.config.compile:
            self.forward = torch.compile(self.learner) if self.config.compile else self.learner

    # ------------------------------------------------------------ kml-train's constructors (kml.training.launch)
    @classmethod
    def from_config(cls, config: RunConfig, *args: Any, **kwargs: Any) -> Trainer:
        """:func:`kml.training.launch.build_trainer`: the parts ``kml-train`` builds for ``config``."""
        return _launch().build_trainer(config, *args, **kwargs)

    @classmethod
    def create(cls, config: RunConfig, *args: Any, **kwargs: Any) -> Trainer:
        """:func:`kml.training.launch.create_run`: a new ``kml-train`` run (``overwrite`` replaces an old one)."""
        return _launch().create_run(config, *args, **kwargs)

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> Trainer:
        """:func:`kml.training.launch.resume_run`: continue the ``kml-train`` run in ``run_dir``."""
        return _launch().resume_run(run_dir, *args, **kwargs)

    # ------------------------------------------------------------ the run folder
    @property
    def custom(self) -> bool:
        """True when the learner is not one a kml-train config describes (see ``learner_name``)."""
        return self.learner_name is not None

    @property
    def tensorboard(self) -> Any:
        """The run's TensorBoard writer (``None`` before the run is taken, without tensorboard, or off rank 0)."""
        return self.folder.metrics.tensorboard

    def release(self) -> None:
        """Let go of the run folder (end of fit, or a trainer used without fit)."""
        self.folder.release()

    # ------------------------------------------------------------ state
    def record(self) -> dict[str, Any]:
        """What config.json and a checkpoint's ``config`` hold: the kml-train run config, or a custom run's record."""
        if self.custom:
            return custom_record(self.learner, self.learner_name, self.config)
        return self.config.to_dict()

    def state(self) -> dict[str, Any]:
        return {
            "config": self.record(),
            "versions": versions(),
            "step": self.step,
            "best_val": self.best_val,
            "model": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sampler": self.sampler.state_dict(),
            "window": {k: v.cpu() for k, v in self.window.items()},
            "torch_rng": torch.get_rng_state(),
            # a custom learner may draw random numbers on the GPU (dropout): its generators resume too
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "data": self.data_identity,  # None for a custom learner's sampler
            "accuracy_unit": ACCURACY_UNIT,  # of the CSV rows it counts (a checkpoint of kml < 0.3: fractions)
        }

    def load_state(self, state: dict[str, Any], source: str | os.PathLike | None = None) -> None:
        """Continue from ``state``, a checkpoint's contents (``source`` names its file in messages)."""
        source = str(source or self.checkpoint_dir / "last.pt")
        recorded = check_recorded(self, state, source)
        if self.custom:  # the run's own settings, but those given now
            self._update_settings(**{**recorded, **{name: getattr(self.config, name) for name in self._given}})
        if (state["scheduler"] is None) != (self.scheduler is None):
            had = "no scheduler" if state["scheduler"] is None else "a scheduler"
            raise KMLError(f"checkpoint {source} was trained with {had}; resume it with {had} too (or start a new run)")
        load_model_state(self.learner, state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.best_val = int(state["step"]), float(state["best_val"])
        self._fraction_rows = state.get("accuracy_unit") != ACCURACY_UNIT
        self._resumed_from = Path(source)
        self.window = {k: v.to(self.device) for k, v in state["window"].items()}
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save(self, name: str = "last.pt") -> Path | None:
        if not self.dist.is_main:
            return None
        if not self.parameters_finite():  # a checkpoint on disk is always one that can be resumed
            raise recovery.stop_on_non_finite(self, "non-finite parameters", self.step)
        self.folder.metrics.sync()
        return save_checkpoint(self.checkpoint_dir / name, self.state())

    def prune_checkpoints(self) -> list[Path]:
        """Delete the periodic checkpoints beyond the ``keep_checkpoints`` newest (:func:`prune_step_checkpoints`)."""
        keep = self.config.keep_checkpoints
        if keep is None or not self.dist.is_main:
            return []
        return prune_step_checkpoints(self.checkpoint_dir, keep, self.step, self._resumed_from, self.logger)

    def parameters_finite(self) -> bool:
        tensors = [t for t in self.learner.state_dict().values() if t.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True

    # ------------------------------------------------------------ metrics
    def _reset_window(self) -> None:
        self.window = new_window(len(self.mode_names), self.device)

    @property
    def mode_names(self) -> list[str]:
        return list(self.config.modes)

    @property
    def learning_rate(self) -> float:
        """The rate of the next update (of the optimiser's first parameter group)."""
        return self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.optimizer.param_groups[0]["lr"]

    def _log_window(self, started: float) -> dict[str, Any]:
        """The metrics.csv row of the steps since the last one (summed over ranks), written by the main process."""
        window = {k: sum_tensor(v.clone(), self.dist) for k, v in self.window.items()}
        row = window_row(window, self.step, self.mode_names, self.learning_rate, time.time() - started)
        self._reset_window()
        if self.dist.is_main:
            self.folder.metrics.training_row(row)
        return row

    def validate(self) -> float:
        """Mean accuracy (percent) over the validation stores' fixed episodes; logged to validation.csv and log.txt
        (:meth:`fit` prints it too)."""
        every = validation_results(self)
        self.validation_line = f"step {self.step} validation: " + ", ".join(
            f"{mode_label(r.mode)} {r.accuracy:.2f}±{r.ci95:.2f}" for r in every
        )
        self.logger.info("%s", self.validation_line)
        self.folder.metrics.validation_rows(self.step, every)
        return every[-1].accuracy

    # ------------------------------------------------------------ the loop
    def train_step(self, episode: Episode) -> None:
        """One outer step on this rank's share of the meta-batch, ``task_chunk`` tasks at a time."""
        total_tasks = episode.num_tasks
        local = episode.select(slice(self.dist.rank, None, self.dist.world_size)).to(self.device)  # no copy if there

        def forward(chunk: Episode) -> LearnerOutput:
            with autocast(self.device, self.config.bf16):
                return self.forward(chunk)

        self.optimizer.zero_grad(set_to_none=False)
        # rank shares sum to the full mean; each chunk of the share is converted to float only when it runs
        share = local.num_tasks / total_tasks
        output = accumulate_meta_gradient(forward, local, self.config.task_chunk, share, preprocess=Episode.to_float)
        global_loss = (output.loss * share).double()
        if self.dist.enabled:
            # The stop request travels with the loss: every rank learns in the same all-reduce that one was signalled.
            requested = torch.tensor(
                float(self._stop_signal is not None), dtype=torch.float64, device=global_loss.device
            )
            global_loss, requests = sum_tensor(torch.stack([global_loss, requested]), self.dist)
            self._stop_agreed = self._stop_agreed or bool(requests > 0)
        if not torch.isfinite(global_loss):
            raise recovery.stop_on_non_finite(self, episode=local)
        sum_gradients(self.parameters, self.dist)
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        add_to_window(self.window, global_loss, local.mode, output.task_accuracy, counts_loss=self.dist.is_main)

    def fit(self, steps: int | None = None) -> Path:
        """Train until outer step ``steps`` (default: the ``steps`` setting), counted from the start of the run,
        so a resumed run ends where the uninterrupted one would; then let go of the run folder's lock.

        Returns the path of ``last.pt``. A trainer from :func:`~kml.training.launch.build_trainer` starts its run
        here (a new one).
        """
        if steps is not None:
            self._update_settings(steps=steps)
        if self.config.steps is None:
            raise KMLError("how many steps? pass fit(steps) or the setting steps=N")
        self._stop_signal, self._stop_agreed = None, False  # a fit after an interrupted one continues
        if not self._taken:
            take_run(self, resume=False, overwrite=False)
        else:  # a second fit (e.g. further): the run is ours again
            self.folder.acquire()
        try:
            if self.config.transference_every and not self._recording:  # transference.csv as it trains (once)
                self.callbacks.append(loop.transference_callback(self))
                self._recording = True
            return self._fit()
        except Exception as error:
            # a start that failed before its first step leaves no folder, but for an error that names the run's files
            if self.step == 0 and not isinstance(error, RunStopped):
                remove_failed_start(self)
            raise
        finally:
            self.release()

    def _handle_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def request_stop(self, signum: int) -> None:
        """Stop after the current step with ``last.pt`` saved, as SIGINT and SIGTERM do: for a signal the trainer
        does not catch itself (a scheduler's preemption signal, caught by the job that runs :meth:`fit`)."""
        self._handle_signal(signum, None)

    def _should_stop(self) -> bool:
        # Under torchrun all ranks must leave after the same step, or the others wait forever in the next all-reduce.
        return self._stop_agreed if self.dist.enabled else self._stop_signal is not None

    @property
    def interrupted(self) -> bool:
        return self._stop_signal is not None or self._stop_agreed

    def _fit(self) -> Path:
        """Train to the ``steps`` setting; on SIGINT/SIGTERM save ``last.pt`` and return early.

        Alone, a signal stops the run after the current step. Under torchrun the ranks learn of it in the
        next step's all-reduce, so all of them stop after that same step (the signalled one runs one more).
        """
        from tqdm.auto import tqdm

        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        started = time.time()
        bar = tqdm(
            total=self.config.steps, initial=self.step, desc="meta-train", disable=not self.progress, dynamic_ncols=True
        )
        self.learner.train()
        try:
            while self.step < self.config.steps and not self._should_stop():
                episode = self._next_step()
                bar.update(1)
                for callback in self.callbacks:
                    callback(self, self.step, episode)
                self._on_cadence(started, bar)
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        path = self.checkpoint_dir / "last.pt"
        self.save("last.pt")
        if self.dist.is_main and self.config.transference_every:  # after the save: a plot cannot lose the checkpoint
            from kml.transference.outputs import write_transference_outputs

            write_transference_outputs(self.run_dir, warn=self.logger.warning)
        if self._stop_signal is not None:
            self.logger.info("stopped by signal %d at step %d; checkpoint %s", self._stop_signal, self.step, path)
        elif self._stop_agreed:
            self.logger.info("stopped at step %d because another rank was signalled; checkpoint %s", self.step, path)
        else:
            self.logger.info("finished at step %d", self.step)
        self.folder.metrics.flush()
        return path

    def _next_step(self) -> Episode:
        """Draw a meta-batch and train on it; out of memory is one line saying what to change."""
        episode = None
        try:
            episode = self.sampler.sample()
            if self.config.released_checkpoint and self.step == self.config.steps - 1:
                # the released codes save before each update, so their final checkpoint lacks the last one
                self.logger.info("released_checkpoint: step %d's update is not applied", self.step + 1)
            else:
                self.train_step(episode)
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not recovery.is_out_of_memory(error):
                raise
            raise recovery.out_of_memory_error(self, error, episode) from None
        self.step += 1
        return episode

    def _on_cadence(self, started: float, bar: Any) -> None:
        """What falls due after a step: a metrics row, validation (best.pt), checkpoints."""
        config = self.config
        if self.step % config.log_every == 0:
            row = self._log_window(started)
            shown = {
                mode_label(m)[:8]: f"{row[f'accuracy_{m}']:.1f}%" for m in self.mode_names if row[f"accuracy_{m}"] != ""
            }
            bar.set_postfix(loss=f"{row['loss']:.3f}", **shown)
        if self.val_stores and (self.step % config.val_every == 0 or self.step == config.steps):
            if self.dist.is_main:
                accuracy = self.validate()
                best = accuracy > self.best_val and not config.released_checkpoint  # released: no best model
                if best:
                    self.best_val = accuracy
                    self.save("best.pt")
                line = self.validation_line + (" (best so far: best.pt)" if best else "")
                if self.progress:
                    bar.write(line)  # above the progress bar
                else:
                    print(line, flush=True)
            barrier(self.dist)
        if self.step % config.checkpoint_every == 0:
            self.save("last.pt")
            if config.keep_checkpoints != 0:
                self.save(f"step_{self.step:06d}.pt")
            self.prune_checkpoints()
