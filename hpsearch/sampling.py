"""Sampling that models each architecture's parameters on that architecture's trials only.

TPE splits the trials it has seen into a good few and the rest, then proposes points that look
like the good few. Over a whole study the good few are the leading architecture's trials, so
for a trailing architecture no good trial carries its parameters: TPE samples them from the
prior and, against its own trials (all "the rest"), steers away from the best of them. Its
search never narrows, and the report then describes it by a poor configuration.

``WithinArchitecture`` makes the choice of architecture one stage, sampled by the configured
sampler over the whole study, and everything else a second stage, sampled by a sampler of the
same kind that sees only the trial's architecture (``ArchitectureView``): each architecture's
parameters, and the shared training ones such as ``lr``, are modelled on its own trials.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from hpsearch import attrs
from hpsearch.config import StudyConfig
from hpsearch.exploration import designed, startup_trials
from hpsearch.optuna_private import forget_cached_trials
from hpsearch.samplers import build_sampler
from hpsearch.storage.views import ArchitectureStudies


class WithinArchitecture(BaseSampler):
    """Two stages: ``choose`` samples the architecture over the whole study; the sampler
    ``inner(architecture)`` builds samples the rest of a trial of that architecture over a view
    of the study that holds only that architecture's trials (jointly, where it models jointly).

    A trial whose architecture is fixed (queued with ``enqueue_trial``) skips the first stage.
    """

    def __init__(self, choose: BaseSampler, inner: Callable[[str], BaseSampler]) -> None:
        self.choose = choose
        self._build = inner
        self._inner: dict[str, BaseSampler] = {}
        self._views = ArchitectureStudies(sampler=self._sampler)
        # The joint sample of the trial being sampled: (trial number, architecture, params).
        self._joint: tuple[int, str, dict[str, Any]] | None = None

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial
                                    ) -> dict[str, BaseDistribution]:
        return {}  # the architecture is not known yet: every stage samples on first suggest

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        architecture = trial.params.get(attrs.ARCHITECTURE)
        if param_name == attrs.ARCHITECTURE or architecture is None:
            return self.choose.sample_independent(study, trial, param_name, param_distribution)
        architecture = str(architecture)
        joint = self._joint_sample(study, trial, architecture)
        if param_name in joint:
            return joint[param_name]
        # Not in the joint model (seen for the first time in this architecture): on its own.
        return self._sampler(architecture).sample_independent(
            self._views.get(study, architecture), trial, param_name, param_distribution)

    def _joint_sample(self, study: Study, trial: FrozenTrial, architecture: str
                      ) -> dict[str, Any]:
        """The inner sampler's joint sample for this trial, drawn on its first suggest after
        the architecture."""
        if self._joint is None or self._joint[:2] != (trial.number, architecture):
            sampler, view = self._sampler(architecture), self._views.get(study, architecture)
            forget_cached_trials(view)  # the study moved on since its last trial
            space = {name: dist for name, dist
                     in sampler.infer_relative_search_space(view, trial).items()
                     if name not in trial.params}
            params = sampler.sample_relative(view, trial, space) if space else {}
            self._joint = (trial.number, architecture, params)
        return self._joint[2]

    def _sampler(self, architecture: str) -> BaseSampler:
        if architecture not in self._inner:
            self._inner[architecture] = self._build(architecture)
        return self._inner[architecture]

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.choose.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.choose.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.choose.reseed_rng()
        for sampler in self._inner.values():
            sampler.reseed_rng()


# Samplers that model a trial's parameters from the trials they have seen (and so are misled
# by other architectures' trials); the others sample the same way in either stage.
MODELLING = ("tpe",)


def within_architecture(config: StudyConfig) -> bool:
    """Whether the study samples in two stages: ``study.sample_within_architecture``, a
    modelling sampler, and more than one architecture."""
    return (config.study.sample_within_architecture and config.study.sampler.name in MODELLING
            and len(config.model.architecture) > 1)


def build_study_sampler(config: StudyConfig, seed_offset: int = 0) -> BaseSampler:
    """The study's sampler: within each architecture (``study.sample_within_architecture``,
    for TPE with several architectures), its start-up being the exploration plan.

    The architecture stage starts modelling once the whole plan is done; each architecture's
    stage once that architecture's design points are (``exploration.designed``; Optuna's
    default without a plan). A study file's ``n_startup_trials`` sets both.
    """
    cfg = config.study.sampler
    archs = list(config.model.architecture)
    planned = startup_trials(config)
    whole = build_sampler(cfg, seed_offset, planned)
    if not within_architecture(config):
        return whole
    own = designed(config) if planned else 0

    def inner(architecture: str) -> BaseSampler:
        # Each architecture draws its own numbers, distinct from the other stage's.
        return build_sampler(cfg, seed_offset + 7919 * (1 + archs.index(architecture)), own)

    return WithinArchitecture(whole, inner)
