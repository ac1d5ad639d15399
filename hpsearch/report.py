"""Study -> report data (pure), and ``python -m hpsearch.report`` to rebuild the report.

A study exists to answer one question: which architecture, with which settings, is best, and
by how much. :func:`compute_report` turns a study, plus the test-split numbers the core measured
on each architecture's best checkpoint, into plain data (NamedTuples and one dataclass) that
tests can check directly. :mod:`hpsearch.report_render` turns that data into ``report.html``,
``report.md``, ``architectures.csv`` and ``trials.csv`` (:func:`write_report`, re-exported
here); the figures are drawn by :mod:`hpsearch.report_figures`.

Architectures are ranked by their best *validation* value only. The test split is evaluated for
the report and never influences the ranking or the winner.

Command line::

    python -m hpsearch.report <study file | results folder> [--results-dir DIR] [--no-seeds]

rebuilds the report from the storage and the checkpoints at any time, also while the study is
still running.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpsearch.config import ConfigError, StudyConfig
from hpsearch.storage import locate, open_storage, storage_url

if TYPE_CHECKING:
    # Served lazily by __getattr__ below: report_render imports this module.
    from hpsearch.report_render import write_report

__all__ = [
    "ARCHITECTURE_PARAM",
    "DASH",
    "GAP_RULE",
    "MIN_TRIALS_FOR_IMPORTANCE",
    "UNKNOWN_ARCHITECTURE",
    "ArchitectureSummary",
    "GapVerdict",
    "Importances",
    "IntermediateCurve",
    "LearningCurve",
    "OptimizationHistory",
    "ParallelAxis",
    "ParallelCoordinates",
    "ReportData",
    "SeedSummary",
    "StateCounts",
    "Timeline",
    "TimelineBar",
    "TimelineLane",
    "TrialRow",
    "ValuePoints",
    "Winner",
    "compute_report",
    "fmt_ci",
    "fmt_num",
    "main",
    "seed_summary",
    "t_quantile_975",
    "write_report",
]

ARCHITECTURE_PARAM = "architecture"
UNKNOWN_ARCHITECTURE = "(unknown)"
# PED-ANOVA looks at the top 10% of trials; below this many it ranks noise.
MIN_TRIALS_FOR_IMPORTANCE = 10
GAP_RULE = (
    "the 95% Student-t confidence intervals of the two architectures' seed-retrain test "
    "metrics do not overlap"
)
DASH = "–"

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30.
_T_975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
    2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
    2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
    2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)
_Z_975 = 1.959963984540054


# ---------------------------------------------------------------------------------------------
# Report data
# ---------------------------------------------------------------------------------------------


class StateCounts(NamedTuple):
    """How many trials ended in each state."""

    complete: int
    pruned: int
    failed: int
    running: int
    """RUNNING or WAITING: the report can be written while a study is still going."""

    @property
    def total(self) -> int:
        """All trials, whatever their state."""
        return self.complete + self.pruned + self.failed + self.running


class SeedSummary(NamedTuple):
    """Test metric of the best configuration retrained with fresh seeds."""

    values: tuple[float, ...]
    """Every retrain's test metric as given, NaN included."""
    n: int
    """Number of finite values that the mean and interval use."""
    mean: float | None
    ci_low: float | None
    """Lower end of the 95% Student-t interval; None with fewer than two finite values."""
    ci_high: float | None

    @property
    def half_width(self) -> float | None:
        """Half the interval's width, the ``x`` of ``mean ± x``; None without an interval."""
        if self.ci_low is None or self.ci_high is None:
            return None
        return (self.ci_high - self.ci_low) / 2


class ArchitectureSummary(NamedTuple):
    """One row of the per-architecture table."""

    architecture: str
    rank: int | None
    """1 = best validation value; None when the architecture has no complete trial."""
    counts: StateCounts
    best_trial: int | None
    best_value: float | None
    top_values: tuple[float, ...]
    """Values of the top ``top_n`` complete trials, best first."""
    top_median: float | None
    top_q1: float | None
    """25th percentile of ``top_values`` (numpy's linear interpolation)."""
    top_q3: float | None
    test_metric: float | None
    """Test-split metric of the best checkpoint, as measured by the core."""
    seeds: SeedSummary
    n_params: int | None
    best_epoch: int | None
    time_to_best: float | None
    """Training seconds until the end of the best epoch of the best trial."""
    total_train_seconds: float | None
    """Training seconds summed over every trial of this architecture, whatever its state."""
    best_params: dict[str, Any]
    checkpoint: str | None
    """Best trial's checkpoint, relative to the study's results folder."""
    from_pruned: bool = False
    """No trial of this architecture completed: the row describes its best pruned trial
    (best value over the epochs it ran), ranked after every architecture that completed."""


