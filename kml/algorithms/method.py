"""What MAML and ProtoNet share: the model (one, or one per mode), its BatchNorm mode, the backend, and the
parameters each task uses."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from kml.algorithms.backends import BACKENDS, Execution, choose_execution
from kml.algorithms.functional import ModelCalls, Params, batch_norm_mode, check_batch_norm_mode
from kml.data.episode import Episode
from kml.errors import KMLError, setting

__all__ = ["MetaMethod", "rate_key"]


def rate_key(name: str) -> str:
    """Meta-SGD rate key of an adapted parameter's name (``ParameterDict`` keys cannot hold dots)."""
    return name.replace(".", "__")


def _qualified_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class MetaMethod(nn.Module):
    """A meta-learning method over one model (or one per mode), run by a backend.

    Attributes:
        models: the model, or one per mode (Multi-MAML); ``model`` is the first.
        batch_norm: ``"transductive"`` or ``"running"`` (:func:`kml.algorithms.functional.batch_norm_mode`).
        backend: ``"auto"``, ``"packed"`` or ``"vmap"`` (:mod:`kml.algorithms.backends`).
        config: the :class:`~kml.config.learner.LearnerConfig` the learner was built from, or ``None``.
    """

    method = ""

    def __init__(self, model: nn.Module | Sequence[nn.Module], batch_norm: str, backend: str) -> None:
        super().__init__()
        models = [model] if isinstance(model, nn.Module) else list(model)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise KMLError(f"{type(self).__name__} takes an nn.Module or a list of them (one per mode), got {model!r}")
        self.models = nn.ModuleList(models)
        for each in models:
            check_batch_norm_mode(each, batch_norm)
        if backend not in BACKENDS:
            raise KMLError(f"unknown {setting('backend')} {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.batch_norm = batch_norm
        self.backend = backend
        self.config: Any = None
        self._calls = ModelCalls(models[0])
        self.register_load_state_dict_pre_hook(_upgrade_state_dict)

    @property
    def model(self) -> nn.Module:
        """The model (the first mode's, with a parameter set per mode)."""
        return self.models[0]

    @property
    def num_modes(self) -> int:
        """Parameter sets: 1, or one per mode (Multi-MAML)."""
        return len(self.models)

    def network_names(self) -> list[str]:
        """Names, relative to a model, of the network's parameters (not an encoder's or generator's)."""
        return self._calls.network_names()

    def settings(self) -> dict[str, Any]:
        """The method, the model and their settings as plain values (a run's ``config.json`` records them)."""
        return {
            "method": self.method,
            "model": _qualified_name(self.model),
            "parameter_sets": self.num_modes,
            "batch_norm": self.batch_norm,
            "backend": self.backend,
        }

    @contextmanager
    def using_backend(self, backend: str) -> Iterator[MetaMethod]:
        """Temporarily run with ``backend`` (the numbers do not change)."""
        choose_execution(self.model, backend)  # refuses a backend this model cannot run
        previous, self.backend = self.backend, backend
        try:
            yield self
        finally:
            self.backend = previous

    @contextmanager
    def running(self) -> Iterator[Execution]:
        """The execution for this call, with every model's BatchNorm in the learner's mode."""
        execution = choose_execution(self.model, self.backend)
        with ExitStack() as modes:
            for model in self.models:
                modes.enter_context(batch_norm_mode(model, self.batch_norm))
            yield execution

    def float_episode(self, episode: Episode) -> Episode:
        """``episode`` with float images in the learner's dtype (uint8 images, as samplers give them for speed,
        are scaled to [0, 1]; a float episode of the learner's dtype passes unchanged)."""
        dtype = next(self.parameters()).dtype
        if episode.support_x.dtype == dtype and episode.query_x.dtype == dtype:
            return episode
        if episode.support_x.dtype != torch.uint8 and not episode.support_x.is_floating_point():
            raise KMLError(f"episode images must be uint8 or float, got {episode.support_x.dtype}")
        return episode.to_float(dtype) if episode.support_x.dtype == torch.uint8 else episode

    @staticmethod
    def check_classes(logits: torch.Tensor, ways: int) -> None:
        """A classifier's outputs ``[T, M, C]`` must be one per class of the episode (a 10-way head on 5-way
        episodes would train without a word, its 5 extra outputs taking probability)."""
        if logits.shape[-1] != ways:
            raise KMLError(
                f"the model gives {logits.shape[-1]} outputs for {ways}-way episodes; MAML needs one logit per class: "
                f"give it a {ways}-way head (or sample {logits.shape[-1]}-way episodes)"
            )

    def task_parameters(self, episode: Episode) -> tuple[Params, Params]:
        """``(shared, per_task)``: parameters named as in a model, the same for every task or stacked ``[T, ...]``
        by each task's mode (one parameter set per mode)."""
        params = dict(self.named_parameters())
        if self.num_modes == 1:
            return {name[len("models.0.") :]: p for name, p in params.items() if name.startswith("models.0.")}, {}
        names = [name for name, _ in self.model.named_parameters()]
        stacked = {name: torch.stack([params[f"models.{m}.{name}"] for m in range(self.num_modes)]) for name in names}
        return {}, {name: p[episode.mode] for name, p in stacked.items()}

    @staticmethod
    def unlabelled_episode(
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        mode: torch.Tensor | None,
        ways: int | None = None,
    ) -> Episode:
        """An episode for :meth:`predict`: queries without labels (zeros), classes ``0..N-1``."""
        tasks = support_x.shape[0]
        ways = int(support_y.max()) + 1 if ways is None else ways
        device = support_x.device
        return Episode(
            support_x=support_x,
            support_y=support_y,
            query_x=query_x,
            query_y=torch.zeros(query_x.shape[:2], dtype=torch.long, device=device),
            mode=torch.zeros(tasks, dtype=torch.long, device=device) if mode is None else mode,
            classes=torch.arange(ways, device=device).expand(tasks, ways),
            mode_names=(),
        )


def _upgrade_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Read parameters saved before 0.3: ``model.*`` (kml.MAML / kml.ProtoNet of one model) as ``models.0.*``,
    and Meta-SGD rates saved inside a task model (``models.{m}.inner_rates.*``) as ``inner_rates.{m}.*``."""
    del args
    generic = any(key.startswith(f"{prefix}model.") for key in state_dict)
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith("model."):
            state_dict[f"{prefix}models.0.{name[len('model.') :]}"] = state_dict.pop(key)
        elif name.startswith("models.") and ".inner_rates." in name:
            mode, rest = name[len("models.") :].split(".inner_rates.", 1)
            state_dict[f"{prefix}inner_rates.{mode}.{rest}"] = state_dict.pop(key)
    if not generic:
        return
    # kml.MAML / kml.ProtoNet dropped a model's BatchNorm statistics before 0.3, so none were saved: keep the module's.
    for name, value in module.state_dict().items():
        if prefix + name not in state_dict and name.rsplit(".", 1)[-1] in (
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ):
            state_dict[prefix + name] = value
