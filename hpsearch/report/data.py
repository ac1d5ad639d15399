"""The report's data: plain NamedTuples (and one frozen dataclass) with no behaviour beyond a
few read-only conveniences, plus how numbers are written as text.

Every other module of :mod:`hpsearch.report` reads these types: :mod:`.compute` fills them from a
study, :mod:`.figures` draws them, :mod:`.render` writes them out. Nothing here reads a study or
a file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple

UNKNOWN_ARCHITECTURE = "(unknown)"
"""The architecture shown for trials that record none (counted, never ranked)."""
# PED-ANOVA looks at the top 10% of trials; below this many it ranks noise.
MIN_TRIALS_FOR_IMPORTANCE = 10
UNDER_EXPLORED = "under-explored"
"""The label of an architecture the search did not explore enough to judge."""
GAP_RULE = (
    "the 95% Student-t confidence intervals of the two architectures' seed-retrain test "
    "metrics do not overlap"
)
DASH = "–"


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

    @property
    def finished(self) -> int:
        """Trials that trained to an end, COMPLETE or PRUNED: what exploration counts."""
        return self.complete + self.pruned


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
    """One row of the per-architecture table.

    The row describes the architecture's *representative*
    (:func:`hpsearch.ranking.architecture_bests`): its trial with the best best-epoch
    validation value, pruned trials included, ties to the earlier trial. Its checkpoint gives
    ``test_metric`` and its configuration the seed retrains.
    """

    architecture: str
    rank: int | None
    """1 = best representative value among *explored* architectures; None for an
    under-explored architecture (never ranked: the search did not test it enough) and for one
    without a finished trial."""
    counts: StateCounts
    best_trial: int | None
    """The representative's trial number."""
    best_value: float | None
    """The representative's best-epoch validation value (a pruned trial's best before it was
    stopped)."""
    top_values: tuple[float, ...]
    """Values of the top ``top_n`` complete trials, best first."""
    top_median: float | None
    top_q1: float | None
    """25th percentile of ``top_values`` (numpy's linear interpolation)."""
    top_q3: float | None
    test_metric: float | None
    """Test-split metric of the representative's checkpoint (:mod:`hpsearch.report.measure`)."""
    seeds: SeedSummary
    n_params: int | None
    best_epoch: int | None
    """The epoch of the representative's best value."""
    time_to_best: float | None
    """Training seconds until the end of the representative's best epoch."""
    total_train_seconds: float | None
    """Training seconds summed over every trial of this architecture, whatever its state."""
    best_params: dict[str, Any]
    checkpoint: str | None
    """The representative's checkpoint, relative to the study's results folder."""
    from_pruned: bool = False
    """The representative is a PRUNED trial (its value is its best before it was stopped)."""
    pruned_at_epoch: int | None = None
    """The last epoch a pruned representative trained; None when it completed."""
    total_epochs: int = 0
    """Epochs trained, summed over every trial of this architecture (its search effort)."""
    explored: bool = True
    """Explored enough to be ranked and judged: at least ``min_trials`` finished trials (one
    at least), and a representative that was not pruned while still improving."""
    exploration_note: str | None = None
    """Why the architecture is not explored enough, e.g. ``2 of 4 finished trials``."""
    still_improving: bool = False
    """The representative was pruned at its best epoch, i.e. while still improving."""

    @property
    def n_trials(self) -> int:
        """Trials of this architecture, whatever their state."""
        return self.counts.total


class GapVerdict(NamedTuple):
    """Is the gap between the two best architectures larger than seed noise?"""

    leader: str | None
    runner_up: str | None
    difference: float | None
    """Leader's seed mean minus the runner-up's, in the test metric's units."""
    verdict: Literal["separated", "within noise", "reversed", "n/a"]
    text: str


