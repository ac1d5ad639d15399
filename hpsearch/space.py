"""The search space: the only place that calls ``trial.suggest_*``.

The architecture is the categorical Optuna parameter ``architecture``; each architecture's own
parameters are suggested only when it is chosen (a conditional space). Literal values in the
study file are recorded but not suggested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna

from hpsearch.config import (
    SEARCHABLE_TRAIN_KEYS,
    CategoricalDist,
    FloatDist,
    IntDist,
    StudyConfig,
)


@dataclass(frozen=True)
class TrialParams:
    """Everything one trial needs to know about its sampled point."""

    architecture: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """All values, as the study file names them (the architecture included)."""
        return {"architecture": self.architecture, **self.model, **self.train}


def _suggest(trial: optuna.trial.BaseTrial, name: str, value: Any) -> Any:
    if isinstance(value, FloatDist):
        return trial.suggest_float(name, value.low, value.high, log=value.log, step=value.step)
    if isinstance(value, IntDist):
        return trial.suggest_int(name, value.low, value.high, log=value.log, step=value.step)
    if isinstance(value, CategoricalDist):
        return trial.suggest_categorical(name, value.choices)
    return value


def sample(trial: optuna.trial.BaseTrial, config: StudyConfig) -> TrialParams:
    """Sample (or read back, for enqueued and fixed trials) one point of the space."""
    archs = list(config.model.architecture)
    # A single architecture is still recorded as a parameter so reports can group by it.
    architecture = trial.suggest_categorical("architecture", archs)
    spec = config.model.architecture[architecture]
    model = {name: _suggest(trial, name, v) for name, v in spec.params.items()}
    train = {key: _suggest(trial, key, getattr(config.train, key)) for key in SEARCHABLE_TRAIN_KEYS}
    return TrialParams(architecture=architecture, model=model, train=train)


def from_params(params: dict[str, Any], config: StudyConfig) -> TrialParams:
    """Rebuild a trial's parameters from a flat dict (e.g. ``FrozenTrial.params``)."""
    fixed = optuna.trial.FixedTrial(params)
    return sample(fixed, config)
