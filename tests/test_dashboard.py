"""Checkpoints as Optuna artifacts, and ``python -m hpsearch.dashboard`` serving them.

Unit tests drive the artifact functions on in-memory studies; the slow tests run a real tiny
study, start the dashboard as a subprocess and read it over HTTP and in headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import optuna
import pytest
from browser import dump_dom, requires_chromium, screenshot
from optuna.artifacts import Boto3ArtifactStore, get_all_artifact_meta
from optuna.artifacts.exceptions import ArtifactNotFound
from studyfiles import tiny, write_study

from hpsearch import dashboard
from hpsearch.attrs import CHECKPOINT_ARTIFACT as TRIAL_ATTR
from hpsearch.attrs import STUDY_BEST_ARTIFACT as BEST_ATTR
from hpsearch.attrs import STUDY_BEST_TRIAL as BEST_TRIAL_ATTR
from hpsearch.checkpoint import artifacts
from hpsearch.checkpoint.artifacts import (
    MIMETYPE,
    LinkingArtifactStore,
    open_artifact_store,
    publish_study_best,
    publish_trial_checkpoint,
    retire_trial_checkpoint,
    retired_artifacts,
)
from hpsearch.checkpoint.study_best import update_study_best
from hpsearch.config import parse_config
from hpsearch.dashboard import RETIRED_NOTE, PresentedStorage, present, resolve, study_url

optuna.logging.set_verbosity(optuna.logging.WARNING)

ARTIFACTS = Path(__file__).parent / "artifacts"
EPOCHS, TRIALS, KEEP = 3, 4, 2


# ---------------------------------------------------------------- the linking store


def test_store_links_an_uploaded_file_instead_of_copying(tmp_path: Path) -> None:
    store = LinkingArtifactStore(tmp_path / "store")
    src = tmp_path / "model.pt"
    src.write_bytes(b"weights" * 1000)
    study = optuna.create_study()
    trial = study.ask()
    artifact_id = publish_trial_checkpoint(store, trial, src)
    stored = tmp_path / "store" / artifact_id
    assert stored.stat().st_ino == src.stat().st_ino
    assert src.stat().st_nlink == 2
    assert trial.user_attrs[TRIAL_ATTR] == artifact_id
    (meta,) = get_all_artifact_meta(trial)
    assert (meta.artifact_id, meta.filename, meta.mimetype) == (artifact_id, "model.pt", MIMETYPE)
    with store.open_reader(artifact_id) as f:
        assert f.read() == src.read_bytes()


def test_store_copies_streams_and_files_replaced_since_opened(tmp_path: Path) -> None:
    import io

    store = LinkingArtifactStore(tmp_path / "store")
    store.write("a", io.BytesIO(b"stream"))
    assert (tmp_path / "store" / "a").read_bytes() == b"stream"
    path = tmp_path / "f.pt"
    path.write_bytes(b"old")
    with open(path, "rb") as f:
        path.unlink()
        path.write_bytes(b"new")  # another inode under the same name
        store.write("b", f)
    assert (tmp_path / "store" / "b").read_bytes() == b"old"
    assert (tmp_path / "store" / "b").stat().st_ino != path.stat().st_ino
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["a", "b"]


def test_store_copies_with_a_warning_where_links_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(src: Any, dst: Any) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(artifacts.os, "link", cross_device)
    store = LinkingArtifactStore(tmp_path / "store")
    path = tmp_path / "f.pt"
    path.write_bytes(b"data")
    with pytest.warns(UserWarning, match="copied"), open(path, "rb") as f:
        store.write("x", f)
    assert (tmp_path / "store" / "x").read_bytes() == b"data"


def test_store_reports_missing_artifacts_and_bad_ids(tmp_path: Path) -> None:
    store = LinkingArtifactStore(tmp_path / "store")
    with pytest.raises(ArtifactNotFound):
        store.open_reader("nope")
    with pytest.raises(ArtifactNotFound):
        store.remove("nope")
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            store.open_reader(bad)
    assert not (tmp_path / "store").exists()  # reading never creates the store


def _config(**artifacts_section: Any) -> Any:
    raw = tiny(artifacts=artifacts_section) if artifacts_section else tiny()
    return parse_config(raw, "test")


def test_open_artifact_store_follows_the_config(tmp_path: Path) -> None:
    default = open_artifact_store(_config(), tmp_path / "tiny")
    assert isinstance(default, LinkingArtifactStore)
    assert default.base_path == tmp_path / "tiny" / "artifacts"
    elsewhere = open_artifact_store(_config(path=str(tmp_path / "x")), tmp_path / "tiny")
    assert elsewhere.base_path == tmp_path / "x"
    assert open_artifact_store(_config(store="none"), tmp_path / "tiny") is None
    s3 = open_artifact_store(
        _config(store="boto3", bucket="ckpts", endpoint_url="http://127.0.0.1:9000"),
        tmp_path / "tiny",
    )
    assert isinstance(s3, Boto3ArtifactStore)
    assert s3.bucket == "ckpts"
    assert s3.client.meta.endpoint_url == "http://127.0.0.1:9000"


# ---------------------------------------------------------------- study best and retirement


class DictStore:
    """An artifact store without a file system (like S3): every write is a copy."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def open_reader(self, artifact_id: str) -> BinaryIO:
        import io

        if artifact_id not in self.files:
            raise ArtifactNotFound(artifact_id)
        return io.BytesIO(self.files[artifact_id])

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.files[artifact_id] = content_body.read()

    def remove(self, artifact_id: str) -> None:
        self.files.pop(artifact_id, None)


