"""Liveness of running trials: heartbeat files, and failing the trials whose worker is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch.config import StudyConfig
from hpsearch.files import atomic_write_json
from hpsearch.results import ResultsLayout
from hpsearch.storage.trials import fail_trial

HOST = socket.gethostname()


def write_heartbeat(layout: ResultsLayout, number: int) -> None:
    atomic_write_json(
        layout.heartbeat(number),
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


def is_stale(layout: ResultsLayout, trial: FrozenTrial, grace: float,
             now: float | None = None) -> bool:
    """A RUNNING trial is stale when its worker is gone or has been silent beyond ``grace``."""
    now = time.time() if now is None else now
    try:
        beat: dict[str, Any] = json.loads(layout.heartbeat(trial.number).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - started > grace
    if beat.get("host") == HOST and not _pid_alive(int(beat["pid"])):
        return True
    return now - float(beat["time"]) > grace


def recover_stale(study: optuna.Study, layout: ResultsLayout, config: StudyConfig,
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
            pid = json.loads(layout.heartbeat(t.number).read_text()).get("pid")
        except (FileNotFoundError, json.JSONDecodeError):
            pid = None
        if pid in live_pids or not is_stale(layout, t, config.study.grace_period):
            continue
        queued = fail_trial(
            study, t, "worker stopped sending heartbeats (killed or crashed)",
            retry=True, max_retries=config.study.max_retries,
        )
        out.append((t.number, queued))
    return out
