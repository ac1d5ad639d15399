"""Liveness of running trials: heartbeats, and failing the trials whose worker is gone.

A worker beats twice for its running trial, every ``heartbeat_interval``:

- a file in its own results folder (host, pid, parent pid, time): the fast path. On the same
  machine a dead pid is proof at once, and the parent kills a worker whose file goes silent;
- a heartbeat in the storage, which every node sees: Optuna's RDB heartbeat (the database's
  clock), or the trial system attribute ``attrs.HEARTBEAT`` in a journal file or Redis
  journal (the writer's clock: nodes' clocks must agree well within ``grace_period``).

A node judges a trial by its own file only when that trial is its own or its run died (the
file's parent is this process, or is gone); any other trial, another node's, by the storage
heartbeat alone, stale after ``grace_period`` of silence. So no node fails a trial that a
live node is running, and a dead node's trials are failed about ``grace_period`` after it.
Failing happens under the study lock, so two nodes never fail (and retry) one trial twice.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Set
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch import attrs
from hpsearch.config import StudyConfig
from hpsearch.files import atomic_write_json
from hpsearch.optuna_private import (
    rdb_heartbeat_ages,
    rdb_storage,
    record_heartbeat,
    storage_of,
    study_id,
    trial_id,
)
from hpsearch.results import ResultsLayout
from hpsearch.storage.backends import storage_url
from hpsearch.storage.study_lock import study_lock
from hpsearch.storage.trials import fail_trial

HOST = socket.gethostname()


def _beat() -> dict[str, Any]:
    return {"host": HOST, "pid": os.getpid(), "parent": os.getppid(), "time": time.time()}


def write_heartbeat(layout: ResultsLayout, number: int) -> None:
    """This node's heartbeat file for trial ``number``."""
    atomic_write_json(layout.heartbeat(number), _beat(), durable=False)


def record_storage_heartbeat(storage: optuna.storages.BaseStorage,
                             trial: optuna.Trial) -> None:
    """The heartbeat every node sees, kept in the study's storage."""
    if rdb_storage(storage) is not None:
        record_heartbeat(storage, trial)
    else:
        storage.set_trial_system_attr(trial_id(trial), attrs.HEARTBEAT, _beat())


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


def _read_file(layout: ResultsLayout, number: int) -> dict[str, Any] | None:
    try:
        beat = json.loads(layout.heartbeat(number).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return beat if isinstance(beat, dict) else None


def _file_verdict(beat: dict[str, Any] | None, grace: float, now: float) -> bool | None:
    """Stale (True) or alive (False) by this node's heartbeat file; None when the file is not
    this node's to judge: absent, from another machine, or from another live node's worker
    (two nodes on one machine sharing a results folder)."""
    if beat is None or beat.get("host") != HOST:
        return None
    parent = beat.get("parent")
    if parent is not None and parent != os.getpid() and _pid_alive(int(parent)):
        return None
    if not _pid_alive(int(beat["pid"])):
        return True
    return now - float(beat["time"]) > grace


def _storage_silence(trial: FrozenTrial, rdb_ages: dict[int, float] | None,
                     now: float) -> float:
    """Seconds since the trial's last storage heartbeat (since its start if it has none:
    its claimer died between the claim and the first beat)."""
    if rdb_ages is not None and trial.number in rdb_ages:
        return rdb_ages[trial.number]
    beat = trial.system_attrs.get(attrs.HEARTBEAT)
    if rdb_ages is None and isinstance(beat, dict) and "time" in beat:
        return now - float(beat["time"])
    return now - (trial.datetime_start.timestamp() if trial.datetime_start else now)


def stale_trials(study: optuna.Study, layout: ResultsLayout, config: StudyConfig,
                 live_pids: Set[int] = frozenset()) -> list[FrozenTrial]:
    """The RUNNING trials whose worker is gone (see the module docstring).

    Args:
        live_pids: Worker processes of this run whose end is not handled yet; their trials
            are never stale here (the parent's death path fails them, with the reason).
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    now, grace = time.time(), config.study.grace_period
    rdb = rdb_storage(storage_of(study))
    rdb_ages = rdb_heartbeat_ages(rdb, study_id(study)) if rdb is not None else None
    out = []
    for t in running:
        beat = _read_file(layout, t.number)
        if beat is not None and beat.get("host") == HOST and beat.get("pid") in live_pids:
            continue
        verdict = _file_verdict(beat, grace, now)
        if verdict is None:
            verdict = _storage_silence(t, rdb_ages, now) > grace
        if verdict:
            out.append(t)
    return out


def recover_stale(study: optuna.Study, layout: ResultsLayout, config: StudyConfig,
                  live_pids: Set[int] = frozenset()) -> list[tuple[int, int | None]]:
    """Fail every stale RUNNING trial and queue its resume, under the study lock.

    Args:
        live_pids: Worker processes this run knows are alive; their trials are never stale.

    Returns:
        (failed trial, queued retry) pairs.
    """
    if not stale_trials(study, layout, config, live_pids):
        return []  # the common case, without taking the lock
    out = []
    with study_lock(study, storage_url(config, layout))():
        # Again under the lock: another node may have failed them meanwhile.
        for t in stale_trials(study, layout, config, live_pids):
            try:
                queued = fail_trial(
                    study, t, "worker stopped sending heartbeats (killed or crashed)",
                    retry=True, max_retries=config.study.max_retries,
                )
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # it ended on its own just now
            out.append((t.number, queued))
    return out