def _finish_trial(study: optuna.Study, store: Any, results: Path, value: float) -> int:
    """One COMPLETE trial with a checkpoint, published and offered as the study best."""
    trial = study.ask()
    folder = results / "trials" / str(trial.number)
    folder.mkdir(parents=True)
    path = folder / f"epoch001-val_acc{value:.4f}.pt"
    path.write_bytes(f"trial {trial.number}".encode() * 100)
    trial.set_user_attr("checkpoint", str(path.relative_to(results)))
    publish_trial_checkpoint(store, trial, path)
    study.tell(trial, value)
    meta = {"trial": trial.number, "value": value}
    if update_study_best(results, path, meta, minimize=False):
        publish_study_best(store, study, results)
    return trial.number


def test_study_best_is_one_artifact_that_follows_the_best(tmp_path: Path) -> None:
    results = tmp_path / "tiny"
    store = LinkingArtifactStore(results / "artifacts")
    study = optuna.create_study(study_name="tiny", direction="maximize")
    first = _finish_trial(study, store, results, 0.5)
    best_id = study.user_attrs[BEST_ATTR]
    assert study.user_attrs[BEST_TRIAL_ATTR] == first
    _finish_trial(study, store, results, 0.4)  # worse: nothing changes
    second = _finish_trial(study, store, results, 0.7)
    assert study.user_attrs[BEST_ATTR] == best_id  # the same artifact, new content
    assert study.user_attrs[BEST_TRIAL_ATTR] == second
    (meta,) = get_all_artifact_meta(study)
    assert meta.artifact_id == best_id
    assert meta.filename == "best-trial2-epoch001-val_acc0.7000.pt"
    assert meta.mimetype == MIMETYPE
    best_file = results / "best" / "model.pt"
    assert (results / "artifacts" / best_id).stat().st_ino == best_file.stat().st_ino
    # Idempotent: a second call (another worker) writes nothing new.
    before = (results / "artifacts" / best_id).stat().st_ino
    assert publish_study_best(store, study, results) == best_id
    assert (results / "artifacts" / best_id).stat().st_ino == before


