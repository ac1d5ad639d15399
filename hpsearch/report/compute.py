"""Study -> report data (pure: reads the study it is given, no file, writes nothing).

A study exists to answer one question: which architecture, with which settings, is best, and
by how much. :func:`compute_report` turns a study, plus the test-split numbers measured on each
architecture's representative checkpoint (:mod:`hpsearch.report.measure`), into
:class:`~hpsearch.report.data.ReportData` that tests check directly.

Each architecture is described by its *representative*
(:func:`hpsearch.ranking.architecture_bests`): its trial with the best best-epoch validation
value, pruned trials included. An architecture the search did not explore enough (too few
finished trials, or a representative pruned while still improving) is labelled so and never
ranked: the verdict judges explored architectures only, and says how to explore the rest. The
winner stays the study's best COMPLETE trial (:func:`hpsearch.ranking.best_trial`, what
``best/`` holds). The test split is evaluated for the report and never influences the ranking.
"""

from __future__ import annotations

import math
import shlex
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpsearch import attrs, ranking
from hpsearch.checkpoint.retention import retired_checkpoints
from hpsearch.optuna_private import storage_of, study_id
from hpsearch.report._trials import (
    architecture,
    as_float,
    attr_int,
    attr_str,
    by_architecture,
    count_states,
    epochs_trained,
    last_epoch,
    searched_params,
    time_to_best,
    train_seconds,
)
from hpsearch.report.data import (
    UNKNOWN_ARCHITECTURE,
    ArchitectureSummary,
    Exploration,
    GapVerdict,
    ReportData,
    SeedSummary,
    TrialRow,
    Verdict,
    Winner,
    fmt_best_value,
    load_call,
)
from hpsearch.report.figure_data import (
    all_importances,
    all_parallel,
    intermediate_curves,
    learning_curve,
    optimization_history,
    search_effort,
    timeline,
    value_points,
)
from hpsearch.report.seeds import gap_verdict, seed_summary
from hpsearch.results import ResultsLayout
from hpsearch.storage.trials import counted


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
    min_trials: int = 0,
    prune_within_architecture: bool | None = None,
    min_trials_to_prune: int | None = None,
    sample_within_architecture: bool | None = None,
) -> ReportData:
    """Turn a study into report data; reads the study, writes nothing.

    Args:
        study: A single-objective study whose trials follow the hpsearch data contract
            (param ``architecture``, user attrs ``history``, ``best_epoch``, ...).
        metric: The monitored validation metric, e.g. ``val_acc``; the key of the learning
            curve in each trial's ``history``.
        test_metric_name: Name of the test metric, e.g. ``test_acc``.
        test_metrics: Architecture -> test metric of its representative's checkpoint.
        seed_metrics: Architecture -> test metrics of its representative's configuration
            retrained with fresh seeds.
        top_n: How many of each architecture's best complete trials the median and IQR use.
        results_dir: The study's results folder; shown in checkpoint paths, the load call and
            the command that adds trials.
        now: Report time, used as the end of still-running trials; defaults to now.
        min_trials: ``study.min_trials_per_architecture``: an architecture with fewer finished
            (complete or pruned) trials is under-explored.
        prune_within_architecture: ``study.prune_within_architecture``, for the method notes;
            None when unknown.
        min_trials_to_prune: ``study.min_trials_to_prune``, for the method notes; None when
            unknown.
        sample_within_architecture: whether the sampler modelled each architecture on its own
            trials, for the method notes; None when unknown.

    Returns:
        The report data.

    Raises:
        ValueError: If ``top_n`` is below 1, ``min_trials`` below 0, the study has several
            objectives, or ``test_metrics``/``seed_metrics`` name an architecture the study
            does not have.
    """
    _check_study(study, top_n, min_trials)
    maximize = study.direction == StudyDirection.MAXIMIZE
    now = now if now is not None else datetime.now()
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    by_arch = by_architecture(trials)
    _check_known_architectures("test_metrics", test_metrics, by_arch)
    _check_known_architectures("seed_metrics", seed_metrics, by_arch)

    architectures = _architecture_table(
        by_arch, maximize=maximize, top_n=top_n, test_metrics=test_metrics,
        seed_metrics=seed_metrics, min_trials=min_trials,
    )
    explored = [a for a in architectures if a.rank is not None]
    order = [a.architecture for a in architectures]
    complete_by_arch = {
        name: [t for t in ts if ranking.complete_value(t) is not None]
        for name, ts in by_arch.items()
    }
    results_folder = None if results_dir is None else Path(results_dir).as_posix()
    winner = _winner(trials, architectures, maximize, study.study_name, results_folder)
    gap = gap_verdict(explored, maximize=maximize, test_metric_name=test_metric_name)

    retired = retired_checkpoints(storage_of(study), study_id(study))
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
        winner=winner,
        gap=gap,
        verdict=_verdict(architectures, gap, winner, metric),
        exploration=_exploration(
            architectures, min_trials, prune_within_architecture, min_trials_to_prune,
            sample_within_architecture, counted(trials),
            results_folder,
        ),
        trials=tuple(_trial_row(t, retired) for t in trials),
        param_names=tuple(sorted({p for t in trials for p in searched_params(t)})),
        value_points=value_points(complete_by_arch, order),
        learning_curves=tuple(
            learning_curve(a, by_arch[a.architecture], metric)
            for a in architectures
            if a.best_trial is not None
        ),
        history=optimization_history(trials, maximize=maximize),
        intermediate=intermediate_curves(trials),
        importances=all_importances(complete_by_arch, order, study.direction),
        parallel=all_parallel(complete_by_arch, order),
        timeline=timeline(trials, now),
        effort=search_effort(trials, order, now),
    )


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _check_study(study: optuna.Study, top_n: int, min_trials: int) -> None:
    if top_n < 1:
        raise ValueError(f"report top_n must be at least 1, got {top_n}")
    if min_trials < 0:
        raise ValueError(f"report min_trials must be at least 0, got {min_trials}")
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
    min_trials: int,
) -> list[ArchitectureSummary]:
    """One summary per architecture: explored ones ranked first, best first."""
    trials = [t for ts in by_arch.values() for t in ts]
    representatives = ranking.architecture_bests(trials, minimize=not maximize)
    summaries = [
        _summarize_architecture(
            name,
            arch_trials,
            representatives.get(name),
            maximize=maximize,
            top_n=top_n,
            test_metric=as_float(test_metrics.get(name)),
            seeds=seed_summary(seed_metrics.get(name, ())),
            min_trials=min_trials,
        )
        for name, arch_trials in by_arch.items()
    ]
    return _rank(summaries, maximize=maximize)


