"""Storage URL -> Optuna storage.

The default storage is a journal file, ``<results>/<study>/journal.log`` (several times faster
than SQLite with parallel workers, and optuna-dashboard reads it directly). RDB URLs get
Optuna's own heartbeat; ``redis://`` URLs a Redis journal.
"""

from __future__ import annotations

import fcntl
import os
import threading
import warnings
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend, JournalStorage

from hpsearch.config import StudyConfig
from hpsearch.errors import UsageError
from hpsearch.optuna_private import BaseJournalFileLock
from hpsearch.results import ResultsLayout, locate


def storage_url(config: StudyConfig, layout: ResultsLayout) -> str:
    """The storage URL this study uses (a journal file path is returned as is)."""
    return config.study.storage or str(layout.journal)


def is_journal_file(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def journal_path(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def is_rdb(url: str) -> bool:
    return "://" in url and not url.startswith(("redis://", "rediss://", "file://"))


def open_storage(url: str, config: StudyConfig) -> optuna.storages.BaseStorage:
    """Open the study's storage. A plain path is a journal file."""
    with warnings.catch_warnings():
        # Heartbeats and the Redis journal are "experimental" in Optuna; we rely on them knowingly.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _open_storage(url, config)


def _open_storage(url: str, config: StudyConfig) -> optuna.storages.BaseStorage:
    if url.startswith(("redis://", "rediss://")):
        return JournalStorage(JournalRedisBackend(url))
    if is_rdb(url):
        interval = max(1, round(config.study.heartbeat_interval))
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
            heartbeat_interval=interval,
            grace_period=max(interval + 1, round(config.study.grace_period)),
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                max_retry=config.study.max_retries
            ),
        )
    path = journal_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open_journal(path)


def open_url(url: str) -> optuna.storages.BaseStorage:
    """The storage at ``url``, for reading a study that exists, without its study file
    (nothing is created; a journal file must exist).

    Raises:
        UsageError: The journal file does not exist.
    """
    if url.startswith(("redis://", "rediss://")):
        return JournalStorage(JournalRedisBackend(url))
    if is_rdb(url):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, skip_table_creation=True)
    path = journal_path(url)
    if is_journal_file(url) and not path.is_file():
        raise UsageError(f"{url}: no such journal file")
    return open_journal(path)


def open_journal(path: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(path), lock_obj=FlockJournalLock(str(path))))


class FlockJournalLock(BaseJournalFileLock):
    """The journal's write lock as an ``fcntl.flock``: the kernel releases it when its holder
    dies, so a process SIGKILLed mid-write cannot stall every other one (Optuna's default
    symlink lock file outlives its holder)."""

    def __init__(self, journal_path: str) -> None:
        self._path = journal_path + ".flock"
        self._fd: int | None = None
        self._threads = threading.Lock()  # flock alone does not exclude this process's threads

    def acquire(self) -> bool:
        self._threads.acquire()
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        finally:
            self._threads.release()


def open_existing(config: StudyConfig, layout: ResultsLayout
                  ) -> tuple[str, optuna.storages.BaseStorage]:
    """The storage of a study that has run: (url, storage).

    Raises:
        UsageError: The study's journal does not exist yet (opening it would create an empty
            study), or the storage cannot be opened.
    """
    url = storage_url(config, layout)
    if is_journal_file(url) and not journal_path(url).is_file():
        raise UsageError(f"study {config.study.name!r} has not started: {url} does not exist")
    try:
        return url, open_storage(url, config)
    except Exception as err:  # a bad URL or a missing driver: one line, not a traceback
        raise UsageError(f"cannot open the storage {url}: {err}") from None


def open_study(target: str | Path, results_root: str | Path = "results"
               ) -> tuple[StudyConfig, ResultsLayout, optuna.Study]:
    """A study file or results folder -> (config, layout, the stored study).

    Raises:
        UsageError: Nothing to open there, the study has not run, or it is not in the storage.
    """
    config, layout = locate(target, results_root)
    if not layout.root.is_dir():
        raise UsageError(f"{layout.root}: no results folder (has the study run? if its "
                         "results are elsewhere, pass --results-dir)")
    url, storage = open_existing(config, layout)
    try:
        study = optuna.load_study(study_name=config.study.name, storage=storage)
    except KeyError:
        raise UsageError(f"{url}: no study {config.study.name!r} in this storage") from None
    return config, layout, study