def test_study_best_without_local_files_copies_the_trial_artifact(tmp_path: Path) -> None:
    # A machine without the best trial's files (no shared file system) still publishes it.
    store = DictStore()
    study = optuna.create_study(study_name="s3", direction="minimize")
    ran_here = tmp_path / "elsewhere"
    _finish_trial(study, store, ran_here, 0.3)
    trial_id = study.trials[0].user_attrs[TRIAL_ATTR]
    best_id = publish_study_best(store, study, tmp_path / "here")
    assert best_id is not None
    assert store.files[best_id] == store.files[trial_id]
    assert publish_study_best(store, optuna.create_study(), tmp_path / "empty") is None


def test_retired_checkpoint_is_hidden_from_the_dashboard(tmp_path: Path) -> None:
    results = tmp_path / "tiny"
    store = LinkingArtifactStore(results / "artifacts")
    study = optuna.create_study(study_name="tiny", direction="maximize")
    old = _finish_trial(study, store, results, 0.2)
    _finish_trial(study, store, results, 0.9)
    frozen = study.trials[old]
    artifact_id = frozen.user_attrs[TRIAL_ATTR]
    assert retire_trial_checkpoint(store, study, frozen) == artifact_id
    assert not (results / "artifacts" / artifact_id).exists()
    assert retired_artifacts(study._storage, study._study_id) == {artifact_id: old}
    # Retiring twice, or a trial that published nothing, is harmless.
    assert retire_trial_checkpoint(store, study, frozen) == artifact_id
    pending = study.ask()
    assert retire_trial_checkpoint(store, study, study.trials[pending.number]) is None

    view = PresentedStorage(study._storage)
    shown = view.get_all_trials(study._study_id)
    assert shown[old].user_attrs["checkpoint"] == RETIRED_NOTE
    assert TRIAL_ATTR not in shown[old].user_attrs
    assert not [k for k in shown[old].system_attrs if k.startswith("artifacts:")]
    assert view.get_trial(frozen._trial_id).user_attrs["checkpoint"] == RETIRED_NOTE
    assert [k for k in shown[1].system_attrs if k.startswith("artifacts:")]
    # The stored trial is untouched: the view copies.
    assert study.trials[old].user_attrs[TRIAL_ATTR] == artifact_id


def test_present_orders_attributes_and_summarizes_history() -> None:
    history = [
        {"epoch": e, "train_loss": 2.0 - e / 10, "val_acc": 0.2 + e / 10, "lr": 1e-3,
         "seconds": e}
        for e in range(40)
    ]
    trial = optuna.trial.create_trial(
        value=0.5,
        user_attrs={"worker": "h:1", "history": history, "device": "cpu", "n_params": 10,
                    "architecture": "mlp", "checkpoint": "trials/0/x.pt", "note": "kept"},
    )
    attrs = present(trial, set()).user_attrs
    assert list(attrs)[:5] == ["architecture", "n_params", "checkpoint", "device", "worker"]
    assert list(attrs)[-2:] == ["history", "note"]
    assert attrs["history"] == "40 epochs: train_loss 2→-1.9, val_acc 0.2→4.1"
    assert trial.user_attrs["history"] is history


# ---------------------------------------------------------------- the command line


def test_bad_arguments_exit_2_with_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    not_started = write_study(tmp_path, tiny())
    (tmp_path / "notes.txt").write_text("x")
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(empty)], "neither config.yaml nor journal.log"),
        ([str(tmp_path / "notes.txt")], "neither a study file"),
        ([str(not_started), "--results-dir", str(tmp_path / "r")], "has not started"),
        ([str(tmp_path / "missing.yaml")], "does not exist"),
    ]
    for argv, message in cases:
        assert dashboard.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exc:
        dashboard.main([str(empty), "--port", "70000"])
    assert exc.value.code == 2
    assert "--port must be between 0 and 65535" in capsys.readouterr().err