class GapVerdict(NamedTuple):
    """Is the gap between the two best architectures larger than seed noise?"""

    leader: str | None
    runner_up: str | None
    difference: float | None
    """Leader's seed mean minus the runner-up's, in the test metric's units."""
    verdict: Literal["separated", "within noise", "reversed", "n/a"]
    text: str


class Winner(NamedTuple):
    """The best architecture's best trial, and how to load it."""

    architecture: str
    trial_number: int
    value: float
    params: dict[str, Any]
    best_epoch: int | None
    test_metric: float | None
    seeds: SeedSummary
    checkpoint: str | None
    """As recorded by the trial: relative to the results folder, or None if not kept."""
    checkpoint_path: str | None
    """``checkpoint`` joined to the results folder, when that folder is known."""
    load_call: str


class TrialRow(NamedTuple):
    """One row of ``trials.csv``."""

    number: int
    architecture: str
    state: str
    value: float | None
    best_epoch: int | None
    n_params: int | None
    train_seconds: float | None
    time_to_best: float | None
    device: str | None
    worker: str | None
    datetime_start: datetime | None
    datetime_complete: datetime | None
    checkpoint: str | None
    fail_reason: str | None
    params: dict[str, Any]


class ValuePoints(NamedTuple):
    """Validation values of one architecture's complete trials."""

    architecture: str
    trial_numbers: tuple[int, ...]
    values: tuple[float, ...]


class LearningCurve(NamedTuple):
    """Per-epoch history of one architecture's best trial."""

    architecture: str
    trial_number: int
    epochs: tuple[int, ...]
    train_loss: tuple[float, ...]
    val_loss: tuple[float, ...]
    metric: tuple[float, ...]
    best_epoch: int | None


class OptimizationHistory(NamedTuple):
    """Complete trials in trial-number order, with the best value so far."""

    trial_numbers: tuple[int, ...]
    architectures: tuple[str, ...]
    values: tuple[float, ...]
    best_so_far: tuple[float, ...]


class IntermediateCurve(NamedTuple):
    """Values a trial reported per epoch (step = epoch)."""

    trial_number: int
    architecture: str
    state: str
    steps: tuple[int, ...]
    values: tuple[float, ...]


class Importances(NamedTuple):
    """PED-ANOVA parameter importances over one scope of complete trials."""

    scope: str
    """"all architectures" or one architecture's name."""
    items: tuple[tuple[str, float], ...]
    """(parameter, importance), most important first; empty when skipped."""
    n_trials: int
    note: str | None
    """Why the scope was skipped, or what the evaluator warned about."""


class ParallelAxis(NamedTuple):
    """One axis of a parallel-coordinates plot."""

    label: str
    values: tuple[float, ...]
    tick_values: tuple[float, ...] | None
    """Set for categorical parameters, which are drawn as category indices."""
    tick_labels: tuple[str, ...] | None


class ParallelCoordinates(NamedTuple):
    """Parameters and value of every complete trial in one scope."""

    scope: str
    axes: tuple[ParallelAxis, ...]
    values: tuple[float, ...]
    note: str | None


class TimelineBar(NamedTuple):
    """One trial's time on a worker."""

    trial_number: int
    architecture: str
    state: str
    lane: str
    start: datetime
    end: datetime
    """``datetime_complete``, or the report time for a trial still running."""


class TimelineLane(NamedTuple):
    """One (worker, device) pair and how busy it was."""

    name: str
    worker: str
    device: str
    busy_seconds: float
    utilization: float | None
    """Busy time over the study's whole span (first start to last end)."""


