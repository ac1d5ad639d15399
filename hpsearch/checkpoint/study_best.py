"""The study best: ``best/`` always holds the best COMPLETE trial's checkpoint.

``best`` is a symlink to ``.best/trial-N/`` holding ``model.pt`` and ``meta.json``; the link is
swapped with one ``os.replace`` under a lock, so readers see the old pair or the new pair,
never a mix, and two workers finishing together never leave the worse trial. "Better" is the
one ranking rule (:mod:`hpsearch.ranking`): a tie goes to the earlier trial.

With a shared store (``artifacts.shared``) nodes have no folder in common, so the study best
is also decided through the storage: the ``hpsearch:best`` study system attribute holds
``meta.json``'s record plus the id of the best trial's checkpoint in the store
(:func:`record_best`), beside the study file (``hpsearch:config``) that says where the store
is. The record is one storage write, and every writer reads the study again after writing
and repairs a stale record, so the last writer always leaves the better trial.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch import attrs
from hpsearch.config import StudyConfig
from hpsearch.errors import FileWriteError
from hpsearch.files import (
    TMP_PREFIX,
    atomic_write_json,
    file_lock,
    fsync_dir,
    read_json,
    sha256_file,
    write_error,
)
from hpsearch.optuna_private import storage_of, study_id
from hpsearch.ranking import best_trial, ranks_before
from hpsearch.results import ResultsLayout

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

RECORD_TRIES = 5
"""Rounds of write-then-check in :func:`record_best`; each round lost means a better trial
was recorded meanwhile, which cannot go on for long."""


def read_best_meta(results: ResultsLayout | Path) -> dict[str, Any] | None:
    return read_json(ResultsLayout.at(results).best_meta)


def update_study_best(
    results: ResultsLayout | Path, checkpoint: Path, meta: dict[str, Any], minimize: bool
) -> bool:
    """Make ``checkpoint`` the study best if its trial outranks the current one (a better
    value, or the same value from an earlier trial). Safe across processes.

    Args:
        results: The study's results folder.
        checkpoint: The trial's best-epoch checkpoint file.
        meta: What ``best/meta.json`` records; needs ``trial`` and ``value``.
        minimize: The study's direction.

    Returns:
        True if the best was replaced.

    Raises:
        FileWriteError: A write failed (the message names the path); the previous best stays.
    """
    layout = ResultsLayout.at(results)
    results_dir, link, store = layout.root, layout.best, layout.best_stages
    with file_lock(layout.lock("best")):
        current = read_best_meta(layout)
        if current is not None and not ranks_before(
            meta["value"], meta["trial"], current.get("value"), current.get("trial", -1),
            minimize,
        ):
            return False
        stage = store / f"trial-{meta['trial']}"
        tmp_stage = store / f"{TMP_PREFIX}trial-{meta['trial']}-{os.getpid()}"
        step = tmp_stage  # the path being written, for the error message
        try:
            shutil.rmtree(tmp_stage, ignore_errors=True)
            tmp_stage.mkdir(parents=True)
            step = target = tmp_stage / "model.pt"
            try:
                os.link(checkpoint, target)  # same inode: no second copy on disk
            except OSError:
                shutil.copyfile(checkpoint, target)
            meta = {**meta, "sha256": sha256_file(target)}
            atomic_write_json(tmp_stage / "meta.json", meta)
            step = stage
            if stage.exists():
                shutil.rmtree(stage)
            os.replace(tmp_stage, stage)
            step = link
            tmp_link = results_dir / f"{TMP_PREFIX}best-link-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                tmp_link.unlink()
            os.symlink(os.path.relpath(stage, results_dir), tmp_link)
            os.replace(tmp_link, link)
            fsync_dir(results_dir)
        except FileWriteError:
            raise
        except OSError as err:
            raise write_error(step, err) from err
        # Keep the previous stage too: a reader that resolved the old link may still be reading.
        previous = current.get("trial") if current else None
        for old in store.iterdir():
            if old.name not in (stage.name, f"trial-{previous}") and not old.name.startswith(
                TMP_PREFIX
            ):
                shutil.rmtree(old, ignore_errors=True)
        return True


def best_meta(trial: FrozenTrial, config: StudyConfig) -> dict[str, Any]:
    return {
        "trial": trial.number,
        "value": trial.value,
        "metric": config.study.metric,
        "direction": config.study.direction,
        "architecture": trial.params.get(attrs.ARCHITECTURE),
        "params": trial.params,
        "best_epoch": trial.user_attrs.get(attrs.BEST_EPOCH),
        "checkpoint": trial.user_attrs.get(attrs.CHECKPOINT),
        "study": config.study.name,
        # A resumed trial's best epoch may predate the break: its file names the trial it
        # was written by, one of these.
        "lineage": [*trial.system_attrs.get(attrs.RETRY_HISTORY, []), trial.number],
    }


def offer_best(layout: ResultsLayout, trial: FrozenTrial, config: StudyConfig) -> bool:
    """Make a COMPLETE trial the study best if it outranks the current one."""
    rel = trial.user_attrs.get(attrs.CHECKPOINT)
    if trial.state != TrialState.COMPLETE or not rel or trial.value is None:
        return False
    return update_study_best(layout, layout.root / rel, best_meta(trial, config), config.minimize)


def reconcile_best(study: optuna.Study, layout: ResultsLayout, config: StudyConfig) -> bool:
    """Repair the study best after a crash between a trial's completion and its offer."""
    best = best_trial(study.get_trials(deepcopy=False), config.minimize)
    if best is None:
        return False
    current = read_best_meta(layout)
    if current is not None and current.get("trial") == best.number:
        return False
    rel = best.user_attrs.get(attrs.CHECKPOINT)
    if not rel or not (layout.root / rel).exists():
        return False
    return offer_best(layout, best, config)




