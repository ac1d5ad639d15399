"""Storage URL -> Optuna storage, and the study's book-keeping that lives in it.

The default storage is a journal file, ``<results>/<study>/journal.log`` (several times faster
than SQLite with parallel workers, and optuna-dashboard reads it directly). RDB URLs get
Optuna's own heartbeat; ``redis://`` URLs a Redis journal.

Book-keeping: which trials count towards ``n_trials`` (a failed trial that was requeued does
not: its retry does), failing a trial and queueing its resume, and finding stale RUNNING
trials, whose worker is gone, from their heartbeat files.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend, JournalStorage
from optuna.storages.journal._file import BaseJournalFileLock
from optuna.trial import FrozenTrial, TrialState

from hpsearch.checkpoint import atomic_write_bytes, atomic_write_json
from hpsearch.config import ConfigError, StudyConfig, load_config

HOST = socket.gethostname()
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


CONFIG_COPY = "config.yaml"


def locate(path: str | Path, results_root: str | Path = "results") -> tuple[StudyConfig, Path]:
    """A study file, or a results folder (its ``config.yaml``) -> (config, results folder).

    Raises:
        ConfigError: Neither a readable study file nor a results folder of a run.
    """
    path = Path(path)
    if path.is_dir():
        copy = path / CONFIG_COPY
        if not copy.exists():
            raise ConfigError(str(path), "", f"not a results folder of an hpsearch run "
                              f"({CONFIG_COPY} is missing)")
        return load_config(copy), path
    config = load_config(path)
    return config, Path(results_root) / config.study.name


def save_config_copy(config: StudyConfig, results_dir: Path) -> None:
    """Keep the resolved study beside its results, so tools need only the folder."""
    text = yaml.safe_dump(config.as_study_dict(), sort_keys=False)
    atomic_write_bytes(results_dir / CONFIG_COPY, text.encode())


def default_storage_path(results_dir: Path) -> Path:
    return results_dir / "journal.log"


def storage_url(config: StudyConfig, results_dir: Path) -> str:
    """The storage URL this study uses (a journal file path is returned as is)."""
    return config.study.storage or str(default_storage_path(results_dir))


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
    path = Path(url.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
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


# ---------------------------------------------------------------- the budget


def frozen(trial: optuna.Trial) -> FrozenTrial:
    """The stored view of a live trial (Optuna 5's live Trial has no system attrs)."""
    return trial.study._storage.get_trial(trial._trial_id)


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a later trial retries (and so replaces in the count)."""
    out: set[int] = set()
    for t in trials:
        out.update(int(n) for n in t.system_attrs.get("retry_history", ()))
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
            self.retried.update(int(n) for n in t.system_attrs.get("retry_history", ()))
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
    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
    retries = int(trial.system_attrs.get("hpsearch_retries", 0)) + (1 if count_retry else 0)
    queued = None
    if retry and retries <= max_retries:
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        template = optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            system_attrs={
                "failed_trial": history[0],
                "retry_history": history,
                "hpsearch_retries": retries,
            },
        )
        new_id = storage.create_new_trial(study._study_id, template_trial=template)
        queued = storage.get_trial_number_from_id(new_id)
        storage.set_trial_user_attr(trial._trial_id, "retried_as", queued)
    elif retry:
        storage.set_trial_user_attr(
            trial._trial_id, "fail_reason", f"{reason} (gave up after {max_retries} retries)"
        )
    storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return queued


# ---------------------------------------------------------------- heartbeats


def heartbeat_path(results_dir: Path, number: int) -> Path:
    return results_dir / "trials" / str(number) / "heartbeat"


def write_heartbeat(results_dir: Path, number: int) -> None:
    atomic_write_json(
        heartbeat_path(results_dir, number),
        {"pid": os.getpid(), "host": HOST, "time": time.time()},
        durable=False,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # An orphan that died can linger as a zombie where nothing reaps it (containers).
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def is_stale(results_dir: Path, trial: FrozenTrial, grace: float, now: float | None = None) -> bool:
    """A RUNNING trial is stale when its worker is gone or has been silent beyond ``grace``."""
    now = time.time() if now is None else now
    try:
        beat: dict[str, Any] = json.loads(heartbeat_path(results_dir, trial.number).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - started > grace
    if beat.get("host") == HOST and not _pid_alive(int(beat["pid"])):
        return True
    return now - float(beat["time"]) > grace


def recover_stale(study: optuna.Study, results_dir: Path, config: StudyConfig,
                  live_pids: set[int] = frozenset()) -> list[tuple[int, int | None]]:
    """Fail every stale RUNNING trial and queue its resume.

    Args:
        live_pids: Worker processes this run knows are alive; their trials are never stale.

    Returns:
        (failed trial, queued retry) pairs.
    """
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            pid = json.loads(heartbeat_path(results_dir, t.number).read_text()).get("pid")
        except (FileNotFoundError, json.JSONDecodeError):
            pid = None
        if pid in live_pids or not is_stale(results_dir, t, config.study.grace_period):
            continue
        queued = fail_trial(
            study, t, "worker stopped sending heartbeats (killed or crashed)",
            retry=True, max_retries=config.study.max_retries,
        )
        out.append((t.number, queued))
    return out
