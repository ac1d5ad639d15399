"""What "better" and "best" mean, in one place.

- An epoch improves on the best so far when its value is finite and beats it by more than
  ``min_delta`` (:func:`improves`); NaN and inf never do.
- Among trials, the best is the best value, ties going to the earlier trial: Optuna's own
  ``best_trial``. The study best (``best/``), the report's winner and ranking, the command
  line's winner line, the progress line, each architecture's best and retention all rank
  with :func:`rank_key`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

from optuna.trial import FrozenTrial, TrialState

from hpsearch import attrs

Mode = Literal["min", "max"]


def finite(value: object) -> float | None:
    """``value`` as a float when it is a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars
        except (TypeError, ValueError):
            return None
    return float(value) if math.isfinite(value) else None


def improves(value: float | None, best: float | None, mode: Mode | str,
             min_delta: float = 0.0) -> bool:
    """Whether an epoch's ``value`` improves on ``best``; the first finite value always does."""
    if value is None or not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def rank_key(value: float, number: int, minimize: bool) -> tuple[float, int]:
    """Sort key: better values first, ties to the earlier trial."""
    return (value if minimize else -value, number)


def ranks_before(value: float | None, number: int, other_value: float | None,
                 other_number: int, minimize: bool) -> bool:
    """Whether trial ``number`` outranks trial ``other_number`` (a non-finite value never
    does, and anything finite outranks a non-finite one)."""
    if value is None or not math.isfinite(value):
        return False
    if other_value is None or not math.isfinite(other_value):
        return True
    return rank_key(value, number, minimize) < rank_key(other_value, other_number, minimize)


def complete_value(trial: FrozenTrial) -> float | None:
    """A COMPLETE trial's finite value, else None."""
    return finite(trial.value) if trial.state == TrialState.COMPLETE else None


def pruned_value(trial: FrozenTrial) -> float | None:
    """A PRUNED trial's best-epoch value (its stored value is only its last report)."""
    if trial.state != TrialState.PRUNED:
        return None
    return finite(trial.user_attrs.get(attrs.BEST_VALUE))


def architecture_of(trial: FrozenTrial) -> str | None:
    name = trial.params.get(attrs.ARCHITECTURE, trial.user_attrs.get(attrs.ARCHITECTURE))
    return None if name is None else str(name)


def best_trial(trials: Iterable[FrozenTrial], minimize: bool) -> FrozenTrial | None:
    """The best COMPLETE trial with a finite value (Optuna's ``best_trial``), or None."""
    scored = [(v, t) for t in trials if (v := complete_value(t)) is not None]
    if not scored:
        return None
    return min(scored, key=lambda vt: rank_key(vt[0], vt[1].number, minimize))[1]


def sorted_complete(trials: Iterable[FrozenTrial], minimize: bool) -> list[FrozenTrial]:
    """COMPLETE trials with a finite value, best first."""
    scored = [(v, t) for t in trials if (v := complete_value(t)) is not None]
    scored.sort(key=lambda vt: rank_key(vt[0], vt[1].number, minimize))
    return [t for _, t in scored]


def shown_value(trial: FrozenTrial) -> float | None:
    """The best-epoch validation value a trial showed: a COMPLETE trial's value, or a PRUNED
    trial's best before it was stopped."""
    value = complete_value(trial)
    return value if value is not None else pruned_value(trial)


def architecture_bests(trials: Iterable[FrozenTrial], minimize: bool) -> dict[str, FrozenTrial]:
    """Each architecture's representative: its trial with the best best-epoch value, pruned
    trials included (a slow starter's best configuration is often one the pruner cut), ties to
    the earlier trial. The study best (``best/``) stays the best COMPLETE trial."""
    best: dict[str, tuple[tuple[float, int], FrozenTrial]] = {}
    for t in trials:
        arch, value = architecture_of(t), shown_value(t)
        if arch is None or value is None:
            continue
        key = rank_key(value, t.number, minimize)
        if arch not in best or key < best[arch][0]:
            best[arch] = (key, t)
    return {arch: entry[1] for arch, entry in best.items()}
