"""Checkpoints as Optuna artifacts: each kept trial's best checkpoint, and the study best.

The default store keeps Optuna's ``FileSystemArtifactStore`` layout (one file per artifact id)
inside the study's results folder, but links instead of copying: a published checkpoint and
its store file are one inode, so the store costs no disk. ``artifacts.store: boto3`` uploads to
an S3-compatible bucket instead, for clusters without a shared file system.

What the study records:

- A trial's checkpoint is published while the trial runs (finished trials are read-only in
  Optuna), through ``optuna.artifacts.upload_artifact``; its id is the trial's
  ``checkpoint_artifact`` user attribute.
- The study best is one study artifact whose content follows the best: its id is fixed per
  study (so two workers can never publish two "bests") and is the study's
  ``best_checkpoint_artifact`` user attribute.
- A trial that falls out of the kept top-k loses its artifact file; because the trial can no
  longer be changed, the study records it as retired (a ``hpsearch:retired_artifact:<id>``
  study system attribute, one key per artifact so parallel workers never overwrite each other)
  and ``hpsearch.dashboard`` hides retired artifacts instead of offering dead links.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import uuid
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

import optuna
from optuna.artifacts import ArtifactMeta, Boto3ArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial

from hpsearch import attrs
from hpsearch.checkpoint.study_best import (
    read_best_meta,
    record_best,
    record_config,
    update_study_best,
)
from hpsearch.config import StudyConfig, load_config
from hpsearch.files import TMP_PREFIX, file_lock, sha256_file
from hpsearch.optuna_private import (
    ARTIFACT_ATTR_PREFIX,
    ArtifactStore,
    storage_of,
    study_id,
    trial_id,
)
from hpsearch.results import ResultsLayout

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

# ``.pt`` would otherwise be guessed as a SNES page table.
MIMETYPE = "application/octet-stream"
_BEST_NAMESPACE = uuid.UUID("6f1c2d0e-8a4b-4c1e-9a53-3f0d6c2b7e11")


class LinkingArtifactStore:
    """An Optuna artifact store in a folder, that hardlinks files instead of copying them.

    Same layout as ``optuna.artifacts.FileSystemArtifactStore`` (``<base>/<artifact id>``),
    so ``optuna-dashboard --artifact-dir`` and Optuna's own store read it too. ``write`` given
    a file opened from disk (what ``upload_artifact`` passes) links that file into the store;
    any other stream, or a folder on another file system, is copied.

    Args:
        base_path: The store's folder; created on the first write.
    """

    def __init__(self, base_path: str | Path) -> None:
        self.base_path = Path(base_path)
        self._warned = False

    def _path(self, artifact_id: str) -> Path:
        if not artifact_id or os.sep in artifact_id or artifact_id in (".", ".."):
            raise ValueError(f"invalid artifact id: {artifact_id!r}")
        return self.base_path / artifact_id

    def open_reader(self, artifact_id: str) -> BinaryIO:
        try:
            return open(self._path(artifact_id), "rb")
        except FileNotFoundError as err:
            raise ArtifactNotFound(f"artifact {artifact_id} not found in {self.base_path}") from err

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        target = self._path(artifact_id)
        self.base_path.mkdir(parents=True, exist_ok=True)
        tmp = self.base_path / f"{TMP_PREFIX}{artifact_id}-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            if not self._link(content_body, tmp):
                with open(tmp, "wb") as f:
                    shutil.copyfileobj(content_body, f)
            # Readers of the old content keep it; new readers get the new one, never a part.
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self, artifact_id: str) -> None:
        try:
            self._path(artifact_id).unlink()
        except FileNotFoundError as err:
            raise ArtifactNotFound(f"artifact {artifact_id} not found in {self.base_path}") from err

    def _link(self, body: IO[bytes], tmp: Path) -> bool:
        """Hardlink the file behind ``body`` to ``tmp``; False when it must be copied."""
        source = _backing_file(body)
        if source is None:
            return False
        try:
            os.link(source, tmp)
        except OSError as err:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"cannot hardlink {source} into the artifact store {self.base_path} "
                    f"({err.strerror}); checkpoints are copied, doubling their disk use. "
                    "Put artifacts.path on the results folder's file system.",
                    stacklevel=3,
                )
            return False
        return True


def _backing_file(body: IO[bytes]) -> str | None:
    """The path of the regular file ``body`` reads from the start, if it still names it."""
    name = getattr(body, "name", None)
    if not isinstance(name, str) or not hasattr(body, "fileno"):
        return None
    try:
        if body.tell() != 0:
            return None
        opened, named = os.fstat(body.fileno()), os.stat(name)
    except (OSError, ValueError):
        return None
    # The path may have been replaced since it was opened: link only the very file being read.
    same = (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)
    return name if same and stat.S_ISREG(opened.st_mode) else None


def open_artifact_store(config: StudyConfig, results: ResultsLayout | Path
                        ) -> ArtifactStore | None:
    """The study's artifact store, or None when ``artifacts.store`` is ``none``.

    Args:
        config: The study.
        results: The study's results folder (``<results>/<study name>``).
    """
    section = config.artifacts
    if section.store == "none":
        return None
    if section.store == "boto3":
        import boto3

        client = boto3.client("s3", endpoint_url=section.endpoint_url)
        # avoid_buf_copy: stream the file instead of buffering a whole checkpoint in memory.
        return Boto3ArtifactStore(section.bucket or "", client=client, avoid_buf_copy=True)
    folder = Path(section.path) if section.path else ResultsLayout.at(results).artifacts
    return LinkingArtifactStore(folder)


def fetch_artifact(store: ArtifactStore, artifact_id: str, dest: Path) -> bool:
    """Download an artifact to the file ``dest`` (atomically); False when the store lacks it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        reader = store.open_reader(artifact_id)
    except ArtifactNotFound:
        return False
    tmp = dest.parent / f"{TMP_PREFIX}{dest.name}-{os.getpid()}"
    try:
        with contextlib.closing(reader), open(tmp, "wb") as f:
            shutil.copyfileobj(reader, f)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------- trials


