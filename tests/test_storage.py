"""Storage-facing behaviour, the same case over every backend: journal file, SQLite,
PostgreSQL and Redis (the last two are the services these machines run)."""

from __future__ import annotations

import copy
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from services import POSTGRES, REDIS, require_service
from studyfiles import TINY, tiny, write_study

from hpsearch.checkpoint.study_best import read_best_meta
from hpsearch.config import parse_config
from hpsearch.storage.backends import open_storage
from hpsearch.storage.trials import counted, fail_trial, state_counts


@pytest.fixture(params=["journal", "sqlite", "postgres", "redis"])
def storage_url(request, tmp_path) -> str:
    kind = request.param
    if kind == "journal":
        return str(tmp_path / "journal.log")
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return require_service(POSTGRES if kind == "postgres" else REDIS)


def _config(name: str):
    raw = copy.deepcopy(TINY)
    raw["study"]["name"] = name
    return parse_config(raw, "s.yaml")


def test_failed_trial_is_requeued_and_not_counted(storage_url: str) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    config = _config(name)
    storage = open_storage(storage_url, config)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    try:
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        stored = study._storage.get_trial(trial._trial_id)
        queued = fail_trial(study, stored, "worker died", retry=True, max_retries=1)
        trials = study.get_trials()
        assert trials[0].state == TrialState.FAIL
        assert trials[0].user_attrs["fail_reason"] == "worker died"
        assert trials[queued].state == TrialState.WAITING
        assert trials[queued].system_attrs["retry_history"] == [0]
        assert counted(trials) == 1  # the retry replaces the failure
        again = study.ask()
        assert again.number == queued
        assert again.suggest_float("x", 0, 1) == x
        # Its own failure exhausts max_retries=1: no third attempt.
        assert fail_trial(study, study._storage.get_trial(again._trial_id), "died again",
                          retry=True, max_retries=1) is None
        counts = state_counts(study.get_trials())
        assert counts["FAIL"] == 2 and counts["RETRIED"] == 1
        assert counted(study.get_trials()) == 1
    finally:
        optuna.delete_study(study_name=name, storage=storage)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_run_on_rdb_storage(kind: str, tmp_path: Path) -> None:
    name = f"rdb-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else POSTGRES
    if kind == "postgres":
        require_service(url)
    raw = tiny(study={"name": name, "n_trials": 4, "storage": url, "heartbeat_interval": 1})
    study_file = write_study(tmp_path, raw)
    out = subprocess.run(
        [sys.executable, "-m", "hpsearch.run", str(study_file), "--results-dir", "res"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    study = optuna.load_study(study_name=name, storage=url)
    try:
        assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 4
        assert read_best_meta(tmp_path / "res" / name)["trial"] == study.best_trial.number
        assert not (tmp_path / "res" / name / "journal.log").exists()
    finally:
        optuna.delete_study(study_name=name, storage=url)
