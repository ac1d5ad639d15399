"""The samplers and pruners a study file may name, and building them from it.

``optuna.load_study`` restores neither, so every process that asks for trials builds both here
from the config; otherwise a worker would silently run unseeded TPE and the median pruner.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import optuna


class SamplerOptions(Protocol):
    """``study.sampler`` as the config holds it."""

    name: str
    seed: int | None
    model_extra: dict[str, Any] | None


class PrunerOptions(Protocol):
    """``study.pruner`` as the config holds it."""

    name: str
    wrapped: PrunerOptions | None
    model_extra: dict[str, Any] | None


SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler,
    "grid": optuna.samplers.GridSampler,
    "bruteforce": optuna.samplers.BruteForceSampler,
    "nsgaii": optuna.samplers.NSGAIISampler,
}

PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "patient": optuna.pruners.PatientPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
    "none": optuna.pruners.NopPruner,
}


# hpsearch's space is conditional (the architecture, then that architecture's parameters) and
# several workers ask at once: TPE models each architecture's parameters jointly and keeps
# workers from proposing the same point. Keys in the study file win.
TPE_DEFAULTS = {"multivariate": True, "group": True, "constant_liar": True}


def build_sampler(cfg: SamplerOptions, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """Build the sampler; ``seed_offset`` keeps parallel workers from drawing the same points.

    Raises:
        TypeError/ValueError: The study file gave arguments the sampler does not take.
    """
    kwargs: dict[str, Any] = dict(cfg.model_extra or {})
    if cfg.name == "tpe":
        kwargs = {**TPE_DEFAULTS, **kwargs}
        with warnings.catch_warnings():
            # multivariate and group are marked experimental; they are the defaults here.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if cfg.seed is not None:
                kwargs["seed"] = (cfg.seed + seed_offset) % 2**32  # numpy takes 32-bit seeds
            return optuna.samplers.TPESampler(**kwargs)
    if cfg.seed is not None:
        kwargs["seed"] = (cfg.seed + seed_offset) % 2**32  # numpy takes 32-bit seeds
    return SAMPLERS[cfg.name](**kwargs)


def build_pruner(cfg: PrunerOptions) -> optuna.pruners.BasePruner:
    """Build the pruner; ``patient`` wraps another pruner given as ``wrapped: {name: ...}``."""
    kwargs: dict[str, Any] = dict(cfg.model_extra or {})
    if cfg.name == "patient":
        kwargs["wrapped_pruner"] = build_pruner(cfg.wrapped) if cfg.wrapped else None
    elif cfg.wrapped is not None:
        raise ValueError("wrapped: only the patient pruner wraps another")
    return PRUNERS[cfg.name](**kwargs)
