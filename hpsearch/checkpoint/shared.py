"""A study seen from any machine that reaches its storage and its shared store.

A run with a shared store (``artifacts.shared``) records the study file in the storage
(``hpsearch:config``) and the study best (``hpsearch:best``, see
:mod:`hpsearch.checkpoint.study_best`). So a machine that ran no trial and has no results
folder needs only the storage URL, and the study's name where the storage holds several:
the recorded study file says where the store is (credentials come from the environment, as
boto3 reads them), and the record names the best checkpoint and its sha256.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hpsearch import attrs
from hpsearch.checkpoint.artifacts import fetch_artifact, open_artifact_store
from hpsearch.checkpoint.mirror import TrialMirror
from hpsearch.checkpoint.study_best import read_best_record
from hpsearch.config import StudyConfig, parse_config
from hpsearch.errors import CheckpointError, ConfigError, UsageError
from hpsearch.files import atomic_write_json, sha256_file
from hpsearch.optuna_private import ArtifactStore, storage_of, study_id
from hpsearch.results import ResultsLayout
from hpsearch.storage.backends import open_url


@dataclass
class RecordedStudy:
    """A study opened from its storage alone."""

    url: str
    study: optuna.Study
    config: StudyConfig
    """The study file as its run recorded it."""
    store: ArtifactStore
    """Its shared artifact store."""

    def best_record(self) -> dict[str, Any]:
        """The study best as the storage records it.

        Raises:
            CheckpointError: No trial has finished with a stored checkpoint yet.
        """
        record = read_best_record(storage_of(self.study), study_id(self.study))
        if record is None:
            raise CheckpointError(f"study {self.study.study_name!r} in {self.url} records no "
                                  "study best yet (no trial has completed)")
        return record


def open_recorded(url: str, study_name: str | None = None) -> RecordedStudy:
    """Open a study from its storage URL: its recorded study file and shared store.

    Args:
        url: The storage (``postgresql+psycopg2://…``, ``redis://…`` or a journal file).
        study_name: The study; may be left out when the storage holds only one.

    Raises:
        UsageError: The storage cannot be opened, the study is not there (or the name is
            needed), or the study recorded no shared store (its run had none).
    """
    try:
        storage = open_url(url)
        names = [s.study_name for s in storage.get_all_studies()]
    except UsageError:
        raise
    except Exception as err:  # a bad URL or a missing driver: one line, not a traceback
        raise UsageError(f"cannot open the storage {url}: {err}") from None
    if study_name is None:
        if len(names) != 1:
            raise UsageError(f"{url} holds {len(names)} studies: name one "
                             f"({', '.join(sorted(names)) or 'none'})")
        study_name = names[0]
    if study_name not in names:
        raise UsageError(f"{url}: no study {study_name!r} (it holds: "
                         f"{', '.join(sorted(names)) or 'none'})")
    study = optuna.load_study(study_name=study_name, storage=storage)
    raw = storage.get_study_system_attrs(study_id(study)).get(attrs.STUDY_CONFIG)
    if not isinstance(raw, dict):
        raise UsageError(f"study {study_name!r} in {url} records no study file: its run had no "
                         "shared store (artifacts.shared); open it from its results folder")
    try:
        config = parse_config(raw, f"{url} (study {study_name!r})")
    except ConfigError as err:
        raise UsageError(str(err)) from None
    # A filesystem store's default folder is inside a results folder; shared ones never are.
    store = open_artifact_store(config, ResultsLayout.of(config))
    if store is None:
        raise UsageError(f"study {study_name!r} records no artifact store")
    return RecordedStudy(url, study, config, store)


def fetch_best(recorded: RecordedStudy, folder: Path) -> Path:
    """Download the study best into ``folder`` as ``best/`` holds it: ``model.pt`` and
    ``meta.json`` (so loading checks its sha256).

    Returns:
        The path of ``model.pt``.

    Raises:
        CheckpointError: No best yet, its file is missing from the store, or it differs from
            its recorded sha256.
    """
    record = recorded.best_record()
    model = folder / "model.pt"
    if not fetch_artifact(recorded.store, str(record["artifact"]), model):
        raise CheckpointError(f"the study best (trial {record['trial']}) is missing from the "
                              f"artifact store: {record['artifact']}")
    if sha256_file(model) != record.get("sha256"):
        raise CheckpointError(f"the stored study best {record['artifact']} is corrupt: its "
                              "sha256 differs from the recorded one")
    atomic_write_json(folder / "meta.json",
                      {k: v for k, v in record.items() if k != "artifact"})
    return model


def kept_checkpoint(config: StudyConfig, trial: FrozenTrial, layout: ResultsLayout
                    ) -> Path | None:
    """A local file of a finished trial's kept checkpoint: this node's, or else (a shared
    store) a copy fetched from the store into ``layout.fetched`` and checked against its
    recorded sha256. None when neither holds it (retention deleted it).

    Args:
        config: The study (its ``artifacts`` say where the store is).
        trial: The trial; its ``checkpoint`` attribute names the file.
        layout: This machine's results folder of the study (it may hold nothing else).
    """
    relative = trial.user_attrs.get(attrs.CHECKPOINT)
    if not relative:
        return None
    local = layout.root / str(relative)
    if local.exists() or not config.artifacts.shares_trials:
        return local if local.exists() else None
    store = open_artifact_store(config, layout)
    mirror = TrialMirror.of(store, trial) if store is not None else None
    if mirror is None:
        return None
    copy = layout.fetched(mirror.object_id(local.name))
    if not copy.exists():
        if not mirror.fetch(local.name, copy):
            return None
        if sha256_file(copy) != trial.user_attrs.get(attrs.CHECKPOINT_SHA256):
            copy.unlink()
            raise CheckpointError(f"the stored checkpoint {mirror.object_id(local.name)} of "
                                  f"trial {trial.number} differs from its recorded sha256")
    return copy
