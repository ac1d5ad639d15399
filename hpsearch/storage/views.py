"""Read-through views of an Optuna storage: everything goes to the wrapped storage unchanged,
writes included, except what a subclass overrides (usually how trials read)."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import optuna
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from hpsearch import attrs
from hpsearch.optuna_private import storage_of


class StorageView(BaseStorage):
    """Delegates every storage call to ``inner``; subclasses override what they change."""

    def __init__(self, inner: BaseStorage) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _delegate(name: str) -> Any:
    def method(self: StorageView, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._inner, name)(*args, **kwargs)

    method.__name__ = name
    return method


# Per-trial getters (user and system attrs, params) keep BaseStorage's versions, which read
# through get_trial, so a subclass that changes get_trial changes them too.
for _name in sorted(BaseStorage.__abstractmethods__ | {"get_n_trials", "remove_session",
                                                       "check_trial_is_updatable",
                                                       "get_trial_id_from_study_id_trial_number",
                                                       "get_trial_number_from_id"}):
    if _name not in vars(StorageView):
        setattr(StorageView, _name, _delegate(_name))
abc.update_abstractmethods(StorageView)


class ArchitectureView(StorageView):
    """The study as if it held only the trials of one architecture."""

    def __init__(self, inner: BaseStorage, architecture: str) -> None:
        super().__init__(inner)
        self.architecture = architecture

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Any = None) -> list[FrozenTrial]:
        trials = self._inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        return [t for t in trials if t.params.get(attrs.ARCHITECTURE) == self.architecture]


class ArchitectureStudies:
    """Study objects that each see one architecture of a study (``ArchitectureView``), built
    on first use and kept, per study and architecture (the study is kept too, so its id
    cannot be reused)."""

    def __init__(self, sampler: Callable[[str], BaseSampler] | None = None,
                 pruner: BasePruner | None = None) -> None:
        self._sampler, self._pruner = sampler, pruner
        self._studies: dict[tuple[int, str], tuple[optuna.Study, optuna.Study]] = {}

    def get(self, study: optuna.Study, architecture: str) -> optuna.Study:
        """``study`` as if it held only ``architecture``'s trials; its sampler is
        ``sampler(architecture)`` and its pruner ``pruner`` (the study's own where not given)."""
        key = (id(study), architecture)
        if key not in self._studies:
            view = optuna.Study(
                study_name=study.study_name,
                storage=ArchitectureView(storage_of(study), architecture),
                sampler=self._sampler(architecture) if self._sampler else study.sampler,
                pruner=self._pruner or study.pruner,
            )
            self._studies[key] = (study, view)
        return self._studies[key][1]