def register_trial_checkpoint(trial: optuna.Trial, artifact_id: str, path: Path) -> str:
    """Make ``artifact_id``, already in the store (the trial's mirrored checkpoint), an
    artifact of the still RUNNING ``trial``, as ``upload_artifact`` records one, without a
    second copy.

    Returns:
        The artifact id, also the trial's ``checkpoint_artifact`` user attribute.
    """
    meta = ArtifactMeta(artifact_id, path.name, MIMETYPE, None)
    storage_of(trial.study).set_trial_system_attr(
        trial_id(trial), ARTIFACT_ATTR_PREFIX + artifact_id, json.dumps(asdict(meta))
    )
    trial.set_user_attr(attrs.CHECKPOINT_ARTIFACT, artifact_id)
    return artifact_id


def publish_trial_checkpoint(store: ArtifactStore, trial: optuna.Trial, path: Path) -> str:
    """Make ``path`` an artifact of the still RUNNING ``trial``.

    Returns:
        The artifact id, also the trial's ``checkpoint_artifact`` user attribute.
    """
    artifact_id = upload_artifact(
        artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype=MIMETYPE
    )
    trial.set_user_attr(attrs.CHECKPOINT_ARTIFACT, artifact_id)
    return artifact_id


def retire_trial_checkpoint(
    store: ArtifactStore, study: optuna.Study, trial: FrozenTrial
) -> str | None:
    """Remove a trial's checkpoint artifact after its checkpoint was deleted.

    The study records the artifact as retired before the file goes, so a dashboard that
    hides retired artifacts never lists one without its file.

    Returns:
        The retired artifact id, or None when the trial published none.
    """
    artifact_id = trial.user_attrs.get(attrs.CHECKPOINT_ARTIFACT)
    if not artifact_id:
        return None
    storage_of(study).set_study_system_attr(
        study_id(study), attrs.RETIRED_ARTIFACT_PREFIX + artifact_id, trial.number
    )
    with contextlib.suppress(ArtifactNotFound):
        store.remove(artifact_id)
    return artifact_id


def retired_artifacts(storage: BaseStorage, study_number: int) -> dict[str, int]:
    """Retired artifact ids of a study, each with the trial number it belonged to."""
    return {
        key.removeprefix(attrs.RETIRED_ARTIFACT_PREFIX): int(number)
        for key, number in storage.get_study_system_attrs(study_number).items()
        if key.startswith(attrs.RETIRED_ARTIFACT_PREFIX)
    }


# ---------------------------------------------------------------- the study best


def best_artifact_id(study: optuna.Study) -> str:
    """The study best's artifact id: the same in every worker, unique to this study.

    The first trial's start time tells apart studies that share a name (and a bucket).
    """
    storage, sid = storage_of(study), study_id(study)
    try:
        first = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(sid, 0))
        started = first.datetime_start.isoformat() if first.datetime_start else ""
    except KeyError:
        started = ""
    return str(uuid.uuid5(_BEST_NAMESPACE, f"{study.study_name}\0{sid}\0{started}"))


def _trial(study: optuna.Study, number: int) -> FrozenTrial:
    storage = storage_of(study)
    return storage.get_trial(
        storage.get_trial_id_from_study_id_trial_number(study_id(study), number)
    )