def _summarize_architecture(
    name: str,
    trials: Sequence[FrozenTrial],
    representative: FrozenTrial | None,
    *,
    maximize: bool,
    top_n: int,
    test_metric: float | None,
    seeds: SeedSummary,
    min_trials: int,
) -> ArchitectureSummary:
    """One architecture's row, described by its ``representative``
    (:func:`hpsearch.ranking.architecture_bests`), with its search effort and whether it was
    explored enough to judge."""
    complete = ranking.sorted_complete(trials, minimize=not maximize)
    top = tuple(ranking.complete_value(t) or 0.0 for t in complete[:top_n])
    q1, q3 = (float(q) for q in np.percentile(top, [25, 75])) if top else (None, None)
    times = [s for s in (train_seconds(t) for t in trials) if s is not None]
    counts = count_states(trials)
    rep = representative
    from_pruned = rep is not None and rep.state == TrialState.PRUNED
    best_epoch = attr_int(rep, attrs.BEST_EPOCH) if rep else None
    pruned_at = last_epoch(rep) if rep is not None and from_pruned else None
    # Pruned at its best epoch: the curve was still rising when the pruner cut it.
    still_improving = (
        from_pruned and best_epoch is not None and pruned_at is not None
        and best_epoch >= pruned_at
    )
    reasons = []
    if name == UNKNOWN_ARCHITECTURE:
        reasons.append("records no architecture")
    elif counts.finished == 0:
        reasons.append("no finished trial yet")
    elif counts.finished < min_trials:
        reasons.append(f"{counts.finished} of {min_trials} finished trials")
    if still_improving and rep is not None:
        reasons.append(
            f"its best trial {rep.number} was pruned at epoch {pruned_at} while still improving"
        )
    return ArchitectureSummary(
        architecture=name,
        rank=None,
        counts=counts,
        best_trial=rep.number if rep else None,
        best_value=ranking.shown_value(rep) if rep else None,
        top_values=top,
        top_median=statistics.median(top) if top else None,
        top_q1=q1,
        top_q3=q3,
        test_metric=test_metric,
        seeds=seeds,
        n_params=attr_int(rep, attrs.N_PARAMS) if rep else None,
        best_epoch=best_epoch,
        time_to_best=time_to_best(rep) if rep else None,
        total_train_seconds=math.fsum(times) if times else None,
        best_params=searched_params(rep) if rep else {},
        checkpoint=attr_str(rep, attrs.CHECKPOINT) if rep else None,
        from_pruned=from_pruned,
        pruned_at_epoch=pruned_at,
        total_epochs=sum(epochs_trained(t) for t in trials),
        explored=not reasons,
        exploration_note="; ".join(reasons) or None,
        still_improving=still_improving,
    )


