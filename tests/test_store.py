"""Checkpoints across machines: a shared artifact store (a real S3 server, moto, on loopback)
and a shared PostgreSQL storage, with ``python -m hpsearch.run`` processes as nodes that
share no folder.

What a user relies on: every kept checkpoint, the study best and the resume state are in
the bucket; retention deletes from the bucket; a trial killed on one node resumes on another
from its last epoch; a machine that ran nothing loads and verifies the best from the storage
URL alone; and two nodes finishing at once leave the better trial as the best.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from processes import HpsearchRun, wait_for, write_pacing
from services import require, require_postgres
from studyfiles import derive, regression, write_study

import hpsearch
from hpsearch import attrs
from hpsearch.checkpoint.artifacts import open_artifact_store
from hpsearch.checkpoint.loading import load_model
from hpsearch.checkpoint.mirror import TrialMirror
from hpsearch.checkpoint.shared import kept_checkpoint
from hpsearch.checkpoint.study_best import read_best_record, record_best, record_config
from hpsearch.checkpoint.trial_files import TrialFiles
from hpsearch.config import parse_config
from hpsearch.dashboard import resolve_storage
from hpsearch.errors import CheckpointError, UsageError
from hpsearch.ranking import best_trial
from hpsearch.results import MANIFEST, RESUME_STATE, ResultsLayout
from hpsearch.verify import main as verify_main

optuna.logging.set_verbosity(optuna.logging.WARNING)

pytestmark = pytest.mark.slow

MAX_EPOCHS = 8
RUN_TIMEOUT = 240.0
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


# ---------------------------------------------------------------- services


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3 server on loopback for this module's tests: ``python -m moto.server``."""
    try:
        import moto.server  # noqa: F401 (only checks that moto[server] is installed)
    except ImportError as err:
        require(False, f"moto[server] is not installed ({err}): pip install 'moto[server]'")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **CREDENTIALS})
    try:
        def up() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return server.poll() is not None
        wait_for(up, 30, "the moto S3 server")
        require(server.poll() is None, "the moto S3 server did not start")
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Dummy credentials, as boto3 reads them, here and in every process a test starts."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    return dict(CREDENTIALS)


@pytest.fixture
def bucket(s3_endpoint: str, aws_env: dict[str, str]) -> str:
    import boto3

    name = f"hpsearch-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def pg_study() -> Iterator[tuple[str, str]]:
    """(PostgreSQL URL, a fresh study name); the study is deleted afterwards."""
    url = require_postgres()
    name = f"store-{uuid.uuid4().hex[:10]}"
    yield url, name
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=url)


def bucket_keys(endpoint: str, name: str) -> set[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=name)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


# ---------------------------------------------------------------- study files and nodes


def node_study(name: str, endpoint: str, bucket_name: str, **sections: Any) -> dict[str, Any]:
    """A small regression study on PostgreSQL whose checkpoints go to the bucket."""
    raw = regression(
        study={"name": name, "n_trials": 2},
        data={"args": {"n_samples": 600}},
        train={"max_epochs": MAX_EPOCHS, "batch_size": 16, "lr_scheduler": None},
        checkpoint={"keep_top_k_trials": 1, "resume_min_seconds": 0},
        resources={"workers": 1, "torch_threads": 1},
        artifacts={"store": "boto3", "bucket": bucket_name, "endpoint_url": endpoint},
    )
    return derive(raw, **sections)


class Node(HpsearchRun):
    """``python -m hpsearch.run`` with its own results folder, in its own session (as on
    its own machine)."""

    def __init__(self, cwd: Path, study_file: Path, storage: str, label: str,
                 **env: str) -> None:
        super().__init__(cwd, [str(study_file), "--storage", storage, "--results-dir", label,
                               "--no-report"], label, env)

    def results(self, name: str) -> Path:
        return self.cwd / self.label / name

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        return super().wait(timeout)


