"""Study trials -> the data behind each figure of the report (pure; drawing is in
:mod:`hpsearch.report.figures`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpsearch import attrs
from hpsearch.metrics import named
from hpsearch.ranking import complete_value
from hpsearch.report._trials import (
    architecture,
    as_float,
    as_str,
    epoch_of,
    epochs_trained,
    float_or_nan,
    history,
)
from hpsearch.report.data import (
    MIN_TRIALS_FOR_IMPORTANCE,
    ArchitectureEffort,
    ArchitectureSummary,
    Importances,
    IntermediateCurve,
    LearningCurve,
    OptimizationHistory,
    ParallelAxis,
    ParallelCoordinates,
    Timeline,
    TimelineBar,
    TimelineLane,
    ValuePoints,
)

TRAIN_LOSS = named("train", "loss")
VAL_LOSS = named("val", "loss")


def value_points(
    complete_by_arch: Mapping[str, Sequence[FrozenTrial]], order: Sequence[str]
) -> tuple[ValuePoints, ...]:
    """Each architecture's complete trials and their values, architectures in table order."""
    return tuple(
        ValuePoints(
            name,
            tuple(t.number for t in complete_by_arch[name]),
            tuple(complete_value(t) or 0.0 for t in complete_by_arch[name]),
        )
        for name in order
    )


def intermediate_curves(trials: Sequence[FrozenTrial]) -> tuple[IntermediateCurve, ...]:
    """What each trial reported per epoch, for trials that reported anything."""
    return tuple(
        IntermediateCurve(
            t.number,
            architecture(t),
            t.state.name,
            tuple(sorted(t.intermediate_values)),
            tuple(t.intermediate_values[s] for s in sorted(t.intermediate_values)),
        )
        for t in trials
        if t.intermediate_values
    )


def learning_curve(
    summary: ArchitectureSummary, trials: Sequence[FrozenTrial], metric: str
) -> LearningCurve:
    """The per-epoch history of the trial that ``summary`` describes."""
    best = next(t for t in trials if t.number == summary.best_trial)
    records = history(best)
    return LearningCurve(
        architecture=summary.architecture,
        trial_number=best.number,
        epochs=tuple(epoch_of(e, i) for i, e in enumerate(records)),
        train_loss=tuple(float_or_nan(e.get(TRAIN_LOSS)) for e in records),
        val_loss=tuple(float_or_nan(e.get(VAL_LOSS)) for e in records),
        metric=tuple(float_or_nan(e.get(metric)) for e in records),
        best_epoch=summary.best_epoch,
    )


def optimization_history(trials: Sequence[FrozenTrial], *, maximize: bool) -> OptimizationHistory:
    """Complete trials in trial order, each with the best value up to and including it."""
    numbers: list[int] = []
    archs: list[str] = []
    values: list[float] = []
    best_so_far: list[float] = []
    best: float | None = None
    for trial in trials:
        value = complete_value(trial)
        if value is None:
            continue
        if best is None or (value > best if maximize else value < best):
            best = value
        numbers.append(trial.number)
        archs.append(architecture(trial))
        values.append(value)
        best_so_far.append(best)
    return OptimizationHistory(tuple(numbers), tuple(archs), tuple(values), tuple(best_so_far))


def all_importances(
    complete_by_arch: Mapping[str, Sequence[FrozenTrial]],
    order: Sequence[str],
    direction: StudyDirection,
) -> tuple[Importances, ...]:
    """PED-ANOVA importances over all architectures, then within each one."""
    everything = [t for name in order for t in complete_by_arch[name]]
    scopes = [_importances("all architectures", everything, direction, keep_architecture=True)]
    scopes += [
        _importances(name, complete_by_arch[name], direction, keep_architecture=False)
        for name in order
    ]
    return tuple(scopes)


def _importances(
    scope: str,
    trials: Sequence[FrozenTrial],
    direction: StudyDirection,
    *,
    keep_architecture: bool,
) -> Importances:
    n = len(trials)
    if n < MIN_TRIALS_FOR_IMPORTANCE:
        return Importances(
            scope,
            (),
            n,
            f"skipped: {n} complete trial(s), importances need at least "
            f"{MIN_TRIALS_FOR_IMPORTANCE}",
        )
    study = _importance_study(trials, direction, keep_architecture=keep_architecture)
    if not any(t.params for t in study.get_trials(deepcopy=False)):
        return Importances(scope, (), n, "skipped: no parameters were searched")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = optuna.importance.get_param_importances(study)
        # The evaluator is third-party numerics; a failure here costs one figure, not the report.
        except Exception as exc:  # noqa: BLE001
            return Importances(scope, (), n, f"skipped: {type(exc).__name__}: {exc}")
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    return Importances(
        scope,
        tuple((name, float(v)) for name, v in result.items()),
        n,
        " ".join(notes) or None,
    )


def _importance_study(
    trials: Sequence[FrozenTrial], direction: StudyDirection, *, keep_architecture: bool
) -> optuna.Study:
    # A throwaway in-memory study of bare copies: get_param_importances takes a study, and
    # copying only params and values keeps big histories out of the copy.
    storage = optuna.storages.InMemoryStorage()
    name = "hpsearch-report-importances"
    storage.create_new_study([direction], name)
    study = optuna.load_study(study_name=name, storage=storage)
    keep = [
        {k: d for k, d in t.distributions.items() if keep_architecture or k != attrs.ARCHITECTURE}
        for t in trials
    ]
    study.add_trials(
        [
            optuna.create_trial(
                value=t.value,
                params={k: t.params[k] for k in dists},
                distributions=dists,
            )
            for t, dists in zip(trials, keep)
        ]
    )
    return study