def _rank(
    summaries: Sequence[ArchitectureSummary], *, maximize: bool
) -> list[ArchitectureSummary]:
    """Number the explored architectures by their representative's
    :func:`hpsearch.ranking.rank_key`; under-explored ones follow in the same order, unranked
    (the search did not test them enough to rank them), then those without a value by name."""

    def key(s: ArchitectureSummary) -> tuple[float, int]:
        assert s.best_value is not None and s.best_trial is not None
        return ranking.rank_key(s.best_value, s.best_trial, not maximize)

    valued = [s for s in summaries if s.best_value is not None]
    explored = sorted((s for s in valued if s.explored), key=key)
    under = sorted((s for s in valued if not s.explored), key=key)
    without = sorted((s for s in summaries if s.best_value is None), key=lambda s: s.architecture)
    return [s._replace(rank=i) for i, s in enumerate(explored, start=1)] + under + without


def _winner(
    trials: Sequence[FrozenTrial],
    architectures: Sequence[ArchitectureSummary],
    maximize: bool,
    study_name: str,
    results_folder: str | None,
) -> Winner | None:
    """The study's best COMPLETE trial, what ``best/`` holds; None while none has completed.

    Its test metric and seed retrains are those of its architecture's representative, so they
    are shown only when it is that representative.
    """
    best = ranking.best_trial(trials, minimize=not maximize)
    if best is None:
        return None
    value = ranking.complete_value(best)
    assert value is not None
    name = architecture(best)
    summary = next(a for a in architectures if a.architecture == name)
    representative = summary.best_trial == best.number
    checkpoint = attr_str(best, attrs.CHECKPOINT)
    folder = results_folder if results_folder is not None else f"results/{study_name}"
    checkpoint_path = None
    if checkpoint is not None and results_folder is not None:
        checkpoint_path = (Path(results_folder) / checkpoint).as_posix()
    return Winner(
        architecture=name,
        trial_number=best.number,
        value=value,
        params=searched_params(best),
        best_epoch=attr_int(best, attrs.BEST_EPOCH),
        test_metric=summary.test_metric if representative else None,
        seeds=summary.seeds if representative else seed_summary(()),
        checkpoint=checkpoint,
        checkpoint_path=checkpoint_path,
        load_call=load_call(folder),
        representative=representative,
    )


# ---------------------------------------------------------------------------------------------
# The verdict, and what the search still owes
# ---------------------------------------------------------------------------------------------


