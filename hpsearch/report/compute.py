"""Study -> report data (pure: reads the study it is given, no file, writes nothing).

A study exists to answer one question: which architecture, with which settings, is best, and
by how much. :func:`compute_report` turns a study, plus the test-split numbers measured on each
architecture's best checkpoint (:mod:`hpsearch.report.measure`), into
:class:`~hpsearch.report.data.ReportData` that tests check directly.

Architectures are ranked by their best *validation* value only, with the rule of
:mod:`hpsearch.ranking` (ties to the earlier trial), so the winner is always Optuna's
``best_trial``. The test split is evaluated for the report and never influences the ranking.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpsearch import attrs, ranking
from hpsearch.report._trials import (
    architecture,
    as_float,
    attr_int,
    attr_str,
    by_architecture,
    count_states,
    searched_params,
    time_to_best,
    train_seconds,
)
from hpsearch.report.data import (
    ArchitectureSummary,
    ReportData,
    SeedSummary,
    TrialRow,
    Winner,
    load_call,
)
from hpsearch.report.figure_data import (
    all_importances,
    all_parallel,
    intermediate_curves,
    learning_curve,
    optimization_history,
    timeline,
    value_points,
)
from hpsearch.report.seeds import gap_verdict, seed_summary


def compute_report(
    study: optuna.Study,
    *,
    metric: str,
    test_metric_name: str,
    test_metrics: Mapping[str, float],
    seed_metrics: Mapping[str, Sequence[float]],
    top_n: int = 5,
    results_dir: str | Path | None = None,
    now: datetime | None = None,
) -> ReportData:
    """Turn a study into report data; reads the study, writes nothing.

    Args:
        study: A single-objective study whose trials follow the hpsearch data contract
            (param ``architecture``, user attrs ``history``, ``best_epoch``, ...).
        metric: The monitored validation metric, e.g. ``val_acc``; the key of the learning
            curve in each trial's ``history``.
        test_metric_name: Name of the test metric, e.g. ``test_acc``.
        test_metrics: Architecture -> test metric of its best checkpoint.
        seed_metrics: Architecture -> test metrics of its best configuration retrained with
            fresh seeds.
        top_n: How many of each architecture's best complete trials the median and IQR use.
        results_dir: The study's results folder; shown in checkpoint paths and the load call.
        now: Report time, used as the end of still-running trials; defaults to now.

    Returns:
        The report data.

    Raises:
        ValueError: If ``top_n`` is below 1, the study has several objectives, or
            ``test_metrics``/``seed_metrics`` name an architecture the study does not have.
    """
    _check_study(study, top_n)
    maximize = study.direction == StudyDirection.MAXIMIZE
    now = now if now is not None else datetime.now()
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    by_arch = by_architecture(trials)
    _check_known_architectures("test_metrics", test_metrics, by_arch)
    _check_known_architectures("seed_metrics", seed_metrics, by_arch)

    architectures = _architecture_table(
        by_arch, maximize=maximize, top_n=top_n, test_metrics=test_metrics,
        seed_metrics=seed_metrics,
    )
    ranked = [a for a in architectures if a.rank is not None]
    order = [a.architecture for a in architectures]
    complete_by_arch = {
        name: [t for t in ts if ranking.complete_value(t) is not None]
        for name, ts in by_arch.items()
    }
    results_folder = None if results_dir is None else Path(results_dir).as_posix()

    return ReportData(
        study_name=study.study_name,
        direction="maximize" if maximize else "minimize",
        metric=metric,
        test_metric_name=test_metric_name,
        top_n=top_n,
        generated_at=now,
        results_dir=results_folder,
        counts=count_states(trials),
        architectures=tuple(architectures),
        winner=_winner(ranked, study.study_name, results_folder),
        gap=gap_verdict(ranked, maximize=maximize, test_metric_name=test_metric_name),
        trials=tuple(_trial_row(t) for t in trials),
        param_names=tuple(sorted({p for t in trials for p in searched_params(t)})),
        value_points=value_points(complete_by_arch, order),
        learning_curves=tuple(
            learning_curve(a, by_arch[a.architecture], metric) for a in ranked
        ),
        history=optimization_history(trials, maximize=maximize),
        intermediate=intermediate_curves(trials),
        importances=all_importances(complete_by_arch, order, study.direction),
        parallel=all_parallel(complete_by_arch, order),
        timeline=timeline(trials, now),
    )


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _check_study(study: optuna.Study, top_n: int) -> None:
    if top_n < 1:
        raise ValueError(f"report top_n must be at least 1, got {top_n}")
    if len(study.directions) != 1:
        raise ValueError(
            f"the report needs a single-objective study; {study.study_name!r} has "
            f"{len(study.directions)} objectives"
        )


def _check_known_architectures(
    what: str, given: Mapping[str, object], known: Mapping[str, object]
) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(
            f"{what} names architectures the study has no trial of: {unknown}; "
            f"the study has {sorted(known)}"
        )


# ---------------------------------------------------------------------------------------------
# The per-architecture table and its ranking
# ---------------------------------------------------------------------------------------------


def _architecture_table(
    by_arch: Mapping[str, Sequence[FrozenTrial]],
    *,
    maximize: bool,
    top_n: int,
    test_metrics: Mapping[str, float],
    seed_metrics: Mapping[str, Sequence[float]],
) -> list[ArchitectureSummary]:
    """One ranked summary per architecture, best first."""
    trials = [t for ts in by_arch.values() for t in ts]
    bests = ranking.architecture_bests(trials, minimize=not maximize)
    summaries = [
        _summarize_architecture(
            name,
            arch_trials,
            bests.get(name),
            maximize=maximize,
            top_n=top_n,
            test_metric=as_float(test_metrics.get(name)),
            seeds=seed_summary(seed_metrics.get(name, ())),
        )
        for name, arch_trials in by_arch.items()
    ]
    return _rank(summaries, maximize=maximize)


def _summarize_architecture(
    name: str,
    trials: Sequence[FrozenTrial],
    best: FrozenTrial | None,
    *,
    maximize: bool,
    top_n: int,
    test_metric: float | None,
    seeds: SeedSummary,
) -> ArchitectureSummary:
    """One architecture's row; ``best`` is its best trial as :mod:`hpsearch.ranking` picks it
    (its best complete trial, else its best pruned one)."""
    complete = ranking.sorted_complete(trials, minimize=not maximize)
    top = tuple(ranking.complete_value(t) or 0.0 for t in complete[:top_n])
    q1, q3 = (float(q) for q in np.percentile(top, [25, 75])) if top else (None, None)
    times = [s for s in (train_seconds(t) for t in trials) if s is not None]
    best_value = None
    from_pruned = False
    if best is not None:
        best_value = ranking.complete_value(best)
        if best_value is None:
            best_value, from_pruned = ranking.pruned_value(best), True
    return ArchitectureSummary(
        architecture=name,
        rank=None,
        counts=count_states(trials),
        best_trial=best.number if best else None,
        best_value=best_value,
        top_values=top,
        top_median=statistics.median(top) if top else None,
        top_q1=q1,
        top_q3=q3,
        test_metric=test_metric,
        seeds=seeds,
        n_params=attr_int(best, attrs.N_PARAMS) if best else None,
        best_epoch=attr_int(best, attrs.BEST_EPOCH) if best else None,
        time_to_best=time_to_best(best) if best else None,
        total_train_seconds=math.fsum(times) if times else None,
        best_params=searched_params(best) if best else {},
        checkpoint=attr_str(best, attrs.CHECKPOINT) if best else None,
        from_pruned=from_pruned,
    )


def _rank(
    summaries: Sequence[ArchitectureSummary], *, maximize: bool
) -> list[ArchitectureSummary]:
    """Number the architectures that have a best trial by :func:`hpsearch.ranking.rank_key`
    (those described by a pruned trial after the others); the rest follow by name, unranked."""

    def key(s: ArchitectureSummary) -> tuple[bool, tuple[float, int]]:
        assert s.best_value is not None and s.best_trial is not None
        return s.from_pruned, ranking.rank_key(s.best_value, s.best_trial, not maximize)

    with_value = sorted((s for s in summaries if s.best_value is not None), key=key)
    without = sorted((s for s in summaries if s.best_value is None), key=lambda s: s.architecture)
    return [s._replace(rank=i) for i, s in enumerate(with_value, start=1)] + without


def _winner(
    ranked: Sequence[ArchitectureSummary], study_name: str, results_folder: str | None
) -> Winner | None:
    """The top-ranked architecture's best trial; None while no trial has completed."""
    if not ranked or ranked[0].from_pruned:
        return None
    best = ranked[0]
    assert best.best_trial is not None and best.best_value is not None
    folder = results_folder if results_folder is not None else f"results/{study_name}"
    checkpoint_path = None
    if best.checkpoint is not None and results_folder is not None:
        checkpoint_path = (Path(results_folder) / best.checkpoint).as_posix()
    return Winner(
        architecture=best.architecture,
        trial_number=best.best_trial,
        value=best.best_value,
        params=best.best_params,
        best_epoch=best.best_epoch,
        test_metric=best.test_metric,
        seeds=best.seeds,
        checkpoint=best.checkpoint,
        checkpoint_path=checkpoint_path,
        load_call=load_call(folder),
    )


# ---------------------------------------------------------------------------------------------
# Every trial
# ---------------------------------------------------------------------------------------------


def _trial_row(trial: FrozenTrial) -> TrialRow:
    return TrialRow(
        number=trial.number,
        architecture=architecture(trial),
        state=trial.state.name,
        value=trial.value if trial.state == TrialState.COMPLETE else None,
        best_epoch=attr_int(trial, attrs.BEST_EPOCH),
        n_params=attr_int(trial, attrs.N_PARAMS),
        train_seconds=train_seconds(trial),
        time_to_best=time_to_best(trial),
        device=attr_str(trial, attrs.DEVICE),
        worker=attr_str(trial, attrs.WORKER),
        datetime_start=trial.datetime_start,
        datetime_complete=trial.datetime_complete,
        checkpoint=attr_str(trial, attrs.CHECKPOINT),
        fail_reason=attr_str(trial, attrs.FAIL_REASON),
        params=searched_params(trial),
    )