class Timeline(NamedTuple):
    bars: tuple[TimelineBar, ...]
    lanes: tuple[TimelineLane, ...]
    start: datetime | None
    end: datetime | None


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows, computed from a study; no I/O, no drawing."""

    study_name: str
    direction: Literal["minimize", "maximize"]
    metric: str
    """Monitored validation metric, e.g. ``val_acc``; a trial's value is its best epoch's."""
    test_metric_name: str
    top_n: int
    generated_at: datetime
    results_dir: str | None
    counts: StateCounts
    architectures: tuple[ArchitectureSummary, ...]
    """Ranked by best validation value; architectures without complete trials come last."""
    winner: Winner | None
    gap: GapVerdict
    trials: tuple[TrialRow, ...]
    param_names: tuple[str, ...]
    value_points: tuple[ValuePoints, ...]
    learning_curves: tuple[LearningCurve, ...]
    history: OptimizationHistory
    intermediate: tuple[IntermediateCurve, ...]
    importances: tuple[Importances, ...]
    parallel: tuple[ParallelCoordinates, ...]
    timeline: Timeline

    @property
    def maximize(self) -> bool:
        """Whether a larger value is better."""
        return self.direction == "maximize"

    @property
    def architecture_names(self) -> tuple[str, ...]:
        """Architecture names in table order."""
        return tuple(a.architecture for a in self.architectures)

    def architecture(self, name: str) -> ArchitectureSummary:
        """Return the summary row of architecture ``name``.

        Raises:
            KeyError: If the study has no trial of that architecture.
        """
        for summary in self.architectures:
            if summary.architecture == name:
                return summary
        raise KeyError(f"no architecture {name!r}; the study has {list(self.architecture_names)}")


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def t_quantile_975(df: int) -> float:
    """Return the 0.975 quantile of Student's t with ``df`` degrees of freedom.

    Exact to six decimals for ``df <= 30`` (table), and within 1e-7 above that (the
    Cornish-Fisher expansion around the normal quantile, four terms).

    Args:
        df: Degrees of freedom, at least 1.

    Raises:
        ValueError: If ``df`` is below 1.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def seed_summary(values: Iterable[float]) -> SeedSummary:
    """Mean and 95% Student-t confidence interval of seed-retrain test metrics.

    Non-finite values (a diverged retrain) are kept in ``values`` but left out of the mean and
    interval. One finite value gives a mean without an interval.

    Args:
        values: Test metric of each retrain.

    Returns:
        The summary; ``mean`` is None when no value is finite.
    """
    raw = tuple(float(v) for v in values)
    finite = [v for v in raw if math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return SeedSummary(raw, 0, None, None, None)
    mean = math.fsum(finite) / n
    if n == 1:
        return SeedSummary(raw, 1, mean, None, None)
    half = t_quantile_975(n - 1) * statistics.stdev(finite) / math.sqrt(n)
    return SeedSummary(raw, n, mean, mean - half, mean + half)


def _gap_verdict(
    ranked: Sequence[ArchitectureSummary], *, maximize: bool, test_metric_name: str
) -> GapVerdict:
    if len(ranked) < 2:
        return GapVerdict(
            ranked[0].architecture if ranked else None,
            None,
            None,
            "n/a",
            "Fewer than two architectures have a complete trial; there is no gap to judge.",
        )
    lead, second = ranked[0], ranked[1]
    a, b = lead.seeds, second.seeds
    if a.ci_low is None or b.ci_low is None or a.ci_high is None or b.ci_high is None:
        return GapVerdict(
            lead.architecture,
            second.architecture,
            None if a.mean is None or b.mean is None else a.mean - b.mean,
            "n/a",
            f"Cannot judge {lead.architecture} vs {second.architecture}: a confidence interval "
            f"needs at least 2 finite seed retrains each (have {a.n} and {b.n}).",
        )
    assert a.mean is not None and b.mean is not None
    difference = a.mean - b.mean
    leader_ahead = difference > 0 if maximize else difference < 0
    overlap = a.ci_low <= b.ci_high and b.ci_low <= a.ci_high
    intervals = (
        f"{lead.architecture} {fmt_ci(a)} vs {second.architecture} {fmt_ci(b)} "
        f"({test_metric_name}, 95% CI)"
    )
    if overlap:
        verdict: Literal["separated", "within noise", "reversed"] = "within noise"
        text = (
            f"The gap between {lead.architecture} and {second.architecture} is within seed "
            f"noise: the intervals overlap, {intervals}."
        )
    elif leader_ahead:
        verdict = "separated"
        text = (
            f"{lead.architecture} beats {second.architecture} by {fmt_num(abs(difference))} "
            f"{test_metric_name}, more than seed noise: the intervals do not overlap, "
            f"{intervals}."
        )
    else:
        verdict = "reversed"
        text = (
            f"Reversed on the test split: {second.architecture} beats {lead.architecture} by "
            f"{fmt_num(abs(difference))} {test_metric_name} beyond seed noise, although "
            f"{lead.architecture} had the best validation value; {intervals}."
        )
    return GapVerdict(lead.architecture, second.architecture, difference, verdict, text)

# ---------------------------------------------------------------------------------------------
# Numbers as text (the verdict's wording here, the tables in report_render)
# ---------------------------------------------------------------------------------------------


def fmt_num(value: float | None, digits: int = 4) -> str:
    """``digits`` significant digits; a dash for None, ``NaN`` for NaN."""
    if value is None:
        return DASH
    if math.isnan(value):
        return "NaN"
    return f"{value:.{digits}g}"


def fmt_ci(seeds: SeedSummary) -> str:
    """``mean ± half-width [low, high]``, or ``mean (CI n/a)`` with a single finite seed."""
    if seeds.mean is None:
        return DASH
    if seeds.half_width is None:
        return f"{fmt_num(seeds.mean)} (CI n/a)"
    return (
        f"{fmt_num(seeds.mean)} ± {fmt_num(seeds.half_width, 2)} "
        f"[{fmt_num(seeds.ci_low)}, {fmt_num(seeds.ci_high)}]"
    )


# ---------------------------------------------------------------------------------------------
# Study -> report data
# ---------------------------------------------------------------------------------------------


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
    if top_n < 1:
        raise ValueError(f"report top_n must be at least 1, got {top_n}")
    if len(study.directions) != 1:
        raise ValueError(
            f"the report needs a single-objective study; {study.study_name!r} has "
            f"{len(study.directions)} objectives"
        )
    maximize = study.direction == StudyDirection.MAXIMIZE
    now = now if now is not None else datetime.now()
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)

    by_arch: dict[str, list[FrozenTrial]] = {}
    for trial in trials:
        by_arch.setdefault(_architecture_of(trial), []).append(trial)
    _check_known_architectures("test_metrics", test_metrics, by_arch)
    _check_known_architectures("seed_metrics", seed_metrics, by_arch)

    summaries = _rank(
        [
            _summarize_architecture(
                name,
                arch_trials,
                maximize=maximize,
                top_n=top_n,
                test_metric=_as_float(test_metrics.get(name)),
                seeds=seed_summary(seed_metrics.get(name, ())),
            )
            for name, arch_trials in by_arch.items()
        ],
        maximize=maximize,
    )
    ranked = [s for s in summaries if s.rank is not None]
    results_folder = None if results_dir is None else Path(results_dir).as_posix()
    complete_by_arch = {
        name: [t for t in ts if _complete_value(t) is not None] for name, ts in by_arch.items()
    }
    order = [s.architecture for s in summaries]

    return ReportData(
        study_name=study.study_name,
        direction="maximize" if maximize else "minimize",
        metric=metric,
        test_metric_name=test_metric_name,
        top_n=top_n,
        generated_at=now,
        results_dir=results_folder,
        counts=_count_states(trials),
        architectures=tuple(summaries),
        winner=(
            _winner(ranked[0], study.study_name, results_folder)
            if ranked and not ranked[0].from_pruned else None
        ),
        gap=_gap_verdict(ranked, maximize=maximize, test_metric_name=test_metric_name),
        trials=tuple(_trial_row(t) for t in trials),
        param_names=tuple(
            sorted({p for t in trials for p in t.params} - {ARCHITECTURE_PARAM})
        ),
        value_points=tuple(
            ValuePoints(
                name,
                tuple(t.number for t in complete_by_arch[name]),
                tuple(_complete_value(t) or 0.0 for t in complete_by_arch[name]),
            )
            for name in order
        ),
        learning_curves=tuple(
            _learning_curve(s, by_arch[s.architecture], metric) for s in ranked
        ),
        history=_optimization_history(trials, maximize=maximize),
        intermediate=tuple(
            IntermediateCurve(
                t.number,
                _architecture_of(t),
                t.state.name,
                tuple(sorted(t.intermediate_values)),
                tuple(t.intermediate_values[s] for s in sorted(t.intermediate_values)),
            )
            for t in trials
            if t.intermediate_values
        ),
        importances=_all_importances(complete_by_arch, order, study.direction),
        parallel=_all_parallel(complete_by_arch, order),
        timeline=_timeline(trials, now),
    )


