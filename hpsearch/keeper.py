"""What the study keeps after each trial: the global best and a bounded set of checkpoints.

Runs in the worker that finished the trial, under a lock, so parallel workers never leave the
study best at the worse trial and never delete a checkpoint another worker just protected.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch.checkpoint import (
    LAST,
    TrialFiles,
    atomic_write_json,
    file_lock,
    read_best_meta,
    select_kept,
    update_study_best,
)
from hpsearch.config import StudyConfig
from hpsearch.storage import TrialIndex

HOLDERS = ".hpsearch/with-checkpoints.json"


def best_meta(trial: FrozenTrial, config: StudyConfig) -> dict[str, Any]:
    return {
        "trial": trial.number,
        "value": trial.value,
        "metric": config.study.metric,
        "direction": config.study.direction,
        "architecture": trial.params.get("architecture"),
        "params": trial.params,
        "best_epoch": trial.user_attrs.get("best_epoch"),
        "checkpoint": trial.user_attrs.get("checkpoint"),
        "study": config.study.name,
        # A resumed trial's best epoch may predate the break: its file names the trial it
        # was written by, one of these.
        "lineage": [*trial.system_attrs.get("retry_history", []), trial.number],
    }


def offer_best(results_dir: Path, trial: FrozenTrial, config: StudyConfig) -> bool:
    """Make a COMPLETE trial the study best if it beats the current one."""
    rel = trial.user_attrs.get("checkpoint")
    if trial.state != TrialState.COMPLETE or not rel or trial.value is None:
        return False
    return update_study_best(
        results_dir, results_dir / rel, best_meta(trial, config), config.minimize
    )


def reconcile_best(study: optuna.Study, results_dir: Path, config: StudyConfig) -> bool:
    """Repair the study best after a crash between a trial's completion and its offer."""
    try:
        best = study.best_trial
    except ValueError:
        return False
    current = read_best_meta(results_dir)
    if current is not None and current.get("trial") == best.number:
        return False
    rel = best.user_attrs.get("checkpoint")
    if not rel or not (results_dir / rel).exists():
        return False
    return offer_best(results_dir, best, config)


Row = tuple[int, float, str]  # (number, value, architecture), as select_kept takes them


class Retention:
    """Deletes checkpoints of finished trials outside the top-k (and not an architecture's best).

    One per worker. It remembers the few rows that can still be kept (the top-k complete
    trials, each architecture's best complete and best pruned trial), so a study of thousands
    of trials pays per finished trial, not per trial in the study.
    """

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        # Its own index: ``update`` hands each newly finished trial to one reader only.
        self.index = TrialIndex()
        self._sign = 1.0 if config.minimize else -1.0
        self._top: list[Row] = []
        self._best_complete: dict[str, Row] = {}
        self._best_pruned: dict[str, Row] = {}

    def _rank(self, row: Row) -> tuple[float, int]:
        return self._sign * row[1], row[0]

    def _better(self, table: dict[str, Row], row: Row) -> None:
        current = table.get(row[2])
        if current is None or self._rank(row) < self._rank(current):
            table[row[2]] = row

    def _take(self, t: FrozenTrial) -> None:
        arch = str(t.params.get("architecture"))
        if t.state == TrialState.COMPLETE:
            value = t.value
        elif t.state == TrialState.PRUNED:
            value = t.user_attrs.get("best_value")
        else:
            return
        if value is None or not math.isfinite(value):
            return
        row = (t.number, float(value), arch)
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

    def apply(self, study: optuna.Study, results_dir: Path, finished: int) -> list[int]:
        """Delete what is no longer kept, under the study's retention lock.

        Args:
            finished: The trial that just finished; its folder joins the set that holds files.

        Returns:
            The trial numbers whose checkpoints were deleted.
        """
        holders_path = results_dir / HOLDERS
        with file_lock(results_dir / ".hpsearch" / "retention.lock"):
            try:
                holders = set(json.loads(holders_path.read_text()))
            except FileNotFoundError:
                holders = set()
            holders.add(finished)
            for t in self.index.update(study.get_trials(deepcopy=False)):
                self._take(t)
            kept = self.kept()
            deleted = []
            for number in sorted(holders):
                if number not in self.index.finished:
                    continue  # running or waiting
                # A failed trial awaiting its resume keeps its files: the retry adopts them.
                if number in kept or number in self.index.retried:
                    continue
                folder = results_dir / "trials" / str(number)
                if folder.exists():
                    TrialFiles(folder, "", "", 1).delete_all()
                holders.discard(number)
                deleted.append(number)
            atomic_write_json(holders_path, sorted(holders), durable=False)
        return deleted


def discard_resume_state(results_dir: Path, number: int) -> None:
    (results_dir / "trials" / str(number) / LAST).unlink(missing_ok=True)

