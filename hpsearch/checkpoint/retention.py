"""Bounded disk: which finished trials keep their checkpoints, and deleting the others.

Runs in the worker that finished the trial, under a lock, so parallel workers never delete a
checkpoint another worker just protected.

A finished trial can no longer be changed in Optuna, so its ``checkpoint`` user attribute
keeps naming a file after the file is deleted. The study records each deletion instead (a
``hpsearch:retired_checkpoint:<trial number>`` study system attribute, one key per trial so
parallel workers never overwrite each other), before the files go, whatever artifact store is
configured; :func:`retired_checkpoints` reads it back for everything that shows or reads a
trial's ``checkpoint``.

With a shared store the files are in the store too, where any node deletes them: a trial may
have run on a node that has stopped since. Each worker's retention therefore also deletes,
from the store, every finished trial's files that fell out (whichever node ran it), and
records it (``hpsearch:store_cleared:<trial number>``) so other nodes skip it. A trial that
falls out never comes back, so a node that has not seen every trial yet deletes nothing that
the whole study keeps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hpsearch import attrs
from hpsearch.checkpoint.artifacts import retire_trial_checkpoint
from hpsearch.checkpoint.mirror import TrialMirror
from hpsearch.checkpoint.trial_files import TrialFiles
from hpsearch.config import StudyConfig
from hpsearch.files import atomic_write_json, file_lock
from hpsearch.optuna_private import ArtifactStore, storage_of, study_id
from hpsearch.ranking import architecture_of, complete_value, pruned_value, rank_key
from hpsearch.results import ResultsLayout
from hpsearch.storage.trials import TrialIndex

# A study system attribute per trial whose checkpoint was deleted (its suffix: the trial
# number; its value: the deleted path). Its name belongs with the others in hpsearch.attrs.


def select_kept(
    trials: Iterable[tuple[int, float, str]],
    keep_top_k_trials: int,
    minimize: bool,
    pruned: Iterable[tuple[int, float, str]] = (),
) -> set[int]:
    """Which finished trials keep their checkpoints.

    Args:
        trials: (number, value, architecture) of every COMPLETE trial.
        keep_top_k_trials: How many of the best trials to keep.
        minimize: The study's direction.
        pruned: (number, best value, architecture) of PRUNED trials.

    Returns:
        The top-k trial numbers, plus, for each architecture, its best complete trial and its
        representative (its best trial, pruned ones included: the report evaluates it).
    """
    def ranked(rows: Iterable[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
        finite = [t for t in rows if t[1] is not None and math.isfinite(t[1])]
        return sorted(finite, key=lambda t: rank_key(t[1], t[0], minimize))

    complete = ranked(trials)
    kept = {t[0] for t in complete[:keep_top_k_trials]}
    for rows in (complete, ranked([*complete, *pruned])):
        seen: set[str] = set()
        for number, _, arch in rows:
            if arch not in seen:
                seen.add(arch)
                kept.add(number)
    return kept


Row = tuple[int, float, str]  # (number, value, architecture), as select_kept takes them


class Retention:
    """Deletes checkpoints of finished trials outside the top-k (and not an architecture's best).

    One per worker. It remembers the few rows that can still be kept (the top-k complete
    trials, each architecture's best complete and best pruned trial), so a study of thousands
    of trials pays per finished trial, not per trial in the study.
    """

    def __init__(self, config: StudyConfig, store: ArtifactStore | None = None) -> None:
        self.config = config
        # Only a shared store holds trials' files (else it holds kept checkpoints, retired
        # one by one by the caller).
        self.store = store if config.artifacts.shares_trials else None
        self._stored: dict[int, FrozenTrial] = {}
        """Finished trials whose files may still be in the shared store."""
        self._cleared: set[int] | None = None
        # Its own index: ``update`` hands each newly finished trial to one reader only.
        self.index = TrialIndex()
        self._top: list[Row] = []
        self._best_complete: dict[str, Row] = {}
        self._best_pruned: dict[str, Row] = {}

    def _rank(self, row: Row) -> tuple[float, int]:
        return rank_key(row[1], row[0], self.config.minimize)

    def _better(self, table: dict[str, Row], row: Row) -> None:
        current = table.get(row[2])
        if current is None or self._rank(row) < self._rank(current):
            table[row[2]] = row

    def _take(self, t: FrozenTrial) -> None:
        arch = str(architecture_of(t))
        value = complete_value(t) if t.state == TrialState.COMPLETE else pruned_value(t)
        if value is None:
            return
        row = (t.number, value, arch)
        if t.state == TrialState.PRUNED:
            self._better(self._best_pruned, row)
            return
        self._better(self._best_complete, row)
        k = self.config.checkpoint.keep_top_k_trials
        self._top = sorted([*self._top, row], key=self._rank)[:k]

    def kept(self) -> set[int]:
        """``select_kept`` over every finished trial, from the rows that can matter."""
        complete = {r[0]: r for r in [*self._top, *self._best_complete.values()]}
        return select_kept(complete.values(), self.config.checkpoint.keep_top_k_trials,
                           self.config.minimize, self._best_pruned.values())

    def apply(self, study: optuna.Study, results: ResultsLayout | Path,
              finished: int) -> list[int]:
        """Delete what is no longer kept, under the study's retention lock.

        Args:
            finished: The trial that just finished; its folder joins the set that holds files.

        Returns:
            The trial numbers whose checkpoints were deleted.
        """
        layout = ResultsLayout.at(results)
        holders_path = layout.checkpoint_holders
        with file_lock(layout.lock("retention")):
            try:
                holders = set(json.loads(holders_path.read_text()))
            except FileNotFoundError:
                holders = set()
            holders.add(finished)
            for t in self.index.update(study.get_trials(deepcopy=False)):
                self._take(t)
                if (self.store is not None and attrs.STORE_KEY in t.user_attrs
                        and t.state != TrialState.FAIL):
                    self._stored[t.number] = t
            kept = self.kept()
            deleted = []
            for number in sorted(holders):
                if number not in self.index.finished:
                    continue  # running or waiting
                # A failed trial awaiting its resume keeps its files: the retry adopts them.
                if number in kept or number in self.index.retried:
                    continue
                _record_retired(study, self.index.finished[number])
                folder = layout.trial(number)
                if folder.exists():
                    TrialFiles(folder, "", "", 1).delete_all()
                holders.discard(number)
                deleted.append(number)
            atomic_write_json(holders_path, sorted(holders), durable=False)
            if self.store is not None:
                self._clear_store(study, self.store, kept)
        return deleted

    def _clear_store(self, study: optuna.Study, store: ArtifactStore, kept: set[int]) -> None:
        """Delete from the shared store the files of every finished trial no longer kept.

        Failed trials are not among them: a retry adopts a killed trial's files, and a trial
        that failed on an error deleted its own.
        """
        storage, sid = storage_of(study), study_id(study)
        if self._cleared is None:
            self._cleared = cleared_from_store(storage, sid)
        for number, trial in sorted(self._stored.items()):
            if number in kept:
                continue
            if number not in self._cleared:
                _record_retired(study, trial)
                retire_trial_checkpoint(store, study, trial)
                mirror = TrialMirror.of(store, trial)
                if mirror is not None:
                    mirror.remove_all()
                storage.set_study_system_attr(
                    sid, attrs.STORE_CLEARED_PREFIX + str(number), True)
                self._cleared.add(number)
            del self._stored[number]


def _record_retired(study: optuna.Study, trial: FrozenTrial) -> None:
    """Record in the study that ``trial``'s checkpoint is about to be deleted."""
    checkpoint = trial.user_attrs.get(attrs.CHECKPOINT)
    if checkpoint:
        storage_of(study).set_study_system_attr(
            study_id(study), attrs.RETIRED_CHECKPOINT_PREFIX + str(trial.number), checkpoint
        )


def retired_checkpoints(storage: BaseStorage, study_number: int) -> set[int]:
    """Trials of a study whose ``checkpoint`` names a file retention deleted.

    Args:
        storage: The study's storage.
        study_number: The study's id in it.
    """
    return {
        int(key.removeprefix(attrs.RETIRED_CHECKPOINT_PREFIX))
        for key in storage.get_study_system_attrs(study_number)
        if key.startswith(attrs.RETIRED_CHECKPOINT_PREFIX)
    }


def cleared_from_store(storage: BaseStorage, study_number: int) -> set[int]:
    """Trials whose files retention deleted from the shared store."""
    return {
        int(key.removeprefix(attrs.STORE_CLEARED_PREFIX))
        for key in storage.get_study_system_attrs(study_number)
        if key.startswith(attrs.STORE_CLEARED_PREFIX)
    }


def discard_resume_state(layout: ResultsLayout, number: int) -> None:
    layout.resume_state(number).unlink(missing_ok=True)