def _architecture_of(trial: FrozenTrial) -> str:
    name = trial.params.get(ARCHITECTURE_PARAM, trial.user_attrs.get("architecture"))
    return UNKNOWN_ARCHITECTURE if name is None else str(name)


def _check_known_architectures(
    what: str, given: Mapping[str, object], known: Mapping[str, object]
) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(
            f"{what} names architectures the study has no trial of: {unknown}; "
            f"the study has {sorted(known)}"
        )


def _as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def _as_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def _as_str(value: object) -> str | None:
    return None if value is None else str(value)


def _complete_value(trial: FrozenTrial) -> float | None:
    """The trial's value if it is complete and finite; NaN and inf are never "best"."""
    if trial.state != TrialState.COMPLETE or trial.value is None:
        return None
    return trial.value if math.isfinite(trial.value) else None


def _history(trial: FrozenTrial) -> list[Mapping[str, Any]]:
    raw = trial.user_attrs.get("history")
    if not isinstance(raw, list):
        return []
    return [entry for entry in raw if isinstance(entry, Mapping)]


def _time_to_best(trial: FrozenTrial) -> float | None:
    best_epoch = _as_int(trial.user_attrs.get("best_epoch"))
    if best_epoch is None:
        return None
    # Look the epoch up rather than index: a resumed history may not start at epoch 0.
    for entry in _history(trial):
        if entry.get("epoch") == best_epoch:
            return _as_float(entry.get("seconds"))
    return None


