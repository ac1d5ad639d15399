"""Many nodes, one study: several ``python -m hpsearch.run`` processes, each with its own
results folder, sharing one PostgreSQL study, as separate machines would.

Real processes against the real database, no mocks: the nodes together finish exactly
``n_trials`` (never a trial trained beyond it, whatever the timing), no node fails a trial
that a live node runs, and a node killed outright has its trial failed and resumed by a
surviving node within about ``grace_period``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import multiprocessing
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages.journal import JournalRedisBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState
from processes import HpsearchRun, wait_for, write_pacing
from services import POSTGRES, REDIS, require_postgres, require_service
from studyfiles import regression, write_study

from hpsearch.storage.backends import open_journal
from hpsearch.storage.study_lock import study_lock

optuna.logging.set_verbosity(optuna.logging.WARNING)

pytestmark = pytest.mark.slow

GRACE = 6
HEARTBEAT = 1


class Node(HpsearchRun):
    """``python -m hpsearch.run`` on the shared storage with its own results folder, in its
    own session (a machine)."""

    def __init__(self, cwd: Path, study_file: Path, storage: str, results: str,
                 label: str) -> None:
        super().__init__(cwd, [study_file.name, "--storage", storage, "--results-dir", results],
                         label)
        self.results = cwd / results


@pytest.fixture
def storage() -> str:
    return require_postgres()


# ---------------------------------------------------------------- the study lock itself


def _open(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("redis://"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return JournalStorage(JournalRedisBackend(url))
    if "://" not in url:
        return open_journal(Path(url))
    return optuna.storages.RDBStorage(url)


def _count_under_the_lock(url: str, name: str, times: int) -> None:
    """Read, pause, write +1, ``times`` times: without mutual exclusion, updates are lost."""
    study = optuna.load_study(study_name=name, storage=_open(url))
    lock = study_lock(study, url)
    for _ in range(times):
        with lock():
            n = int(study.user_attrs.get("n", 0))
            time.sleep(0.003)
            study.set_user_attr("n", n + 1)


@pytest.mark.parametrize("kind", ["journal", "sqlite", "postgres", "redis"])
def test_the_study_lock_excludes_other_processes(tmp_path: Path, kind: str) -> None:
    url = {"journal": str(tmp_path / "journal.log"),
           "sqlite": f"sqlite:///{tmp_path / 'db.sqlite3'}",
           "postgres": POSTGRES, "redis": REDIS}[kind]
    if kind in ("postgres", "redis"):
        require_service(url)
    name = f"lock-{uuid.uuid4().hex[:12]}"
    optuna.create_study(study_name=name, storage=_open(url))
    try:
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_count_under_the_lock, args=(url, name, 25))
                 for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        study = optuna.load_study(study_name=name, storage=_open(url))
        assert study.user_attrs["n"] == 75
    finally:
        optuna.delete_study(study_name=name, storage=_open(url))


# ---------------------------------------------------------------- nodes


@pytest.fixture
def nodes(storage: str) -> Iterator[list[Node]]:
    """Nodes a test starts; any still running at the end are killed."""
    started: list[Node] = []
    yield started
    for node in started:
        if node.proc.poll() is None:
            node.kill()


@contextlib.contextmanager
def fresh_study(storage: str) -> Iterator[str]:
    """A unique study name, deleted from the database afterwards."""
    name = f"nodes-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=storage)


def load_trials(storage: str, name: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def states(trials: list[FrozenTrial]) -> dict[int, str]:
    return {t.number: t.state.name for t in trials}


def slow_study(name: str, n_trials: int, tmp_path: Path) -> Path:
    """Trials of 8 epochs of at least a second, longer than the grace period: a node that
    judged another node's trial by its own results folder would fail it."""
    write_pacing(tmp_path)  # each epoch lasts at least a second, without using the machine
    raw = regression(
        study={"name": name, "n_trials": n_trials, "heartbeat_interval": HEARTBEAT,
               "grace_period": GRACE},
        train={"max_epochs": 8, "lr_scheduler": None},
        checkpoint={"keep_top_k_trials": 2, "resume_min_seconds": 0},
        resources={"devices": "cpu", "workers": 1, "torch_threads": 1},
        callbacks=["pacing:pause"],
    )
    return write_study(tmp_path, raw)


def training_epoch(results: Path) -> dict[str, Any] | None:
    """A worker status of this node's results folder at epoch 1..4 of a trial, if any."""
    for path in results.glob("*/.hpsearch/workers/slot-*.json"):
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            status = json.loads(path.read_text())
            if status.get("state") == "training" and 1 <= (status.get("epoch") or 0) <= 4:
                return status
    return None


