"""Pruning that compares a trial only with trials of its own architecture.

Multi-fidelity pruning judges every trial at a step against the others at that step, which
starves slow starters: a GRU sits at chance for its first epochs while a CNN climbs at once,
so "compared with everything" means "GRUs are pruned". ``WithinArchitecture`` hands the
configured pruner (median, percentile, successive halving, hyperband, ...) a view of the study
that holds only the trial's own architecture, and lets a trial run unpruned until its
architecture has enough finished trials of its own to compare with.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch import attrs
from hpsearch.config import StudyConfig
from hpsearch.samplers import build_pruner
from hpsearch.storage.views import ArchitectureStudies

# Pruners that judge a trial by a fixed bound, not by other trials: no peers needed.
PEERLESS = ("threshold", "none")


class WithinArchitecture(optuna.pruners.BasePruner):
    """Wraps ``inner``: it sees only the trial's architecture, and only once that
    architecture has ``min_peers`` finished (complete or pruned) trials."""

    def __init__(self, inner: optuna.pruners.BasePruner, min_peers: int) -> None:
        self.inner, self.min_peers = inner, min_peers
        self._views = ArchitectureStudies(pruner=inner)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        architecture = trial.params.get(attrs.ARCHITECTURE)
        if architecture is None:
            return self.inner.prune(study, trial)
        view = self._views.get(study, str(architecture))
        finished = view.get_trials(deepcopy=False,
                                   states=(TrialState.COMPLETE, TrialState.PRUNED))
        if len(finished) < self.min_peers:
            return False
        return self.inner.prune(view, trial)


def build_study_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    """The study's pruner: the configured one, within each architecture unless the study
    file says ``study.prune_within_architecture: false`` (or there is one architecture).

    Within an architecture, ``min_trials_to_prune`` is the start-up: a median or percentile
    pruner does not wait for its own ``n_startup_trials`` (Optuna's 5) on top of it unless the
    study file sets it, or an architecture's first five trials, most of a small study's,
    could never be pruned.
    """
    study = config.study
    if (not study.prune_within_architecture or len(config.model.architecture) < 2
            or study.pruner.name in PEERLESS):
        return build_pruner(study.pruner)
    return WithinArchitecture(build_pruner(study.pruner, startup_trials=0),
                              min_peers=study.min_trials_to_prune)
