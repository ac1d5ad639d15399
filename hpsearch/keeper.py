"""What the study keeps after each trial: the global best and a bounded set of checkpoints.

Runs in the worker that finished the trial, under a lock, so parallel workers never leave the
study best at the worse trial and never delete a checkpoint another worker just protected.
"""

from __future__ import annotations

import json
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
from hpsearch.storage import retried_numbers

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


def apply_retention(
    study: optuna.Study, results_dir: Path, config: StudyConfig, finished: int
) -> list[int]:
    """Delete checkpoints of finished trials outside the top-k (and not an architecture's best).

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
        trials = study.get_trials(deepcopy=False)
        by_number = {t.number: t for t in trials}
        complete = [
            (t.number, t.value, str(t.params.get("architecture")))
            for t in trials
            if t.state == TrialState.COMPLETE
        ]
        pruned = [
            (t.number, t.user_attrs.get("best_value"), str(t.params.get("architecture")))
            for t in trials
            if t.state == TrialState.PRUNED
        ]
        kept = select_kept(
            complete, config.checkpoint.keep_top_k_trials, config.minimize, pruned
        )
        # A failed trial awaiting its resume keeps its files: the retry adopts them.
        awaiting = retried_numbers(trials)
        deleted = []
        for number in sorted(holders):
            t = by_number.get(number)
            if t is None or t.state in (TrialState.RUNNING, TrialState.WAITING):
                continue
            if number in kept or number in awaiting:
                continue
            folder = results_dir / "trials" / str(number)
            if folder.exists():
                files = TrialFiles(folder, "", "", 1)
                files.delete_all()
            holders.discard(number)
            deleted.append(number)
        atomic_write_json(holders_path, sorted(holders), durable=False)
    return deleted


def discard_resume_state(results_dir: Path, number: int) -> None:
    (results_dir / "trials" / str(number) / LAST).unlink(missing_ok=True)

