"""The Python API: :func:`run_study` runs a study from a notebook or a script.

It is the command line without the shell: the same study (a file, or the same structure as a
dict), the same flags as keyword arguments, the same engine (:func:`hpsearch.run.run_config`),
the same results folder. Where the command line exits with a status, this raises the library's
exception (:class:`ConfigError`, :class:`Interrupted`, :class:`HpsearchError`), and a finished
run returns a :class:`StudyResult`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
from torch import nn

from hpsearch import attrs
from hpsearch.checkpoint.format import load_checkpoint
from hpsearch.checkpoint.loading import load_best_model
from hpsearch.checkpoint.study_best import read_best_meta
from hpsearch.config import StudyConfig, load_config, parse_config
from hpsearch.errors import EXIT_OK, HpsearchError, Interrupted, UsageError
from hpsearch.ranking import best_trial
from hpsearch.results import DEFAULT_ROOT, ResultsLayout
from hpsearch.run.runner import RunOutcome, run_config
from hpsearch.space import from_params
from hpsearch.user_code import references_in

Study = str | os.PathLike[str] | Mapping[str, Any] | StudyConfig
"""A study file's path, a dict of the same structure, or an already validated config."""
DICT_SOURCE, CONFIG_SOURCE = "<study dict>", "<study config>"
"""How messages name a study given as a dict, or as a ``StudyConfig``."""


@dataclass(frozen=True)
class Overrides:
    """Values that replace the study's own: the command-line flags, or ``run_study``'s
    keyword arguments. None keeps the study's value."""

    n_trials: int | None = None
    workers: int | str | None = None
    devices: str | list[str] | None = None
    storage: str | None = None
    timeout: float | None = None
    report: bool | None = None
    scheduler: str | None = None

    def apply(self, config: StudyConfig, source: str, by: str) -> StudyConfig:
        """The config with these values, validated like the study itself (errors name
        ``source`` and ``by``, e.g. "command-line flags")."""
        if self == Overrides():
            return config
        raw = config.as_study_dict()
        if self.n_trials is not None:
            raw["study"]["n_trials"] = self.n_trials
        if self.workers is not None:
            workers = self.workers
            raw["resources"]["workers"] = (
                int(workers) if isinstance(workers, str) and workers.isdigit() else workers)
        if self.devices is not None:
            devices = self.devices
            raw["resources"]["devices"] = (
                devices.split(",") if isinstance(devices, str) and devices not in ("auto", "cpu")
                else devices)
        if self.storage is not None:
            raw["study"]["storage"] = self.storage
        if self.timeout is not None:
            raw["study"]["timeout"] = self.timeout
        if self.report is not None:
            raw["report"]["enabled"] = self.report
        if self.scheduler is not None:
            raw["resources"]["scheduler"] = self.scheduler
        return parse_config(raw, f"{source} (with {by})")


def study_config(study: Study, overrides: Overrides, by: str) -> tuple[StudyConfig, str]:
    """Validate a study given as a path, a dict or a config, and apply the overrides.

    In a dict, a user function may stand as the function itself wherever the study file takes
    ``"package.module:function"``; it is recorded as that reference.

    Returns:
        The config, and how messages name the study (its path, ``<study dict>`` or
        ``<study config>``).

    Raises:
        ConfigError: The study or an override is invalid, or a function in the dict cannot
            be imported by name (a lambda, a nested function, one defined in ``__main__``).
        UsageError: ``study`` is none of those types.
    """
    if isinstance(study, StudyConfig):
        config, source = study, CONFIG_SOURCE
    elif isinstance(study, (str, os.PathLike)):
        source = os.fspath(study)
        config = load_config(source)
    elif isinstance(study, Mapping):
        source = DICT_SOURCE
        config = parse_config(references_in(dict(study), source), source)
    else:
        raise UsageError(f"study must be a study file's path, a dict or a StudyConfig, not "
                         f"{type(study).__name__}")
    return overrides.apply(config, source, by), source


@dataclass(frozen=True)
class BestTrial:
    """The study best: the best COMPLETE trial, whose best-epoch checkpoint is ``best/``."""

    number: int
    value: float
    """The study metric at the trial's best epoch (its Optuna value)."""
    architecture: str
    params: dict[str, Any]
    """Its parameters as the study file names them (``architecture``, an architecture's own
    by their bare names, ``lr``, ``loss.<argument>``), ready for ``study.enqueue``."""
    epoch: int | None
    """The best epoch, the one the checkpoint holds."""
    checkpoint: Path | None
    """``best/model.pt``, or None when the study keeps no checkpoint (``checkpoint.save:
    none``)."""


@dataclass(frozen=True, repr=False)
class StudyResult:
    """What a run of :func:`run_study` leaves: the study, its best trial, its files."""

    name: str
    results_dir: Path
    """``<results_dir>/<study name>/``: checkpoints, ``best/``, the journal, the report."""
    metric: str
    direction: str
    best_trial: BestTrial | None
    """None while no trial has completed."""
    study: optuna.Study
    """The Optuna study (``trials_dataframe()``, ``best_params`` in Optuna's names, ...)."""
    config: StudyConfig
    """The study as the run resolved it (overrides applied, functions as references)."""
    report: Path | None
    """``report.html`` when this run wrote the report, else None."""

    @property
    def best_value(self) -> float | None:
        return None if self.best_trial is None else self.best_trial.value

    def load_best_model(self, map_location: Any = None) -> nn.Module:
        """The study-best model, rebuilt, in eval mode (see ``hpsearch.load_best_model``)."""
        return load_best_model(self.results_dir, map_location=map_location)

    def load_checkpoint(self, map_location: Any = None) -> dict[str, Any]:
        """The study best's checkpoint: weights and metadata, sha256-checked."""
        return load_checkpoint(self.results_dir, map_location=map_location)

    def __repr__(self) -> str:
        best = self.best_trial
        shown = ("no complete trial" if best is None else
                 f"best trial {best.number} ({best.architecture}): {self.metric}={best.value:.4g}")
        return f"StudyResult({self.name!r}, {shown}, results_dir='{self.results_dir}')"