class Exploration(NamedTuple):
    """Which architectures the search explored enough to judge, and how to explore the rest."""

    min_trials: int
    """``study.min_trials_per_architecture``: finished trials an architecture needs."""
    prune_within_architecture: bool | None
    """``study.prune_within_architecture``; None when unknown."""
    min_trials_to_prune: int | None
    """``study.min_trials_to_prune``; None when unknown."""
    sample_within_architecture: bool | None
    """Whether the sampler modelled each architecture on its own trials (TPE with
    ``study.sample_within_architecture``); None when unknown."""
    under_explored: tuple[str, ...]
    """Architectures the verdict does not judge, in table order."""
    trials_to_add: int
    """Sum over ``under_explored`` of ``min_trials`` minus its finished trials, at least one
    each (an architecture still improving when pruned needs at least one more)."""
    n_trials: int | None
    """The ``--n-trials`` to rerun with: the trials the study counts now plus
    ``trials_to_add``; None when nothing is under-explored."""
    command: str | None
    """The command that continues the study with ``n_trials``."""
    advice: str | None
    """Which architectures need more trials and why, as a sentence; the command follows it."""


class Verdict(NamedTuple):
    """What the report concludes, over explored architectures only."""

    best_architecture: str | None
    """The best explored architecture by representative value; None when none is explored."""
    text: str
    """The best architecture, the gap to the next one against seed noise, and how the winner
    relates to them; the exploration advice is in :class:`Exploration`."""


class Winner(NamedTuple):
    """The study's best COMPLETE trial (:func:`hpsearch.ranking.best_trial`, what ``best/``
    holds), and how to load it."""

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
    representative: bool = True
    """The trial is its architecture's representative, so ``test_metric`` and ``seeds`` are
    its own; when not (a pruned trial of the same architecture did better), both are unset."""


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


class ArchitectureEffort(NamedTuple):
    """One architecture's search effort over time: cumulative trials and epochs, one point
    per trial, in order of the time each trial finished (a running trial at the report time)."""

    architecture: str
    times: tuple[datetime, ...]
    trial_numbers: tuple[int, ...]
    states: tuple[str, ...]
    trials: tuple[int, ...]
    """Trials of this architecture finished (or running) by each time."""
    epochs: tuple[int, ...]
    """Epochs those trials trained, summed."""


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
    """Explored architectures by rank, then under-explored ones by representative value, then
    those without a finished trial by name."""
    winner: Winner | None
    gap: GapVerdict
    """The gap between the two best *explored* architectures against seed noise."""
    verdict: Verdict
    exploration: Exploration
    trials: tuple[TrialRow, ...]
    param_names: tuple[str, ...]
    value_points: tuple[ValuePoints, ...]
    learning_curves: tuple[LearningCurve, ...]
    history: OptimizationHistory
    intermediate: tuple[IntermediateCurve, ...]
    importances: tuple[Importances, ...]
    parallel: tuple[ParallelCoordinates, ...]
    timeline: Timeline
    effort: tuple[ArchitectureEffort, ...]
    """Search effort per architecture over time, architectures in table order."""

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
# Numbers as text (the verdict's wording, the tables, the command line)
# ---------------------------------------------------------------------------------------------


def fmt_num(value: float | None, digits: int = 4) -> str:
    """``digits`` significant digits; a dash for None, ``NaN`` for NaN."""
    if value is None:
        return DASH
    if math.isnan(value):
        return "NaN"
    return f"{value:.{digits}g}"


def fmt_best_value(summary: ArchitectureSummary) -> str:
    """An architecture's representative value, marked when it comes from a pruned trial:
    ``0.9412 (pruned at epoch 6)``."""
    text = fmt_num(summary.best_value)
    if summary.from_pruned:
        at = "" if summary.pruned_at_epoch is None else f" at epoch {summary.pruned_at_epoch}"
        text += f" (pruned{at})"
    return text


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


def load_call(results_folder: str) -> str:
    """The Python call that loads a study's best model from its results folder."""
    # json.dumps quotes and escapes the path into a valid Python string literal.
    return f"hpsearch.load_best_model({json.dumps(results_folder)})"