# ---------------------------------------------------------------- the best, in the storage


def read_best_record(storage: BaseStorage, study_number: int) -> dict[str, Any] | None:
    """The study best as the storage records it (shared stores), or None.

    Args:
        storage: The study's storage.
        study_number: The study's id in it.
    """
    record = storage.get_study_system_attrs(study_number).get(attrs.STUDY_BEST_RECORD)
    return dict(record) if isinstance(record, dict) else None


def record_config(study: optuna.Study, config: StudyConfig) -> None:
    """Record the study file in the storage (once), so any machine finds the store."""
    storage, sid = storage_of(study), study_id(study)
    resolved = config.as_study_dict()
    # Its reader already knows the URL, and it may hold a password.
    resolved["study"]["storage"] = None
    if storage.get_study_system_attrs(sid).get(attrs.STUDY_CONFIG) != resolved:
        storage.set_study_system_attr(sid, attrs.STUDY_CONFIG, resolved)


def record_best(study: optuna.Study, config: StudyConfig) -> dict[str, Any] | None:
    """Point the storage's study best at the best COMPLETE trial with a stored checkpoint.

    Two nodes finishing at once may each record what they saw; each reads the study again
    after its write and repairs a record that is not the best, so the record never stays on
    the worse trial.

    Returns:
        The record now stored, or None when no trial qualifies yet.
    """
    storage, sid = storage_of(study), study_id(study)
    current = read_best_record(storage, sid)
    for _ in range(RECORD_TRIES):
        best = best_trial(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                          config.minimize)
        artifact = best.user_attrs.get(attrs.CHECKPOINT_ARTIFACT) if best else None
        if best is None or not artifact:
            return current  # its own worker records it once its checkpoint is stored
        if current is not None and current.get("trial") == best.number:
            return current
        record = {**best_meta(best, config), "artifact": artifact,
                  "sha256": best.user_attrs.get(attrs.CHECKPOINT_SHA256)}
        storage.set_study_system_attr(sid, attrs.STUDY_BEST_RECORD, record)
        current = read_best_record(storage, sid)
    return current
