"""When training cannot go on: out of memory, or a non-finite loss. One line each, saying what to change.

For a kml-train run the remedy is a :class:`~kml.training.advice.ContinueRun` (resume with a smaller task chunk,
a smaller outer rate), which a command line words as its command; for a custom run, the Trainer's keywords. Each
is a :class:`~kml.training.advice.RunStopped`: the run folder it names stays, also when it stops before its first
step (any other failed start leaves no run folder: :meth:`~kml.training.trainer.Trainer.fit`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from kml.data.episode import Episode
from kml.errors import KMLError, setting
from kml.runtime import autocast
from kml.training.advice import ContinueRun, RunStopped, switch
from kml.training.checkpoint import load_checkpoint, save_checkpoint
from kml.training.settings import sampler_value

if TYPE_CHECKING:
    from kml.training.trainer import Trainer

__all__ = ["is_out_of_memory", "out_of_memory_as_one_line", "out_of_memory_error", "stop_on_non_finite"]


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's (a RuntimeError, not torch.OutOfMemoryError)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)
    )


def _memory_need(error: BaseException) -> str:
    """``GPU memory``, or ``CPU memory (could not allocate 341.3 GB)`` from the CPU allocator's message."""
    if isinstance(error, torch.OutOfMemoryError):
        return "GPU memory"
    found = re.search(r"allocate (\d+) bytes", str(error))
    return f"CPU memory (could not allocate {int(found[1]) / 1e9:.1f} GB)" if found else "CPU memory"


@contextmanager
def out_of_memory_as_one_line(doing: str, remedy: str) -> Iterator[None]:
    """A CPU or GPU out-of-memory error raised while ``doing`` becomes one line naming ``remedy``."""
    try:
        yield
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(error):
            raise
        raise KMLError(f"out of {_memory_need(error)} {doing}; {remedy}") from None


def out_of_memory_error(trainer: Trainer, error: BaseException, episode: Episode | None) -> KMLError:
    """Out of GPU memory (or CPU memory) drawing (``episode`` None) or training a meta-batch at the next step."""
    need, step = _memory_need(error), trainer.step + 1
    if episode is None:  # the sampler holds the whole meta-batch at once: task chunks cannot shrink it
        size = sampler_value(trainer.sampler, "meta_batch")
        return RunStopped(
            f"out of {need} drawing a meta-batch of {size} tasks at step {step}; start a new run with "
            f"a smaller {setting('meta_batch')} (another {setting('run_name')})"
        )
    chunk = max(1, (trainer.config.task_chunk or episode.num_tasks) // 2)
    if trainer.custom:
        return RunStopped(
            f"out of {need} at step {step} with a meta-batch of {episode.num_tasks} tasks; the same update in less "
            f"memory: Trainer(..., run_dir='{trainer.run_dir}', resume=True, task_chunk={chunk}) (or bf16=True)"
        )
    learner = trainer.config.learner
    packed_maml = learner.algorithm == "maml" and learner.backbone != "resnet12"  # activation checkpointing's case
    switches = f"MAML: add {switch('activation_checkpointing')}; or " if packed_maml else "or "
    return ContinueRun(
        f"out of {need} at step {step} with {setting('meta_batch', trainer.config.meta_batch)}; the same update in "
        f"less memory: ",
        trainer.run_dir,
        changes={"task_chunk": chunk},
        python=f"Trainer.resume('{trainer.run_dir}', {{'task_chunk': {chunk}}})",
        after=f" ({switches}{switch('bf16')})",
    )


def stop_on_non_finite(
    trainer: Trainer, what: str = "non-finite loss", step: int | None = None, episode: Episode | None = None
) -> KMLError:
    """Leave on disk parameters that are finite and from before the bad step; the error says what to change.

    The loss of step k is checked before step k's update, so finite parameters now are exactly those before
    it; non-finite ones come from an earlier update that overflowed, and then last.pt is left as it was.
    """
    last = trainer.checkpoint_dir / "last.pt"
    if trainer.parameters_finite():
        if trainer.dist.is_main:
            trainer.folder.metrics.sync()
            save_checkpoint(last, trainer.state())
        kept = f"saved the parameters from before it (step {trainer.step}) in {last}"
    elif trainer.dist.is_main and last.is_file():
        kept = (
            f"the parameters had already overflowed, so {last} keeps the last checkpoint "
            f"(step {load_checkpoint(last)['step']}), all finite"
        )
    else:
        kept = f"the parameters had already overflowed; {last} keeps the last checkpoint"
    return _non_finite_error(trainer, f"{what} at step {trainer.step + 1 if step is None else step}; {kept}", episode)


def _non_finite_error(trainer: Trainer, where: str, episode: Episode | None) -> KMLError:
    """What to change after ``where`` (a non-finite loss at step k, and which checkpoint holds finite parameters)."""
    if trainer.custom:
        return RunStopped(
            f"{where}; continue with a smaller learning rate: Trainer(..., run_dir='{trainer.run_dir}', resume=True), "
            f"then lower the rate in trainer.optimizer.param_groups (and a scheduler's base_lrs) before fit() "
            f"(or pass grad_clip=10)"
        )
    config = trainer.config
    if episode is not None and _inner_loop_diverged(trainer, episode):
        inner_lr = float(f"{config.learner.inner_lr / 10:g}")
        return RunStopped(
            f"{where}; the MAML inner loop diverged (the loss before adaptation is finite, after it is not), "
            f"which the outer {setting('lr')} cannot fix: start a new run (another {setting('run_name')}) with a "
            f"smaller inner rate, {setting('inner_lr', inner_lr)}, or add {setting('inner_grad_clip', 10)}"
        )
    lr = float(f"{config.lr / 10:g}")
    return ContinueRun(
        f"{where}; continue with a smaller outer learning rate: ",
        trainer.run_dir,
        changes={"lr": lr},
        python=f"Trainer.resume('{trainer.run_dir}', {{'lr': {lr}}})",
        after=f" (or add {setting('grad_clip', 10)}); a lower {setting('inner_lr')} needs a new run",
    )


def _inner_loop_diverged(trainer: Trainer, episode: Episode) -> bool:
    """True when a kml MAML learner's loss is finite before adaptation and not after: the inner rate's fault."""
    if trainer.config.learner.algorithm != "maml" or trainer.config.learner.meta_sgd:
        return False
    chunk = episode.select(slice(0, trainer.config.task_chunk or episode.num_tasks)).to_float()
    try:
        with autocast(trainer.device, trainer.config.bf16):
            before, after = trainer.learner(chunk, inner_steps=0).loss, trainer.learner(chunk).loss
    except RuntimeError:  # e.g. out of memory: no diagnosis, the general advice stands
        return False
    return bool(torch.isfinite(before)) and not bool(torch.isfinite(after))
