"""The search space: the only place that calls ``trial.suggest_*``.

The architecture is the categorical Optuna parameter ``architecture``; each architecture's own
parameters are suggested only when it is chosen (a conditional space), under a name qualified
by the architecture (``gru.hidden``), so two architectures that both call a parameter
``hidden`` never share one distribution in the sampler. Training parameters (``lr``,
``batch_size``, ...) are shared by every architecture and keep their names. Model factories
receive bare names. Literal values in the study file are recorded but not suggested. The
``train.loss`` arguments that are searched are the Optuna parameters ``loss.<argument>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna

from hpsearch.attrs import ARCHITECTURE
from hpsearch.config import (
    LOSS_PARAM_PREFIX,
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
    loss: dict[str, Any] = field(default_factory=dict)
    """The ``train.loss`` arguments (searched ones sampled), by argument name."""

    def flat(self) -> dict[str, Any]:
        """All values, as the study file names them (the architecture included; the loss
        arguments as ``loss.<argument>``)."""
        loss = {LOSS_PARAM_PREFIX + k: v for k, v in self.loss.items()}
        return {"architecture": self.architecture, **self.model, **self.train, **loss}


def _suggest(trial: optuna.trial.BaseTrial, name: str, value: Any) -> Any:
    if isinstance(value, FloatDist):
        return trial.suggest_float(name, value.low, value.high, log=value.log, step=value.step)
    if isinstance(value, IntDist):
        return trial.suggest_int(name, value.low, value.high, log=value.log, step=value.step)
    if isinstance(value, CategoricalDist):
        return trial.suggest_categorical(name, value.choices)
    return value


def optuna_name(architecture: str, key: str) -> str:
    """The Optuna parameter name of an architecture's own parameter."""
    return f"{architecture}.{key}"


def sample(trial: optuna.trial.BaseTrial, config: StudyConfig) -> TrialParams:
    """Sample (or read back, for enqueued and fixed trials) one point of the space."""
    archs = list(config.model.architecture)
    # A single architecture is still recorded as a parameter so reports can group by it.
    architecture = trial.suggest_categorical(ARCHITECTURE, archs)
    spec = config.model.architecture[architecture]
    model = {key: _suggest(trial, optuna_name(architecture, key), v)
             for key, v in spec.params.items()}
    train = {key: _suggest(trial, key, getattr(config.train, key)) for key in SEARCHABLE_TRAIN_KEYS}
    arguments = config.train.loss.arguments if config.train.loss is not None else {}
    loss = {key: _suggest(trial, LOSS_PARAM_PREFIX + key, v) for key, v in arguments.items()}
    return TrialParams(architecture=architecture, model=model, train=train, loss=loss)


def to_optuna_names(params: dict[str, Any], config: StudyConfig) -> dict[str, Any]:
    """Study-file names (``{architecture: gru, hidden: 32, lr: 0.01}``) -> Optuna names
    (``gru.hidden``). Already qualified names pass through; so do unknown ones."""
    architecture = params.get(ARCHITECTURE)
    if architecture is None and len(config.model.architecture) == 1:
        architecture = next(iter(config.model.architecture))
    own = config.model.architecture[architecture].params if architecture in \
        config.model.architecture else {}
    return {optuna_name(architecture, k) if k in own else k: v for k, v in params.items()}


def from_params(params: dict[str, Any], config: StudyConfig) -> TrialParams:
    """Rebuild a trial's parameters from a flat dict (e.g. ``FrozenTrial.params``).

    Accepts both namings: Optuna's (``gru.hidden``) and the study file's bare names, which is
    also how studies started before hpsearch qualified the names (0.1) are read back.
    """
    return sample(optuna.trial.FixedTrial(to_optuna_names(params, config)), config)