def test_two_nodes_share_one_study_and_leave_each_others_trials_alone(
        tmp_path: Path, storage: str, nodes: list[Node]) -> None:
    with fresh_study(storage) as name:
        study_file = slow_study(name, 4, tmp_path)
        nodes += [Node(tmp_path, study_file, storage, f"node{i}", f"node{i}") for i in (0, 1)]
        codes = [node.wait() for node in nodes]
        outputs = "\n".join(node.output() for node in nodes)
        assert codes == [0, 0], outputs
        trials = load_trials(storage, name)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, (states(trials), outputs)
        assert "went stale" not in outputs
        # Long enough that a node judging the other's trials by its own folder fails them.
        lasted = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                  if t.datetime_complete and t.datetime_start]
        assert min(lasted) > GRACE, lasted
        # Both nodes trained, and each trial names the host and process that trained it.
        workers = {str(t.user_attrs["worker"]) for t in trials}
        assert all(w.startswith(f"{os.uname().nodename}:") for w in workers), workers
        assert len(workers) >= 2, workers


def test_a_killed_node_has_its_trial_resumed_by_the_other(
        tmp_path: Path, storage: str, nodes: list[Node]) -> None:
    with fresh_study(storage) as name:
        study_file = slow_study(name, 3, tmp_path)
        nodes += [Node(tmp_path, study_file, storage, f"node{i}", f"node{i}") for i in (0, 1)]
        victim, survivor = nodes
        status = wait_for(lambda: training_epoch(victim.results), 90, "node0 mid-trial")
        killed_at = datetime.datetime.now()
        victim.kill()
        assert survivor.wait() == 0, survivor.output()

        trials = load_trials(storage, name)
        failed = trials[status["trial"]]
        assert failed.state == TrialState.FAIL, states(trials)
        assert "heartbeats" in failed.user_attrs["fail_reason"], failed.user_attrs
        # Failed by the survivor once the heartbeat was grace_period old: not before (the
        # trial was alive until the kill), and not much after (the survivor checks every
        # grace_period / 2).
        assert failed.datetime_complete is not None
        after = (failed.datetime_complete - killed_at).total_seconds()
        assert GRACE - HEARTBEAT - 1 <= after <= GRACE + GRACE / 2 + 4, after
        retry = [t for t in trials if t.system_attrs.get("retry_history") == [failed.number]]
        assert len(retry) == 1, states(trials)
        assert retry[0].state == TrialState.COMPLETE
        # From the last epoch only where last.pt is reachable (a shared store); here each
        # node has its own folder, so the retry starts over, and says where it came from.
        resumed = retry[0].user_attrs["resumed_from"]
        assert resumed["trial"] == failed.number and resumed["epoch"] >= 0, resumed
        assert retry[0].user_attrs["worker"] != failed.user_attrs["worker"]
        counted = [t for t in trials if t.number != failed.number]
        assert [t.state for t in counted] == [TrialState.COMPLETE] * 3, states(trials)


def race_study(name: str, tmp_path: Path, n_trials: int) -> Path:
    """Many trials of one tiny epoch on two architectures: claims (and the planned
    architecture trials) from three nodes overlap all the time."""
    raw = regression(
        study={"name": name, "n_trials": n_trials, "min_trials_per_architecture": 2},
        data={"args": {"n_samples": 120}},
        model={"architecture": {"linear": {},
                                "mlp": {"hidden": {"type": "int", "low": 4, "high": 8}}}},
        train={"max_epochs": 1, "batch_size": 64},
        checkpoint={"keep_top_k_trials": 1},
        resources={"devices": "cpu", "workers": 2, "torch_threads": 1},
    )
    return write_study(tmp_path, raw, f"{name}.yaml")


def test_three_nodes_finish_exactly_n_trials_round_after_round(
        tmp_path: Path, storage: str, nodes: list[Node]) -> None:
    n_trials = 10
    for round_ in range(10):
        with fresh_study(storage) as name:
            study_file = race_study(name, tmp_path, n_trials)
            group = [Node(tmp_path, study_file, storage, f"r{round_}n{i}", f"r{round_}n{i}")
                     for i in range(3)]
            nodes += group
            codes = [node.wait() for node in group]
            outputs = "\n".join(node.output() for node in group)
            assert codes == [0, 0, 0], outputs
            trials = load_trials(storage, name)
            # Every trial that exists started (none left queued) and completed: none was
            # trained beyond the total.
            assert [t.state for t in trials] == [TrialState.COMPLETE] * n_trials, (
                f"round {round_}: {states(trials)}")
            assert sorted(t.number for t in trials) == list(range(n_trials))
