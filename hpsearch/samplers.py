"""The samplers and pruners a study file may name, and building them from it.

``optuna.load_study`` restores neither, so every process that asks for trials builds both here
from the config; otherwise a worker would silently run unseeded TPE and the median pruner.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
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


# Modules Optuna imports only when the sampler or pruner first works (mid-trial, where a missing
# one would fail every trial); each is checked when it is built, so a study that names it fails
# before any work. Each module's top-level package is also its name on PyPI.
REQUIRES: dict[str, tuple[str, ...]] = {
    "cmaes": ("cmaes",),
    "gp": ("scipy.optimize", "scipy.stats.qmc", "torch"),
    "qmc": ("scipy.stats.qmc",),
    "wilcoxon": ("scipy.stats",),
}


def missing_packages(name: str) -> list[str]:
    """The packages the sampler or pruner ``name`` needs that do not import here."""
    missing: list[str] = []
    for module in REQUIRES.get(name, ()):
        package = module.split(".")[0]
        if package in missing:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def check_packages(name: str, kind: str) -> None:
    """Raise ValueError naming what ``pip install`` would fix, if ``name`` needs it.

    Args:
        name: A sampler or pruner name.
        kind: ``"sampler"`` or ``"pruner"``, for the message.
    """
    missing = missing_packages(name)
    if missing:
        quoted = ", ".join(f"'{p}'" for p in missing)
        raise ValueError(
            f"the {name} {kind} needs the package{'s' * (len(missing) > 1)} {quoted}, which "
            f"cannot be imported here (pip install {' '.join(missing)})"
        )


# hpsearch's space is conditional (the architecture, then that architecture's parameters) and
# several workers ask at once: TPE models each architecture's parameters jointly and keeps
# workers from proposing the same point. Keys in the study file win.
TPE_DEFAULTS = {"multivariate": True, "group": True, "constant_liar": True}


def build_sampler(cfg: SamplerOptions, seed_offset: int = 0, startup_trials: int = 0
                  ) -> optuna.samplers.BaseSampler:
    """Build the sampler; ``seed_offset`` keeps parallel workers from drawing the same points.

    ``startup_trials``: trials the study queues to explore before the sampler's turn. They
    are TPE's start-up, so its own random start-up (``n_startup_trials``, Optuna's 10) defaults
    to that many instead of drawing more random trials after them.

    Raises:
        TypeError/ValueError: The study file gave arguments the sampler does not take, or a
            package the sampler needs is missing.
    """
    check_packages(cfg.name, "sampler")
    kwargs: dict[str, Any] = dict(cfg.model_extra or {})
    if cfg.name == "tpe":
        startup = {"n_startup_trials": startup_trials} if startup_trials else {}
        kwargs = {**TPE_DEFAULTS, **startup, **kwargs}
    if cfg.seed is not None:
        kwargs["seed"] = (cfg.seed + seed_offset) % 2**32  # numpy takes 32-bit seeds
    with _chosen_experimental():
        return SAMPLERS[cfg.name](**kwargs)


# Pruners that wait for ``n_startup_trials`` finished trials (Optuna's default 5) before they
# prune at all.
STARTUP_PRUNERS = ("median", "percentile")


def build_pruner(cfg: PrunerOptions, startup_trials: int | None = None
                 ) -> optuna.pruners.BasePruner:
    """Build the pruner; ``patient`` wraps another pruner given as ``wrapped: {name: ...}``.

    ``startup_trials``: where a gate outside the pruner already holds pruning back, the
    pruner's own ``n_startup_trials`` defaults to this instead of Optuna's 5.

    Raises:
        TypeError/ValueError: The study file gave arguments the pruner does not take, or a
            package the pruner needs is missing.
    """
    check_packages(cfg.name, "pruner")
    kwargs: dict[str, Any] = dict(cfg.model_extra or {})
    if startup_trials is not None and cfg.name in STARTUP_PRUNERS:
        kwargs.setdefault("n_startup_trials", startup_trials)
    if cfg.name == "patient":
        kwargs["wrapped_pruner"] = (build_pruner(cfg.wrapped, startup_trials) if cfg.wrapped
                                    else None)
    elif cfg.wrapped is not None:
        raise ValueError("wrapped: only the patient pruner wraps another")
    with _chosen_experimental():
        return PRUNERS[cfg.name](**kwargs)


@contextlib.contextmanager
def _chosen_experimental() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning: the study file chose the class (or TPE's
    defaults above chose its options), and every worker would repeat the warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
