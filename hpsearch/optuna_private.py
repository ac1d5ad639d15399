"""Every use of Optuna's private API, in one module, so an Optuna upgrade touches one file.

hpsearch needs a few things Optuna's public API does not offer: failing and requeueing a trial
from outside its objective (the parent fails a dead worker's trial), reading a live trial's
system attributes, recording RDB heartbeats by hand, study ids for the dashboard's links, the
journal's lock interface, the artifact store protocol, and the trial cache of a study object
that views another's storage. Each is wrapped here under a name that says what it does.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.artifacts._protocol import ArtifactStore
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages.journal._file import BaseJournalFileLock
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial

__all__ = [
    "ARTIFACT_ATTR_PREFIX",
    "ArtifactStore",
    "BaseJournalFileLock",
    "frozen",
    "planned_params",
    "rdb_heartbeat_ages",
    "rdb_storage",
    "record_heartbeat",
    "storage_of",
    "study_id",
    "summary_id",
    "tell",
    "trial_id",
]

# Optuna records an artifact's meta as a study/trial system attribute under this prefix.
ARTIFACT_ATTR_PREFIX = "artifacts:"


def storage_of(study: optuna.Study) -> BaseStorage:
    return study._storage


def study_id(study: optuna.Study) -> int:
    return study._study_id


def forget_cached_trials(study: optuna.Study) -> None:
    """Drop the trials a study object cached for its sampler (``Study.ask`` does this for the
    study it asks; a second study object over the same storage needs it done by hand)."""
    study._thread_local.cached_all_trials = None


def summary_id(study: FrozenStudy) -> int:
    """The id of a study listed by ``storage.get_all_studies()``."""
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def frozen(trial: optuna.Trial) -> FrozenTrial:
    """The stored view of a live trial (Optuna 5's live Trial has no system attrs)."""
    return trial.study._storage.get_trial(trial._trial_id)


def tell(study: optuna.Study, trial: optuna.Trial, *args: Any, **kwargs: Any) -> bool:
    """``study.tell`` from outside ``study.optimize``; returns whether the sampler reported its
    search space exhausted.

    The grid and brute-force samplers end a search by calling ``study.stop()`` from
    ``after_trial``, which Optuna allows only inside ``optimize`` and otherwise raises as a
    RuntimeError, after the trial's state was stored.
    """
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise
        return True
    return False


def planned_params(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters, or for a WAITING (enqueued) trial the ones it was queued with
    (Optuna keeps those in a system attribute until the trial starts)."""
    return trial.params or dict(trial.system_attrs.get("fixed_params", {}))


def record_heartbeat(storage: Any, trial: optuna.Trial) -> None:
    """Beat an RDB trial's heartbeat by hand (workers do not run ``study.optimize``)."""
    storage.record_heartbeat(trial._trial_id)


def rdb_storage(storage: BaseStorage) -> RDBStorage | None:
    """The RDBStorage under a study's storage (``load_study`` wraps it in a cache), or None."""
    if isinstance(storage, _CachedStorage):
        storage = storage._backend
    return storage if isinstance(storage, RDBStorage) else None


def rdb_heartbeat_ages(storage: RDBStorage, study_id: int) -> dict[int, float]:
    """Seconds since each trial's last RDB heartbeat, by trial number, on the database's
    clock (so the nodes' clocks do not matter); trials never beaten are absent. Finished
    trials too: one that finishes while this reads is not mistaken for one never beaten.

    Optuna's own ``_get_stale_trial_ids`` answers only yes or no, with its grace period, and
    skips trials without a heartbeat.
    """
    # Here, not at the top: SQLAlchemy takes most of a second to import, and only RDB
    # studies need it.
    import sqlalchemy
    from optuna.storages._rdb import models as rdb_models

    trial, beat = rdb_models.TrialModel, rdb_models.TrialHeartbeatModel
    query = (sqlalchemy.select(trial.number, beat.heartbeat)
             .join(beat, beat.trial_id == trial.trial_id)
             .where(trial.study_id == study_id))
    with storage.engine.connect() as conn:
        now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar()
        rows = conn.execute(query).all()
    assert now is not None
    # As Optuna does: PostgreSQL's now() is zone-aware, the stored heartbeats are not.
    now = now.replace(tzinfo=None)
    return {int(number): (now - at).total_seconds() for number, at in rows}