def _train_seconds(trial: FrozenTrial) -> float | None:
    seconds = _as_float(trial.user_attrs.get("train_seconds"))
    if seconds is None:
        history = _history(trial)
        # A trial killed mid-run may have a history but no final train_seconds.
        seconds = _as_float(history[-1].get("seconds")) if history else None
    return seconds


def _count_states(trials: Sequence[FrozenTrial]) -> StateCounts:
    states = Counter(t.state for t in trials)
    return StateCounts(
        complete=states[TrialState.COMPLETE],
        pruned=states[TrialState.PRUNED],
        failed=states[TrialState.FAIL],
        running=states[TrialState.RUNNING] + states[TrialState.WAITING],
    )


def _sort_key(value: float, maximize: bool) -> float:
    return -value if maximize else value


def _summarize_architecture(
    name: str,
    trials: Sequence[FrozenTrial],
    *,
    maximize: bool,
    top_n: int,
    test_metric: float | None,
    seeds: SeedSummary,
) -> ArchitectureSummary:
    complete = [t for t in trials if _complete_value(t) is not None]
    # Ties go to the earlier trial, as Optuna's best_trial does.
    complete.sort(key=lambda t: (_sort_key(_complete_value(t) or 0.0, maximize), t.number))
    top = tuple(_complete_value(t) or 0.0 for t in complete[:top_n])
    times = [s for s in (_train_seconds(t) for t in trials) if s is not None]
    best = complete[0] if complete else None
    best_value = _complete_value(best) if best else None
    from_pruned = False
    if best is None:
        # Every trial was pruned: describe the best of them rather than leave a blank row.
        pruned = [t for t in trials if t.state == TrialState.PRUNED
                  and _pruned_value(t) is not None]
        pruned.sort(key=lambda t: (_sort_key(_pruned_value(t) or 0.0, maximize), t.number))
        if pruned:
            best, best_value, from_pruned = pruned[0], _pruned_value(pruned[0]), True
    q1, q3 = (float(q) for q in np.percentile(top, [25, 75])) if top else (None, None)
    return ArchitectureSummary(
        architecture=name,
        rank=None,
        counts=_count_states(trials),
        best_trial=best.number if best else None,
        best_value=best_value,
        top_values=top,
        top_median=statistics.median(top) if top else None,
        top_q1=q1,
        top_q3=q3,
        test_metric=test_metric,
        seeds=seeds,
        n_params=_as_int(best.user_attrs.get("n_params")) if best else None,
        best_epoch=_as_int(best.user_attrs.get("best_epoch")) if best else None,
        time_to_best=_time_to_best(best) if best else None,
        total_train_seconds=math.fsum(times) if times else None,
        best_params=(
            {k: v for k, v in best.params.items() if k != ARCHITECTURE_PARAM} if best else {}
        ),
        checkpoint=_as_str(best.user_attrs.get("checkpoint")) if best else None,
        from_pruned=from_pruned,
    )


def _pruned_value(trial: FrozenTrial) -> float | None:
    value = _as_float(trial.user_attrs.get("best_value"))
    return value if value is not None and math.isfinite(value) else None