def _verdict(
    architectures: Sequence[ArchitectureSummary],
    gap: GapVerdict,
    winner: Winner | None,
    metric: str,
) -> Verdict:
    """Name the best explored architecture, judge its gap, and relate it to the winner."""
    explored = [a for a in architectures if a.rank is not None]
    if not explored:
        if not any(a.best_value is not None for a in architectures):
            text = "No trial has finished with a value yet, so there is no best architecture."
        else:
            text = "No architecture is explored enough to name a best one."
        if winner is not None:
            text += (
                f" The winner below, {winner.architecture} trial {winner.trial_number}, is only "
                "the best complete trial so far."
            )
        return Verdict(None, text)
    best = explored[0]
    parts = [
        f"{best.architecture} is the best explored architecture: best {metric} "
        f"{fmt_best_value(best)} in trial {best.best_trial}.",
        gap.text,
    ]
    if winner is None:
        parts.append("No trial has completed, so there is no loadable winner yet.")
    elif winner.architecture != best.architecture:
        winner_row = next(a for a in architectures if a.architecture == winner.architecture)
        if not winner_row.explored:
            why = f"{winner.architecture} is under-explored"
        elif best.from_pruned:
            why = (
                f"{best.architecture}'s best trial was pruned, and best/ holds complete "
                "trials only"
            )
        else:
            why = f"{best.architecture}'s best trial is not complete"
        parts.append(
            f"The winner (the best complete trial, the model in best/) is "
            f"{winner.architecture} trial {winner.trial_number}, not {best.architecture}: "
            f"{why}."
        )
    return Verdict(best.architecture, " ".join(parts))


def _exploration(
    architectures: Sequence[ArchitectureSummary],
    min_trials: int,
    prune_within_architecture: bool | None,
    min_trials_to_prune: int | None,
    sample_within_architecture: bool | None,
    counted_trials: int,
    results_folder: str | None,
) -> Exploration:
    """Which architectures need more trials, how many, and the command that adds them."""
    under = [
        a for a in architectures
        if not a.explored and a.architecture != UNKNOWN_ARCHITECTURE
    ]
    if not under:
        return Exploration(min_trials, prune_within_architecture, min_trials_to_prune,
                           sample_within_architecture, (), 0, None, None, None)
    # At least one more each: one still improving when pruned has enough trials but needs one.
    to_add = sum(max(min_trials - a.counts.finished, 1) for a in under)
    n_trials = counted_trials + to_add
    listed = ", ".join(f"{a.architecture} ({a.exploration_note})" for a in under)
    need = "It needs" if len(under) == 1 else "They need"
    top_up = (
        f" (each architecture is first topped up to {min_trials} trials)" if min_trials else ""
    )
    advice = (
        f"Under-explored, so not judged: {listed}. {need} {to_add} more "
        f"trial{'' if to_add == 1 else 's'}; rerunning with a higher n_trials continues the "
        f"study{top_up}:"
    )
    return Exploration(
        min_trials=min_trials,
        prune_within_architecture=prune_within_architecture,
        min_trials_to_prune=min_trials_to_prune,
        sample_within_architecture=sample_within_architecture,
        under_explored=tuple(a.architecture for a in under),
        trials_to_add=to_add,
        n_trials=n_trials,
        command=_rerun_command(results_folder, n_trials),
        advice=advice,
    )


def _rerun_command(results_folder: str | None, n_trials: int) -> str:
    """``python -m hpsearch.run`` continuing the study with ``n_trials`` in all."""
    if results_folder is None:
        return f"python -m hpsearch.run <study file> --n-trials {n_trials}"
    layout = ResultsLayout.at(results_folder)
    return (
        f"python -m hpsearch.run {shlex.quote(layout.config_copy.as_posix())} "
        f"--results-dir {shlex.quote(layout.root.parent.as_posix())} --n-trials {n_trials}"
    )


# ---------------------------------------------------------------------------------------------
# Every trial
# ---------------------------------------------------------------------------------------------


def _trial_row(trial: FrozenTrial, retired: set[int]) -> TrialRow:
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
        # A trial that fell out of the kept set has no file left to point at.
        checkpoint=None if trial.number in retired else attr_str(trial, attrs.CHECKPOINT),
        fail_reason=attr_str(trial, attrs.FAIL_REASON),
        params=searched_params(trial),
    )