def elsewhere(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python in a fresh folder that holds no results (a third machine)."""
    folder = tmp_path / "laptop"
    folder.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], cwd=folder,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


# ---------------------------------------------------------------- in one process


@pytest.mark.parametrize(("artifacts", "shared"), [
    ({}, False),  # the default store lives in the results folder: nothing changes
    ({"store": "filesystem", "path": "/shared/ckpt"}, True),
    ({"store": "boto3", "bucket": "b"}, True),
    ({"store": "boto3", "bucket": "b", "shared": False}, False),
    ({"store": "filesystem", "shared": True}, True),  # a results folder on NFS
])
def test_which_stores_are_shared(artifacts: dict[str, Any], shared: bool) -> None:
    config = parse_config(regression(artifacts=artifacts), "test")
    assert config.artifacts.shares_trials is shared


@pytest.mark.parametrize("kind", ["boto3", "filesystem"])
def test_a_trials_files_go_to_the_store_and_come_back(tmp_path: Path, kind: str,
                                                      request: pytest.FixtureRequest) -> None:
    """The same on S3 and on a shared folder (NFS): each file in the store as it is written,
    rotated files deleted there too, and the whole folder back on another node."""
    if kind == "boto3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket_name = request.getfixturevalue("bucket")
        raw = node_study("mirror", endpoint, bucket_name)

        def listed() -> set[str]:
            return bucket_keys(endpoint, bucket_name)
    else:
        shared = tmp_path / "nfs"
        raw = regression(artifacts={"store": "filesystem", "path": str(shared)})

        def listed() -> set[str]:
            return {p.name for p in shared.iterdir()} if shared.exists() else set()
    config = parse_config(raw, "test")
    assert config.artifacts.shares_trials
    store = open_artifact_store(config, tmp_path)
    assert store is not None
    study = optuna.create_study()
    trial = study.ask()
    mirror = TrialMirror.start(store, trial)
    files = TrialFiles(tmp_path / "a", "val_loss", "min", 1, mirror)
    files.folder.mkdir()
    files.save("epoch000.pt", {"w": torch.ones(2)}, "best", 0, 0.5)
    files.save("epoch001.pt", {"w": torch.zeros(2)}, "best", 1, 0.4)  # rotates epoch000 out
    for epoch in (0, 1):  # replaced in place, as each epoch's resume state is
        torch.save({"epoch": epoch}, files.folder / RESUME_STATE)
        mirror.put(files.folder / RESUME_STATE)
    assert listed() == {mirror.object_id(n) for n in ("epoch001.pt", MANIFEST, RESUME_STATE)}

    # Another node: a fresh folder, the files found through the trial's recorded key.
    found = TrialMirror.of(store, study.trials[0])
    assert found is not None and found.key == mirror.key
    fetched = found.fetch_folder(tmp_path / "b")
    assert sorted(fetched) == sorted(["epoch001.pt", MANIFEST, RESUME_STATE])
    other = TrialFiles(tmp_path / "b", "", "", 1)
    assert other.best() is not None and other.best()[0] == "epoch001.pt"  # type: ignore[index]
    assert torch.load(tmp_path / "b" / "epoch001.pt", weights_only=True)["w"].sum() == 0
    assert torch.load(tmp_path / "b" / RESUME_STATE, weights_only=True) == {"epoch": 1}
    found.remove_all()
    assert listed() == set()


def test_the_best_record_repairs_a_stale_write_of_a_node_that_finished_at_once(
        pg_study: tuple[str, str]) -> None:
    """Node A saw only its own (worse) trial; node B recorded its better one first; A's
    late write is repaired by A itself, so the worse trial never stays the best."""
    url, name = pg_study
    config = parse_config(regression(study={"name": name}), "test")  # minimize val_loss
    node_a = optuna.create_study(study_name=name, storage=url, direction="minimize")
    node_b = optuna.load_study(study_name=name, storage=url)
    worse, better = node_a.ask(), node_b.ask()
    for trial in (worse, better):
        trial.set_user_attr(attrs.CHECKPOINT_ARTIFACT, f"artifact-{trial.number}")
        trial.set_user_attr(attrs.CHECKPOINT_SHA256, "0" * 64)
    node_a.tell(worse, 0.5)
    stale = node_a.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    real = node_a.get_trials

    def a_reads_before_b_finishes(*args: Any, **kwargs: Any) -> list[optuna.trial.FrozenTrial]:
        node_a.get_trials = real  # type: ignore[method-assign]
        node_b.tell(better, 0.1)
        assert record_best(node_b, config)["trial"] == better.number  # type: ignore[index]
        return stale

    node_a.get_trials = a_reads_before_b_finishes  # type: ignore[method-assign]
    writes: list[Any] = []
    storage = node_a._storage
    set_attr = storage.set_study_system_attr

    def counted(study_id: int, key: str, value: Any) -> None:
        writes.append(value)
        set_attr(study_id, key, value)

    storage.set_study_system_attr = counted  # type: ignore[method-assign]
    try:
        record = record_best(node_a, config)
    finally:
        storage.set_study_system_attr = set_attr  # type: ignore[method-assign]
    assert [w["trial"] for w in writes] == [worse.number, better.number]  # stale, then repaired
    assert record is not None and record["trial"] == better.number
    assert read_best_record(node_a._storage, node_a._study_id)["trial"] == better.number  # type: ignore[index]


def test_loading_from_a_storage_says_what_is_missing(pg_study: tuple[str, str]) -> None:
    url, name = pg_study
    with pytest.raises(UsageError, match="no study"):
        hpsearch.load_best_model(storage=url, study=name)
    study = optuna.create_study(study_name=name, storage=url)
    with pytest.raises(UsageError, match="records no study file"):
        hpsearch.load_best_model(storage=url, study=name)
    record_config(study, parse_config(regression(
        artifacts={"store": "boto3", "bucket": "b", "endpoint_url": "http://127.0.0.1:9"}),
        "test"))
    with pytest.raises(CheckpointError, match="records no study best yet"):
        hpsearch.load_checkpoint(storage=url, study=name)
    with pytest.raises(UsageError, match="name one checkpoint"):
        hpsearch.load_best_model()
    with pytest.raises(SystemExit) as exited:
        verify_main(["results/x", "--storage", url])
    assert exited.value.code == 2


# ---------------------------------------------------------------- nodes as processes


def _state_sum(state: dict[str, torch.Tensor]) -> float:
    return float(sum(float(v.double().sum()) for v in state.values()))


LOAD_ELSEWHERE = """
import json, sys, hpsearch
model = hpsearch.load_best_model(storage=sys.argv[1], study=sys.argv[2])
ckpt = hpsearch.load_checkpoint(storage=sys.argv[1], study=sys.argv[2])
print(json.dumps({"trial": ckpt["trial"],
                  "sum": float(sum(float(v.double().sum()) for v in model.state_dict().values()))}))
"""


def test_two_nodes_share_checkpoints_and_best_through_the_bucket(
        tmp_path: Path, s3_endpoint: str, bucket: str, pg_study: tuple[str, str]) -> None:
    url, name = pg_study
    # A long grace period: this test is about checkpoints, not liveness across nodes.
    raw = node_study(name, s3_endpoint, bucket, study={"name": name, "n_trials": 4,
                                                     "grace_period": 60},
                     train={"max_epochs": 3, "batch_size": 32, "lr_scheduler": None})
    study_file = write_study(tmp_path, raw)
    nodes = [Node(tmp_path, study_file, url, label) for label in ("node-a", "node-b")]
    try:
        codes = [node.wait() for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert codes == [0, 0], "\n".join(n.output() for n in nodes)

    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 4
    best = best_trial(trials, minimize=True)
    assert best is not None
    # The best is decided through the storage: the better trial, whichever node ran it.
    record = read_best_record(study._storage, study._study_id)
    assert record is not None and record["trial"] == best.number
    assert record["artifact"] == best.user_attrs[attrs.CHECKPOINT_ARTIFACT]
    # Each node's best/ caught up with it at the end of its run.
    for node in nodes:
        meta = json.loads((node.results(name) / "best" / "meta.json").read_text())
        assert meta["trial"] == best.number, node.label

    # The bucket: what retention keeps (its checkpoint and manifest), the study best
    # artifact, no resume state (every trial ended), nothing of the trials that fell out.
    keys = bucket_keys(s3_endpoint, bucket)
    assert record["artifact"] in keys
    assert study.user_attrs[attrs.STUDY_BEST_ARTIFACT] in keys
    assert not [k for k in keys if k.endswith(RESUME_STATE)], keys
    store_keys = {t.number: t.user_attrs[attrs.STORE_KEY] for t in complete}
    holders = {n for n, key in store_keys.items() if any(k.startswith(key + ".") for k in keys)}
    assert best.number in holders
    # keep_top_k_trials 1, one architecture: the best alone keeps files.
    assert holders == {best.number}, (holders, sorted(keys))
    assert keys == {study.user_attrs[attrs.STUDY_BEST_ARTIFACT], record["artifact"],
                    f"{store_keys[best.number]}.{MANIFEST}"}

    # A third machine: only the storage URL (and the bucket, through the study's record).
    loaded = elsewhere(tmp_path, LOAD_ELSEWHERE, url, name)
    assert loaded.returncode == 0, loaded.stderr
    got = json.loads(loaded.stdout)
    assert got["trial"] == best.number
    local = torch.load(nodes[0].results(name) / "best" / "model.pt", weights_only=True)
    assert got["sum"] == pytest.approx(_state_sum(local["model_state_dict"]))
    verified = elsewhere(tmp_path, "", "-m", "hpsearch.verify", "--storage", url,
                         "--study", name)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("OK: "), verified.stdout
    assert not list((tmp_path / "laptop").iterdir())  # it left nothing behind

    # The report from a machine that ran no trial: the test score comes from the bucket.
    reported = elsewhere(tmp_path, "", "-m", "hpsearch.report", "--storage", url, "--study",
                         name, "--no-seeds", "--results-dir", str(tmp_path / "laptop-report"))
    assert reported.returncode == 0, reported.stdout + reported.stderr
    rows = list(csv.DictReader(open(tmp_path / "laptop-report" / name / "architectures.csv")))
    test_column = next(k for k in rows[0] if k.startswith("test_"))
    assert all(row[test_column] not in ("", "nan") for row in rows), rows

    # The report's and the dashboard's way in, on a machine without the files.
    config = parse_config(raw, "test")
    elsewhere_layout = ResultsLayout(tmp_path / "laptop-results" / name)
    copy = kept_checkpoint(config, best, elsewhere_layout)
    assert copy is not None and copy.parent == elsewhere_layout.fetched("x").parent
    assert _state_sum(load_model(copy).state_dict()) == pytest.approx(got["sum"])
    target = resolve_storage(url, name)
    assert target.study_name == name
    with contextlib.closing(target.artifact_store.open_reader(record["artifact"])) as reader:
        assert reader.read(2)


HOLD_AT = 3


def test_a_trial_killed_on_one_node_resumes_on_another_from_its_last_epoch(
        tmp_path: Path, s3_endpoint: str, bucket: str, pg_study: tuple[str, str]) -> None:
    url, name = pg_study
    # Node A's trial holds at epoch HOLD_AT (the pacing:hold callback), so the kill lands mid-trial
    # however fast the epochs are; node B, without the variable, trains straight through.
    write_pacing(tmp_path)
    raw = node_study(name, s3_endpoint, bucket, study={"name": name, "n_trials": 1,
                                                     "grace_period": 3},
                     callbacks=["pacing:hold"])
    study_file = write_study(tmp_path, raw)
    node_a = Node(tmp_path, study_file, url, "node-a", HPSEARCH_TEST_HOLD_AT_EPOCH=str(HOLD_AT))
    status_file = node_a.results(name) / ".hpsearch" / "workers" / "slot-0.json"

    def held() -> dict[str, Any] | None:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            status = json.loads(status_file.read_text())
            if status.get("state") == "training" and status.get("epoch") == HOLD_AT:
                return status
        return None

    def resume_state_stored() -> bool:
        return any(k.endswith(f".{RESUME_STATE}") for k in bucket_keys(s3_endpoint, bucket))

    try:
        status = wait_for(held, 120, "node A mid-trial", node_a)
        wait_for(resume_state_stored, 60, "node A's resume state in the bucket", node_a)
        # The whole node goes: its run and its worker.
        node_a.proc.send_signal(signal.SIGKILL)
        os.kill(int(status["pid"]), signal.SIGKILL)
        node_a.wait(10)
    finally:
        node_a.kill()
    # Past the grace period, so node B's first claim finds the trial stale and resumes it.
    time.sleep(4)
    killed = int(status["trial"])
    study = optuna.load_study(study_name=name, storage=url)
    stored = study.get_trials(deepcopy=False)[killed]
    key = stored.user_attrs[attrs.STORE_KEY]
    assert f"{key}.{RESUME_STATE}" in bucket_keys(s3_endpoint, bucket)

    # Node B has never seen node A's folder.
    node_b = Node(tmp_path, study_file, url, "node-b")
    try:
        assert node_b.wait() == 0, node_b.output()
    finally:
        node_b.kill()
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    assert trials[killed].state == TrialState.FAIL
    (retry,) = [t for t in trials if killed in t.system_attrs.get(attrs.RETRY_HISTORY, [])]
    assert retry.state == TrialState.COMPLETE, node_b.output()
    resumed = retry.user_attrs[attrs.RESUMED_FROM]
    assert resumed["trial"] == killed and resumed["epoch"] >= 2, resumed
    # It continued: every epoch reported once, in order, none trained twice from scratch.
    assert sorted(retry.intermediate_values) == list(range(MAX_EPOCHS))
    log = ResultsLayout(node_b.results(name)).train_log(retry.number).read_text()
    assert f"fetched trial {killed}'s files from the store" in log, log
    # The dead trial's files moved to the retry's key: nothing of the dead trial is left.
    keys = bucket_keys(s3_endpoint, bucket)
    assert not [k for k in keys if k.startswith(key + ".")], keys