def _rank(
    summaries: Sequence[ArchitectureSummary], *, maximize: bool
) -> list[ArchitectureSummary]:
    with_value = sorted(
        (s for s in summaries if s.best_value is not None),
        # Ties go to the earlier trial, so the winner is always Optuna's best_trial.
        key=lambda s: (s.from_pruned, _sort_key(s.best_value or 0.0, maximize), s.best_trial,
                       s.architecture),
    )
    without = sorted(
        (s for s in summaries if s.best_value is None), key=lambda s: s.architecture
    )
    return [s._replace(rank=i) for i, s in enumerate(with_value, start=1)] + without


def _winner(best: ArchitectureSummary, study_name: str, results_folder: str | None) -> Winner:
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
        # json.dumps quotes and escapes the path into a valid Python string literal.
        load_call=f"hpsearch.load_best_model({json.dumps(folder)})",
    )


def _trial_row(trial: FrozenTrial) -> TrialRow:
    attrs = trial.user_attrs
    return TrialRow(
        number=trial.number,
        architecture=_architecture_of(trial),
        state=trial.state.name,
        value=trial.value if trial.state == TrialState.COMPLETE else None,
        best_epoch=_as_int(attrs.get("best_epoch")),
        n_params=_as_int(attrs.get("n_params")),
        train_seconds=_train_seconds(trial),
        time_to_best=_time_to_best(trial),
        device=_as_str(attrs.get("device")),
        worker=_as_str(attrs.get("worker")),
        datetime_start=trial.datetime_start,
        datetime_complete=trial.datetime_complete,
        checkpoint=_as_str(attrs.get("checkpoint")),
        fail_reason=_as_str(attrs.get("fail_reason")),
        params={k: v for k, v in trial.params.items() if k != ARCHITECTURE_PARAM},
    )


def _epoch_of(entry: Mapping[str, Any], index: int) -> int:
    epoch = _as_int(entry.get("epoch"))
    return index if epoch is None else epoch


def _float_or_nan(value: object) -> float:
    number = _as_float(value)
    return math.nan if number is None else number


def _learning_curve(
    summary: ArchitectureSummary, trials: Sequence[FrozenTrial], metric: str
) -> LearningCurve:
    best = next(t for t in trials if t.number == summary.best_trial)
    history = _history(best)
    return LearningCurve(
        architecture=summary.architecture,
        trial_number=best.number,
        epochs=tuple(_epoch_of(e, i) for i, e in enumerate(history)),
        train_loss=tuple(_float_or_nan(e.get("train_loss")) for e in history),
        val_loss=tuple(_float_or_nan(e.get("val_loss")) for e in history),
        metric=tuple(_float_or_nan(e.get(metric)) for e in history),
        best_epoch=summary.best_epoch,
    )


def _optimization_history(trials: Sequence[FrozenTrial], *, maximize: bool) -> OptimizationHistory:
    numbers: list[int] = []
    archs: list[str] = []
    values: list[float] = []
    best_so_far: list[float] = []
    best = math.inf
    for trial in trials:
        value = _complete_value(trial)
        if value is None:
            continue
        if _sort_key(value, maximize) < best:
            best = _sort_key(value, maximize)
        numbers.append(trial.number)
        archs.append(_architecture_of(trial))
        values.append(value)
        best_so_far.append(-best if maximize else best)
    return OptimizationHistory(tuple(numbers), tuple(archs), tuple(values), tuple(best_so_far))


def _all_importances(
    complete_by_arch: Mapping[str, Sequence[FrozenTrial]],
    order: Sequence[str],
    direction: StudyDirection,
) -> tuple[Importances, ...]:
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
        {k: d for k, d in t.distributions.items() if keep_architecture or k != ARCHITECTURE_PARAM}
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


def _all_parallel(
    complete_by_arch: Mapping[str, Sequence[FrozenTrial]], order: Sequence[str]
) -> tuple[ParallelCoordinates, ...]:
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
        names.discard(ARCHITECTURE_PARAM)
        seen.discard(ARCHITECTURE_PARAM)
    ordered = sorted(names, key=lambda n: (n != ARCHITECTURE_PARAM, n))
    note = None
    if seen - names:
        note = "not shown (set in only some trials): " + ", ".join(sorted(seen - names))
    axes = tuple(_parallel_axis(name, trials) for name in ordered)
    return ParallelCoordinates(scope, axes, tuple(_complete_value(t) or 0.0 for t in trials), note)