def all_parallel(
    complete_by_arch: Mapping[str, Sequence[FrozenTrial]], order: Sequence[str]
) -> tuple[ParallelCoordinates, ...]:
    """Parallel coordinates over all architectures, then within each one."""
    everything = [t for name in order for t in complete_by_arch[name]]
    scopes = [_parallel("all architectures", everything, keep_architecture=True)]
    scopes += [_parallel(n, complete_by_arch[n], keep_architecture=False) for n in order]
    return tuple(scopes)


def _parallel(
    scope: str, trials: Sequence[FrozenTrial], *, keep_architecture: bool
) -> ParallelCoordinates:
    if not trials:
        return ParallelCoordinates(scope, (), (), "no complete trials")
    names = set.intersection(*(set(t.params) for t in trials))
    seen = set.union(*(set(t.params) for t in trials))
    if not keep_architecture:
        names.discard(attrs.ARCHITECTURE)
        seen.discard(attrs.ARCHITECTURE)
    ordered = sorted(names, key=lambda n: (n != attrs.ARCHITECTURE, n))
    note = None
    if seen - names:
        note = "not shown (set in only some trials): " + ", ".join(sorted(seen - names))
    axes = tuple(_parallel_axis(name, trials) for name in ordered)
    return ParallelCoordinates(scope, axes, tuple(complete_value(t) or 0.0 for t in trials), note)


def _parallel_axis(name: str, trials: Sequence[FrozenTrial]) -> ParallelAxis:
    raw = [t.params[name] for t in trials]
    dist: BaseDistribution = trials[0].distributions[name]
    if isinstance(dist, CategoricalDistribution) or not all(as_float(v) is not None for v in raw):
        numeric = all(as_float(v) is not None for v in raw)
        categories = sorted({str(v) for v in raw}, key=lambda s: (float(s), s) if numeric else s)
        index = {c: float(i) for i, c in enumerate(categories)}
        return ParallelAxis(
            name,
            tuple(index[str(v)] for v in raw),
            tuple(index.values()),
            tuple(categories),
        )
    values = [float(v) for v in raw]
    # Parcoords has no log axis; plot log10 so a log-sampled lr spreads out.
    if getattr(dist, "log", False) and all(v > 0 for v in values):
        return ParallelAxis(f"log10({name})", tuple(math.log10(v) for v in values), None, None)
    return ParallelAxis(name, tuple(values), None, None)


def timeline(trials: Sequence[FrozenTrial], now: datetime) -> Timeline:
    """Each started trial as a bar on its (worker, device) lane, and each lane's busy share."""
    bars: list[TimelineBar] = []
    lanes: dict[str, tuple[str, str]] = {}
    for trial in trials:
        if trial.datetime_start is None:
            continue
        worker = as_str(trial.user_attrs.get(attrs.WORKER)) or "unknown worker"
        device = as_str(trial.user_attrs.get(attrs.DEVICE)) or "unknown device"
        lane = f"{worker} · {device}"
        lanes[lane] = (worker, device)
        end = trial.datetime_complete or max(now, trial.datetime_start)
        bars.append(
            TimelineBar(
                trial.number, architecture(trial), trial.state.name, lane,
                trial.datetime_start, end,
            )
        )
    if not bars:
        return Timeline((), (), None, None)
    start = min(b.start for b in bars)
    end = max(b.end for b in bars)
    span = (end - start).total_seconds()
    lane_rows = []
    for name in sorted(lanes):
        busy = _union_seconds([(b.start, b.end) for b in bars if b.lane == name])
        worker, device = lanes[name]
        utilization = busy / span if span > 0 else None
        lane_rows.append(TimelineLane(name, worker, device, busy, utilization))
    return Timeline(tuple(bars), tuple(lane_rows), start, end)


def _union_seconds(intervals: Sequence[tuple[datetime, datetime]]) -> float:
    """Length of the union of intervals, so overlapping trials on one lane count once."""
    total = 0.0
    current_start: datetime | None = None
    current_end: datetime | None = None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_start is not None and current_end is not None:
                total += (current_end - current_start).total_seconds()
            current_start, current_end = start, end
        elif end > current_end:
            current_end = end
    if current_start is not None and current_end is not None:
        total += (current_end - current_start).total_seconds()
    return total


def search_effort(
    trials: Sequence[FrozenTrial], order: Sequence[str], now: datetime
) -> tuple[ArchitectureEffort, ...]:
    """Cumulative trials and epochs of each architecture over time, architectures in
    ``order``.

    A trial counts from the time it finished, whatever its state (a failed trial was effort
    too), a running one at ``now`` with the epochs it has trained so far; a trial that never
    started (WAITING) does not count.
    """
    points: dict[str, list[tuple[datetime, int, str, int]]] = {name: [] for name in order}
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            moment = now
        elif trial.state == TrialState.WAITING or trial.datetime_complete is None:
            continue
        else:
            moment = trial.datetime_complete
        points.setdefault(architecture(trial), []).append(
            (moment, trial.number, trial.state.name, epochs_trained(trial))
        )
    efforts = []
    for name, entries in points.items():
        entries.sort(key=lambda e: (e[0], e[1]))
        cumulative_epochs, total = [], 0
        for entry in entries:
            total += entry[3]
            cumulative_epochs.append(total)
        efforts.append(
            ArchitectureEffort(
                architecture=name,
                times=tuple(e[0] for e in entries),
                trial_numbers=tuple(e[1] for e in entries),
                states=tuple(e[2] for e in entries),
                trials=tuple(range(1, len(entries) + 1)),
                epochs=tuple(cumulative_epochs),
            )
        )
    return tuple(efforts)