def test_busy_port_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    study = optuna.create_study(
        study_name="busy",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log"))
        ),
    )
    assert study.study_name == "busy"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert dashboard.main([str(tmp_path), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# ---------------------------------------------------------------- a real study, served


def _study_file(tmp_path: Path) -> Path:
    raw = tiny(
        study={"n_trials": TRIALS},
        data={"name": "mnist1d", "args": {"num_samples": 400}},
        model={"architecture": {"mlp": {"hidden": {"type": "int", "low": 16, "high": 64}}}},
        train={"max_epochs": EPOCHS},
        checkpoint={"keep_top_k_trials": KEEP},
    )
    return write_study(tmp_path, raw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Results folder of a finished study: one architecture, so only the top-k keep files."""
    root = tmp_path_factory.mktemp("dash")
    study_file = _study_file(root)
    run = subprocess.run(
        [sys.executable, "-m", "hpsearch.run", str(study_file), "--results-dir",
         str(root / "res")],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return root / "res" / "tiny"


@pytest.fixture(scope="module")
def served(finished: Path) -> Iterator[tuple[str, int]]:
    """The dashboard on a free loopback port: (base URL, study id); stopped by its pid."""
    log = open(finished.parent / "dashboard.stderr", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpsearch.dashboard", str(finished), "--port", "0"],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 60
    found = None
    while found is None and time.monotonic() < deadline and proc.poll() is None:
        found = next((m for line in lines
                      if (m := re.search(r"(http://127\.0\.0\.1:\d+)/dashboard/studies/(\d+)",
                                         line))), None)
        time.sleep(0.05)
    try:
        assert found is not None, f"no URL printed: {lines}, exit {proc.poll()}"
        yield found.group(1), int(found.group(2))
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=10)
        log.close()
        assert code == -signal.SIGTERM


def _get(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read(), r.headers.get("Content-Type", "")


def _api(base: str, path: str) -> Any:
    return json.loads(_get(base + path)[0])


@pytest.mark.slow
def test_dashboard_serves_trials_curves_and_checkpoints(
    finished: Path, served: tuple[str, int]
) -> None:
    base, study_id = served
    (summary,) = _api(base, "/api/studies")["study_summaries"]
    assert (summary["study_id"], summary["study_name"]) == (study_id, "tiny")
    detail = _api(base, f"/api/studies/{study_id}")
    trials = detail["trials"]
    assert len(trials) == TRIALS
    assert {t["state"] for t in trials} == {"Complete"}
    assert all(len(t["intermediate_values"]) == EPOCHS for t in trials)

    # The study best artifact is byte-identical to best/model.pt.
    (best,) = detail["artifacts"]
    best_number = json.loads((finished / "best" / "meta.json").read_text())["trial"]
    assert best["filename"].startswith(f"best-trial{best_number}-epoch")
    data, mimetype = _get(f"{base}/artifacts/{study_id}/{best['artifact_id']}")
    assert mimetype == MIMETYPE
    assert data == (finished / "best" / "model.pt").read_bytes()

    kept = retired = 0
    for t in trials:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert [k for k in attrs][:7] == ["architecture", "n_params", "best_epoch", "best_value",
                                          "checkpoint", "train_seconds", "device"]
        assert attrs["architecture"] == "mlp" and int(attrs["n_params"]) > 0
        assert attrs["history"].startswith(f"{EPOCHS} epochs: train_loss ")
        if attrs["checkpoint"] == RETIRED_NOTE:
            retired += 1
            assert t["artifacts"] == []
        else:
            kept += 1
            (art,) = t["artifacts"]
            assert art["filename"] == Path(attrs["checkpoint"]).name
            data, _ = _get(f"{base}/artifacts/{study_id}/{t['trial_id']}/{art['artifact_id']}")
            assert data == (finished / attrs["checkpoint"]).read_bytes()
    assert (kept, retired) == (KEEP, TRIALS - KEEP)
    # A retired artifact's address is gone, not a server error.
    retired_ids = _retired_ids(finished)
    assert len(retired_ids) == TRIALS - KEEP
    for art_id, number in retired_ids.items():
        trial_id = next(t["trial_id"] for t in trials if t["number"] == number)
        with pytest.raises(urllib.error.HTTPError) as exc:
            _get(f"{base}/artifacts/{study_id}/{trial_id}/{art_id}")
        assert exc.value.code == 404


def _retired_ids(results: Path) -> dict[str, int]:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(results / "journal.log")))
    study_id = storage.get_study_id_from_name("tiny")
    return retired_artifacts(storage, study_id)


@pytest.mark.slow
def test_study_file_resolves_to_the_same_storage_and_store(finished: Path) -> None:
    study_file = finished.parent.parent / "study.yaml"
    target = resolve(str(study_file), str(finished.parent))
    assert target.study_name == "tiny"
    assert isinstance(target.artifact_store, LinkingArtifactStore)
    assert target.artifact_store.base_path == finished / "artifacts"
    study_id = target.storage.get_study_id_from_name("tiny")
    assert study_url(target, "http://h:1") == f"http://h:1/dashboard/studies/{study_id}"
    # The results folder alone opens the same study, through the run's config.yaml.
    folder = resolve(str(finished), "elsewhere")
    assert (folder.study_name, folder.description) == ("tiny", target.description)
    assert folder.artifact_store.base_path == finished / "artifacts"


def _inodes(paths: list[Path]) -> dict[tuple[int, int], int]:
    out = {}
    for p in paths:
        st = p.stat()
        out[(st.st_dev, st.st_ino)] = st.st_size
    return out


@pytest.mark.slow
def test_kept_checkpoints_take_their_own_size_on_disk_not_twice(finished: Path) -> None:
    files = [p for p in finished.rglob("*") if p.is_file() and not p.is_symlink()
             and "data" not in p.relative_to(finished).parts]
    checkpoints = _inodes([p for p in files if p.parent.parent.name == "trials"
                           and p.suffix == ".pt"])
    store = _inodes([p for p in files if p.parent.name == "artifacts"])
    best_stages = _inodes([p for p in files if p.parts[-3] == ".best" and p.name == "model.pt"])
    assert len(checkpoints) == KEEP
    assert len(list((finished / "artifacts").iterdir())) == KEEP + 1  # the kept + study best
    assert set(store) == set(checkpoints)  # every store file is a kept checkpoint's inode
    apparent = sum(p.stat().st_size for p in files)
    unique = sum(_inodes(files).values())
    small = sum(size for key, size in _inodes(files).items()
                if key not in checkpoints and key not in best_stages)
    # Disk holds the kept checkpoints once, plus at most the previous best's stage (kept
    # for readers of the old ``best`` link), plus JSON and logs.
    extra_stage = sum(size for key, size in best_stages.items() if key not in checkpoints)
    assert unique == sum(checkpoints.values()) + extra_stage + small
    assert extra_stage <= max(checkpoints.values())
    assert apparent >= 2 * sum(checkpoints.values())  # what copies would have cost
    print(f"\nkept checkpoints {sum(checkpoints.values())} B; all files {apparent} B "
          f"by path, {unique} B on disk (previous-best stage {extra_stage} B, other {small} B)")


@pytest.mark.slow
@pytest.mark.browser
@requires_chromium
def test_browser_lists_the_trials_and_the_checkpoint(
    finished: Path, served: tuple[str, int]
) -> None:
    base, study_id = served
    best = json.loads((finished / "best" / "meta.json").read_text())
    url = f"{base}/dashboard/studies/{study_id}/trials?numbers={best['trial']}"
    dom, errors = dump_dom(url, budget_ms=15_000)
    assert errors == []
    for number in range(TRIALS):
        assert f"Trial {number}" in dom
    assert "Best Trial" in dom and "Artifacts" in dom
    assert Path(best["checkpoint"]).name in dom  # the best trial's checkpoint artifact
    shot = screenshot(url, ARTIFACTS / "dashboard.png", size=(1400, 900), budget_ms=15_000)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 30_000  # a blank page compresses to a few kB
