"""The study's trial book-keeping: which trials count towards ``n_trials`` (a failed trial
that was requeued does not: its retry does), failing a trial and queueing its resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch import attrs
from hpsearch.optuna_private import storage_of, study_id, trial_id

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a later trial retries (and so replaces in the count)."""
    out: set[int] = set()
    for t in trials:
        out.update(int(n) for n in t.system_attrs.get(attrs.RETRY_HISTORY, ()))
    return out


def counted(trials: Sequence[FrozenTrial]) -> int:
    """Trials that use up ``n_trials``: all but failed trials that were retried."""
    retried = retried_numbers(trials)
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


class TrialIndex:
    """What a worker knows of the study's trials, read once per trial instead of per claim.

    Trial numbers only grow, a trial's ``retry_history`` is fixed when it is created, and a
    finished trial never changes; so a long study's per-trial bookkeeping costs O(new trials),
    not O(all trials). Feed it ``study.get_trials(deepcopy=False)`` (in number order).
    """

    def __init__(self) -> None:
        self.retried: set[int] = set()
        """Numbers of failed trials that a later trial retries."""
        self.finished: dict[int, FrozenTrial] = {}
        self.settled = 0
        """Every trial numbered below this is finished (and in ``finished``)."""
        self._scanned = 0

    def update(self, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        """Take in the current trials; returns those this index sees finished for the first
        time (so a reader that needs every finished trial must be its only caller)."""
        for t in trials[self._scanned:]:
            self.retried.update(int(n) for n in t.system_attrs.get(attrs.RETRY_HISTORY, ()))
        self._scanned = len(trials)
        new = []
        for t in trials[self.settled:]:
            if t.state in FINISHED and t.number not in self.finished:
                self.finished[t.number] = t
                new.append(t)
        while self.settled < len(trials) and trials[self.settled].number in self.finished:
            self.settled += 1
        return new

    def counted(self, trials: Sequence[FrozenTrial]) -> int:
        """``counted(trials)`` for the trials last given to ``update``."""
        replaced = sum(1 for n in self.retried
                       if n in self.finished and self.finished[n].state == TrialState.FAIL)
        return len(trials) - replaced


def state_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    counts = {s.name: 0 for s in TrialState}
    retried = retried_numbers(trials)
    for t in trials:
        counts[t.state.name] += 1
    counts["RETRIED"] = sum(
        1 for t in trials if t.state == TrialState.FAIL and t.number in retried
    )
    return counts


# ---------------------------------------------------------------- failing and resuming


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str, *, retry: bool,
               count_retry: bool = True, max_retries: int = 2) -> int | None:
    """Mark a RUNNING trial FAIL with ``reason`` and, if allowed, queue its resume.

    The retry is a WAITING trial with the same parameters whose ``retry_history`` system
    attribute ends with this trial's number, the same shape as Optuna's
    ``RetryHeartbeatStaleTrialCallback``, so both kinds of retry resume the same way.

    Returns:
        The number of the queued retry, or None.
    """
    storage, tid = storage_of(study), trial_id(trial)
    storage.set_trial_user_attr(tid, attrs.FAIL_REASON, reason)
    retries = int(trial.system_attrs.get(attrs.RETRIES, 0)) + (1 if count_retry else 0)
    queued = None
    if retry and retries <= max_retries:
        history = [*trial.system_attrs.get(attrs.RETRY_HISTORY, []), trial.number]
        template = optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            system_attrs={
                attrs.FAILED_TRIAL: history[0],
                attrs.RETRY_HISTORY: history,
                attrs.RETRIES: retries,
            },
        )
        new_id = storage.create_new_trial(study_id(study), template_trial=template)
        queued = storage.get_trial_number_from_id(new_id)
        storage.set_trial_user_attr(tid, attrs.RETRIED_AS, queued)
    elif retry:
        storage.set_trial_user_attr(
            tid, attrs.FAIL_REASON, f"{reason} (gave up after {max_retries} retries)"
        )
    storage.set_trial_state_values(tid, TrialState.FAIL)
    return queued
