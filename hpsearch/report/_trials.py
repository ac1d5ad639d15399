"""What the report reads from one trial: its architecture, recorded attributes and history.

Attributes are read defensively (a study may hold trials from older runs or written by hand):
a missing or mistyped attribute reads as None, never as an exception.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from hpsearch import attrs, ranking
from hpsearch.report.data import UNKNOWN_ARCHITECTURE, StateCounts

# Keys of one entry of a trial's ``history`` attribute (written by the trainer).
EPOCH = "epoch"
SECONDS = "seconds"


def architecture(trial: FrozenTrial) -> str:
    """The trial's architecture, or :data:`UNKNOWN_ARCHITECTURE` when it records none."""
    name = ranking.architecture_of(trial)
    return UNKNOWN_ARCHITECTURE if name is None else name


def by_architecture(trials: Iterable[FrozenTrial]) -> dict[str, list[FrozenTrial]]:
    """Trials grouped by architecture, in order of each architecture's first trial."""
    groups: dict[str, list[FrozenTrial]] = {}
    for trial in trials:
        groups.setdefault(architecture(trial), []).append(trial)
    return groups


def searched_params(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's parameters without the architecture (shown as a column of its own)."""
    return {k: v for k, v in trial.params.items() if k != attrs.ARCHITECTURE}


def as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def as_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def as_str(value: object) -> str | None:
    return None if value is None else str(value)


def float_or_nan(value: object) -> float:
    number = as_float(value)
    return math.nan if number is None else number


def attr_int(trial: FrozenTrial, name: str) -> int | None:
    return as_int(trial.user_attrs.get(name))


def attr_str(trial: FrozenTrial, name: str) -> str | None:
    return as_str(trial.user_attrs.get(name))


def history(trial: FrozenTrial) -> list[Mapping[str, Any]]:
    """The trial's per-epoch records; empty when it has none."""
    raw = trial.user_attrs.get(attrs.HISTORY)
    if not isinstance(raw, list):
        return []
    return [entry for entry in raw if isinstance(entry, Mapping)]


def epoch_of(entry: Mapping[str, Any], index: int) -> int:
    epoch = as_int(entry.get(EPOCH))
    return index if epoch is None else epoch


def last_epoch(trial: FrozenTrial) -> int | None:
    """The last epoch the trial trained: its history's last record, else its last report."""
    records = history(trial)
    if records:
        return epoch_of(records[-1], len(records) - 1)
    return max(trial.intermediate_values) if trial.intermediate_values else None


def epochs_trained(trial: FrozenTrial) -> int:
    """How many epochs the trial trained (the records of its history)."""
    return len(history(trial))


def time_to_best(trial: FrozenTrial) -> float | None:
    """Training seconds until the end of the trial's best epoch."""
    best_epoch = attr_int(trial, attrs.BEST_EPOCH)
    if best_epoch is None:
        return None
    # Look the epoch up rather than index: a resumed history may not start at epoch 0.
    for entry in history(trial):
        if entry.get(EPOCH) == best_epoch:
            return as_float(entry.get(SECONDS))
    return None


def train_seconds(trial: FrozenTrial) -> float | None:
    """Training seconds the trial spent, whatever its state."""
    seconds = as_float(trial.user_attrs.get(attrs.TRAIN_SECONDS))
    if seconds is None:
        records = history(trial)
        # A trial killed mid-run may have a history but no final train_seconds.
        seconds = as_float(records[-1].get(SECONDS)) if records else None
    return seconds


def count_states(trials: Sequence[FrozenTrial]) -> StateCounts:
    states = Counter(t.state for t in trials)
    return StateCounts(
        complete=states[TrialState.COMPLETE],
        pruned=states[TrialState.PRUNED],
        failed=states[TrialState.FAIL],
        running=states[TrialState.RUNNING] + states[TrialState.WAITING],
    )
