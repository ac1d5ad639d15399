"""The search space: the only place that calls ``trial.suggest_*``.

The architecture is the categorical Optuna parameter ``architecture``; each architecture's own
parameters are suggested only when it is chosen (a conditional space), under a name qualified
by the architecture (``gru.hidden``), so two architectures that both call a parameter
``hidden`` never share one distribution in the sampler. Training parameters (``lr``,
``batch_size``, ...) are shared by every architecture and keep their names. Model factories
receive bare names. Literal values in the study file are recorded but not suggested. The
``train.loss`` arguments that are searched are the Optuna parameters ``loss.<argument>``.
An architecture's exploration trials are the points of a Latin hypercube over its space
(:func:`design`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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


def searched(config: StudyConfig, architecture: str) -> dict[str, FloatDist | IntDist |
                                                         CategoricalDist]:
    """The distributions one architecture's trials are sampled from, by Optuna name (its own
    parameters, the searched training keys and loss arguments; literals left out)."""
    spec = config.model.architecture[architecture]
    arguments = config.train.loss.arguments if config.train.loss is not None else {}
    named = {
        **{optuna_name(architecture, k): v for k, v in spec.params.items()},
        **{k: getattr(config.train, k) for k in SEARCHABLE_TRAIN_KEYS},
        **{LOSS_PARAM_PREFIX + k: v for k, v in arguments.items()},
    }
    return {k: v for k, v in named.items() if isinstance(v, FloatDist | IntDist | CategoricalDist)}


def _from_unit(dist: FloatDist | IntDist | CategoricalDist, u: float) -> Any:
    """The value at quantile ``u`` in [0, 1) of a distribution, uniform on its scale."""
    if isinstance(dist, CategoricalDist):
        return dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
    if isinstance(dist, IntDist):
        if dist.log:
            value = math.floor(math.exp(math.log(dist.low)
                                        + u * (math.log(dist.high + 1) - math.log(dist.low))))
        else:
            value = dist.low + dist.step * math.floor(u * ((dist.high - dist.low) // dist.step + 1))
        return int(min(max(value, dist.low), dist.high))
    if dist.log:
        return math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low)))
    if dist.step is not None:
        steps = math.floor((dist.high - dist.low) / dist.step + 1e-9)
        # Rounded, so that 0.1 * 3 is the grid's 0.3 and not 0.30000000000000004.
        return round(dist.low + dist.step * min(math.floor(u * (steps + 1)), steps), 12)
    return dist.low + u * (dist.high - dist.low)


def design(config: StudyConfig, architecture: str, size: int, seed: int
           ) -> list[dict[str, Any]]:
    """``size`` points of a Latin hypercube over an architecture's searched parameters, in
    Optuna names, the architecture included.

    Each parameter's range is cut into ``size`` equal parts (on its own scale: log ranges in
    log) and every part holds one point, so a handful of exploration trials never leaves, say,
    the good learning rates untried, as independent draws can.
    """
    dists = searched(config, architecture)
    # One stream per architecture, fixed by the seed: a rerun that tops an architecture up
    # takes the next points of the same design.
    index = list(config.model.architecture).index(architecture)
    rng = np.random.default_rng([seed, index])
    columns = [(rng.permutation(size) + rng.random(size)) / size for _ in dists]
    return [{ARCHITECTURE: architecture,
             **{name: _from_unit(dist, float(column[i]))
                for (name, dist), column in zip(dists.items(), columns)}}
            for i in range(size)]


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