def _best_source(study: optuna.Study, layout: ResultsLayout, record: dict[str, Any] | None
                 ) -> tuple[FrozenTrial, Path] | None:
    """The study's best trial and a local file of its checkpoint (which may not exist).

    The storage's record decides where there is one (a shared store). Otherwise prefers
    ``best/``, hpsearch's own choice among equal values; falls back to Optuna's best trial
    when ``best/`` is missing or behind it (another machine ran a better trial).
    """
    if record is not None:
        trial = _trial(study, int(record["trial"]))
        local = read_best_meta(layout)
        if local is not None and local.get("trial") == trial.number:
            return trial, layout.best.resolve() / "model.pt"
        rel = trial.user_attrs.get(attrs.CHECKPOINT)
        return trial, (layout.root / rel if rel else layout.best_model)
    try:
        best = study.best_trial
    except ValueError:
        return None
    stage = layout.best.resolve()
    local = read_best_meta(layout) if stage.is_dir() else None
    if local is not None and local.get("value") == best.value and local.get("trial") is not None:
        return _trial(study, int(local["trial"])), stage / "model.pt"
    rel = best.user_attrs.get(attrs.CHECKPOINT)
    return best, (layout.root / rel if rel else layout.best_model)


def publish_study_best(
    store: ArtifactStore, study: optuna.Study, results: ResultsLayout | Path,
    config: StudyConfig | None = None,
) -> str | None:
    """Point the study's best-checkpoint artifact at the current best trial's checkpoint.

    Idempotent and cheap: nothing is written when the artifact already holds that trial; the
    filesystem store links the file. Call it after the study best may have changed.

    With a shared store the best is first decided in the storage (:func:`record_best`, with
    the study file beside it), this node's ``best/`` catches up with it when another node
    holds it, and the artifact follows the record.

    Args:
        store: The study's artifact store.
        study: The study.
        results: The study's results folder (``best/`` lives there).
        config: The study; read from the results folder's ``config.yaml`` when not given.

    Returns:
        The study best's artifact id, or None when there is no best checkpoint yet.
    """
    layout = ResultsLayout.at(results)
    if config is None and layout.config_copy.is_file():
        config = load_config(layout.config_copy)
    with file_lock(layout.lock("artifacts")):
        record = None
        if config is not None and config.artifacts.shares_trials:
            record_config(study, config)
            record = record_best(study, config)
            if record is not None:
                _catch_up(store, layout, record, config)
        source = _best_source(study, layout, record)
        if source is None:
            return None
        trial, path = source
        artifact_id = best_artifact_id(study)
        recorded = study.user_attrs
        if (recorded.get(attrs.STUDY_BEST_ARTIFACT) == artifact_id
                and recorded.get(attrs.STUDY_BEST_TRIAL) == trial.number):
            return artifact_id
        source_id = trial.user_attrs.get(attrs.CHECKPOINT_ARTIFACT)
        if not _copy_into(store, artifact_id, path, source_id):
            return None
        name = Path(str(trial.user_attrs.get(attrs.CHECKPOINT) or "model.pt")).name
        meta = ArtifactMeta(artifact_id, f"best-trial{trial.number}-{name}", MIMETYPE, None)
        storage_of(study).set_study_system_attr(
            study_id(study), ARTIFACT_ATTR_PREFIX + artifact_id, json.dumps(asdict(meta))
        )
        study.set_user_attr(attrs.STUDY_BEST_ARTIFACT, artifact_id)
        study.set_user_attr(attrs.STUDY_BEST_TRIAL, trial.number)
        return artifact_id


def _catch_up(store: ArtifactStore, layout: ResultsLayout, record: dict[str, Any],
              config: StudyConfig) -> None:
    """Bring the recorded best into this node's ``best/`` when another node ran it."""
    local = read_best_meta(layout)
    if local is not None and local.get("trial") == record["trial"]:
        return
    fetched = layout.best_stages / f"{TMP_PREFIX}fetched-{os.getpid()}.pt"
    try:
        if not fetch_artifact(store, str(record["artifact"]), fetched):
            return  # retired meanwhile: a better record follows
        if sha256_file(fetched) != record.get("sha256"):
            warnings.warn(f"the stored study best {record['artifact']} differs from its "
                          "recorded sha256; best/ keeps the local best", stacklevel=3)
            return
        meta = {k: v for k, v in record.items() if k not in ("artifact", "sha256")}
        update_study_best(layout, fetched, meta, config.minimize)
    finally:
        fetched.unlink(missing_ok=True)


def _copy_into(store: ArtifactStore, artifact_id: str, path: Path, source_id: Any) -> bool:
    """Write ``path`` (or else the artifact ``source_id``) as ``artifact_id``."""
    try:
        with open(path, "rb") as f:
            store.write(artifact_id, f)
        return True
    except FileNotFoundError:
        pass
    if not source_id:
        return False
    try:
        with contextlib.closing(store.open_reader(str(source_id))) as reader:
            store.write(artifact_id, reader)
    except ArtifactNotFound:
        return False
    return True