def run_study(
    study: Study,
    *,
    results_dir: str | os.PathLike[str] = DEFAULT_ROOT,
    n_trials: int | None = None,
    workers: int | Literal["auto"] | None = None,
    devices: str | list[str] | None = None,
    storage: str | None = None,
    timeout: float | None = None,
    report: bool | None = None,
    scheduler: str | None = None,
) -> StudyResult:
    """Run (or continue) a study in parallel workers, as ``python -m hpsearch.run`` does.

    Calling it again with the same study continues it up to its ``n_trials`` total, resuming
    the trials a crash or a stop interrupted.

    Args:
        study: A study file's path, a dict of the same structure (user functions may be given
            as the functions themselves), or a ``StudyConfig``.
        results_dir: Outputs go to ``results_dir/<study name>/``.
        n_trials: Replaces ``study.n_trials`` (the study's total).
        workers: Replaces ``resources.workers`` (a number, or ``"auto"``).
        devices: Replaces ``resources.devices``: ``"auto"``, ``"cpu"``, ``"cuda:0,cuda:1"`` or
            a list of devices.
        storage: Replaces ``study.storage`` (an Optuna storage URL or journal file path).
        timeout: Replaces ``study.timeout``: seconds after which no new trial starts.
        report: Write the report at the end (None: as ``report.enabled`` says).
        scheduler: Replaces ``resources.scheduler``: a Dask scheduler's address
            (``tcp://host:8786``) whose workers run the trials and the seed retrains.

    Returns:
        The study, its best trial and value, its folder, and ``load_best_model()``.

    Raises:
        ConfigError: The study or an argument is invalid, or a user function cannot be
            imported by name; nothing was run.
        Interrupted: Ctrl-C or SIGTERM stopped the run (main thread only); running trials
            left their resume state, and calling again resumes them.
        HpsearchError: The run stopped because its first trials all failed, every worker
            failed, or the report could not be written; the message names the cause.
    """
    overrides = Overrides(n_trials=n_trials, workers=workers, devices=devices,
                          storage=storage, timeout=timeout, report=report, scheduler=scheduler)
    config, source = study_config(study, overrides, "run_study arguments")
    again = resume_call(source, results_dir, overrides)
    # Signal handlers can only be installed from the main thread; from another one the run
    # cannot be stopped by Ctrl-C, but it runs the same.
    in_main_thread = threading.current_thread() is threading.main_thread()
    outcome = run_config(config, results_dir, source=source, handle_signals=in_main_thread,
                         command=again)
    raise_for(outcome, again)
    assert outcome.study is not None  # a run that reached its end has its study
    # Absolute: the result stays valid when a notebook changes its working folder.
    layout = ResultsLayout(outcome.results_dir.absolute())
    return StudyResult(
        name=config.study.name,
        results_dir=layout.root,
        metric=config.study.metric,
        direction=config.study.direction,
        best_trial=study_best(outcome.study, config, layout),
        study=outcome.study,
        config=config,
        report=outcome.report["html"].absolute() if outcome.report else None,
    )


def resume_call(source: str, results_dir: str | os.PathLike[str], overrides: Overrides) -> str:
    """The call that resumes a run, as the resume hint shows it."""
    study = "<the same study>" if source in (DICT_SOURCE, CONFIG_SOURCE) else repr(source)
    given = {k: v for k, v in vars(overrides).items() if v is not None}
    words = [study, f"results_dir={os.fspath(results_dir)!r}",
             *(f"{k}={v!r}" for k, v in given.items())]
    return f"hpsearch.run_study({', '.join(words)})"


def raise_for(outcome: RunOutcome, again: str) -> None:
    """The exception a run that did not end well deserves (its cause was printed already)."""
    if outcome.signal is not None:
        raise Interrupted(outcome.signal, "interrupted: every finished trial and checkpoint "
                          f"is kept; running trials resume from their last epoch with {again}")
    if outcome.exit_code != EXIT_OK:
        raise HpsearchError(f"{outcome.failure or 'the run failed'} (see "
                            f"{ResultsLayout(outcome.results_dir).run_log})")


def study_best(study: optuna.Study, config: StudyConfig,
               layout: ResultsLayout) -> BestTrial | None:
    """The best COMPLETE trial, as the run summary and ``best/`` name it."""
    best = best_trial(study.get_trials(deepcopy=False), config.minimize)
    if best is None or best.value is None:
        return None
    params = from_params(best.params, config)
    meta = read_best_meta(layout)
    kept = meta is not None and meta.get("trial") == best.number and layout.best_model.exists()
    epoch = best.user_attrs.get(attrs.BEST_EPOCH)
    return BestTrial(
        number=best.number,
        value=float(best.value),
        architecture=params.architecture,
        params=params.flat(),
        epoch=epoch if isinstance(epoch, int) else None,
        checkpoint=layout.best_model if kept else None,
    )