def _parallel_axis(name: str, trials: Sequence[FrozenTrial]) -> ParallelAxis:
    raw = [t.params[name] for t in trials]
    dist: BaseDistribution = trials[0].distributions[name]
    if isinstance(dist, CategoricalDistribution) or not all(_as_float(v) is not None for v in raw):
        numeric = all(_as_float(v) is not None for v in raw)
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


def _timeline(trials: Sequence[FrozenTrial], now: datetime) -> Timeline:
    bars: list[TimelineBar] = []
    lanes: dict[str, tuple[str, str]] = {}
    for trial in trials:
        if trial.datetime_start is None:
            continue
        worker = _as_str(trial.user_attrs.get("worker")) or "unknown worker"
        device = _as_str(trial.user_attrs.get("device")) or "unknown device"
        lane = f"{worker} · {device}"
        lanes[lane] = (worker, device)
        end = trial.datetime_complete or max(now, trial.datetime_start)
        bars.append(
            TimelineBar(
                trial.number, _architecture_of(trial), trial.state.name, lane,
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

def __getattr__(name: str) -> Any:
    # write_report lives in report_render, which imports this module; importing it on first
    # use keeps `from hpsearch.report import compute_report, write_report` free of a cycle.
    if name == "write_report":
        from hpsearch import report_render

        return report_render.write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpsearch.report",
        description="Rebuild a study's report from its storage and checkpoints; works while "
        "the study is still running.",
    )
    p.add_argument("study", help="the study's YAML file, or its results folder")
    p.add_argument(
        "--results-dir", default="results",
        help="results root when given a study file (default: results/)",
    )
    p.add_argument("--no-seeds", action="store_true", help="skip the seed retrains")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the report of a study file or results folder; returns the exit status.

    Bad arguments (no such file, not a results folder, a malformed study file, no study in
    the storage) print one line to stderr and return 2.
    """
    args = _parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The measuring side (training, workers, joblib) is needed only here; importing it late
    # keeps this module pure data for its other importers and out of a cycle with confirm.
    from hpsearch.confirm import make_report
    from hpsearch.report_render import ReportWriteError
    from hpsearch.workers import plan_slots

    try:
        config, results_dir, study = _open_study(args.study, args.results_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.no_seeds:
        config = config.model_copy(
            update={"report": config.report.model_copy(update={"seeds": 0})}
        )
    try:
        paths = make_report(config, study, results_dir, plan_slots(config.resources))
    except ReportWriteError as err:
        print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 1
    for path in paths.values():
        print(f"wrote {path}")
    print(_winner_line(study, config.study.metric, results_dir))
    return 0


def _open_study(path: str, results_root: str) -> tuple[StudyConfig, Path, optuna.Study]:
    config, results_dir = locate(path, results_root)
    if not results_dir.is_dir():
        raise ConfigError(
            str(results_dir), "", "no results folder (has the study run? if its results are "
            "elsewhere, pass --results-dir)"
        )
    url = storage_url(config, results_dir)
    journal = "://" not in url or url.startswith("file://")
    # Opening a journal creates it; a report must not leave an empty study behind.
    if journal and not Path(url.removeprefix("file://")).exists():
        raise ConfigError(url, "", "no study journal here (has the study run yet?)")
    try:
        study = optuna.load_study(
            study_name=config.study.name, storage=open_storage(url, config)
        )
    except KeyError:
        raise ConfigError(
            url, "study.name", f"no study {config.study.name!r} in this storage"
        ) from None
    return config, results_dir, study


def _winner_line(study: optuna.Study, metric: str, results_dir: Path) -> str:
    maximize = study.direction == StudyDirection.MAXIMIZE
    complete = [t for t in study.get_trials(deepcopy=False) if _complete_value(t) is not None]
    if not complete:
        return "winner: none yet (no complete trial)"
    # The report's order: best value, then architecture name, then the earlier trial.
    best = min(
        complete,
        key=lambda t: (_sort_key(t.value or 0.0, maximize), _architecture_of(t), t.number),
    )
    return (
        f"winner: {_architecture_of(best)} (trial {best.number}, best {metric} "
        f"{fmt_num(best.value)}); load it with "
        f"hpsearch.load_best_model({json.dumps(results_dir.as_posix())})"
    )


if __name__ == "__main__":
    sys.exit(main())
