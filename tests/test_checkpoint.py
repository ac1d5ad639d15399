"""Checkpoint files: atomic writes, top-k selection, the study best under concurrent workers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

from hpsearch.checkpoint.format import load_checkpoint
from hpsearch.checkpoint.retention import select_kept
from hpsearch.checkpoint.study_best import read_best_meta, update_study_best
from hpsearch.checkpoint.trial_files import TrialFiles
from hpsearch.errors import CheckpointError, FileWriteError
from hpsearch.files import (
    atomic_torch_save,
    atomic_write_bytes,
    clean_stale_temporaries,
    sha256_file,
)


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new" * 1000)
    assert path.read_bytes() == b"new" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_failed_write_keeps_old_file_and_names_path(tmp_path, monkeypatch) -> None:
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(FileWriteError, match=str(path)):
        atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary left behind


def test_write_into_a_file_path_is_an_error_naming_it(tmp_path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(FileWriteError, match="blocker"):
        atomic_torch_save({"a": 1}, blocker / "ckpt.pt")


def test_stale_temporaries_are_cleaned(tmp_path) -> None:
    (tmp_path / "trials" / "3").mkdir(parents=True)
    (tmp_path / "trials" / "3" / ".tmp-abc.pt").write_bytes(b"partial")
    (tmp_path / "trials" / "3" / "epoch001-val_loss0.5.pt").write_bytes(b"kept")
    assert clean_stale_temporaries(tmp_path) == 1
    assert [p.name for p in (tmp_path / "trials" / "3").iterdir()] == ["epoch001-val_loss0.5.pt"]


@pytest.mark.parametrize(
    "minimize,k,expected",
    [
        (True, 2, {0, 1, 2, 3}),  # top-2 (0, 1) plus the best of cnn (3) and linear (2)
        (False, 1, {4, 2}),  # the best overall (4, mlp) plus linear's best (2)
        (True, 10, {0, 1, 2, 3, 4}),
    ],
)
def test_select_kept(minimize: bool, k: int, expected: set[int]) -> None:
    trials = [(0, 0.1, "mlp"), (1, 0.2, "mlp"), (2, 0.5, "linear"), (3, 0.4, "cnn"),
              (4, 0.9, "mlp"), (5, float("nan"), "cnn")]
    if not minimize:
        trials = [t for t in trials if t[2] != "cnn"]
    assert select_kept(trials, k, minimize) == expected


def test_trial_files_rotation_and_manifest(tmp_path) -> None:
    files = TrialFiles(tmp_path, "val_loss", "min", keep_top_k=2)
    for epoch, value in enumerate([0.9, 0.5, 0.7, 0.3]):
        files.save(f"e{epoch}.pt", {"model_state_dict": {}, "v": value}, "best", epoch, value)
    names = sorted(p.name for p in tmp_path.glob("e*.pt"))
    assert names == ["e1.pt", "e3.pt"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == names
    assert manifest["files"]["e3.pt"]["sha256"] == sha256_file(tmp_path / "e3.pt")
    assert files.best()[0] == "e3.pt"


def test_forget_after_drops_later_epochs_on_disk_and_in_the_manifest(tmp_path) -> None:
    files = TrialFiles(tmp_path, "val_loss", "min", keep_top_k=3)
    for epoch, value in enumerate([0.9, 0.5, 0.3]):
        files.save(f"e{epoch}.pt", {"model_state_dict": {}, "v": value}, "best", epoch, value)
    files.forget_after(0)
    assert sorted(p.name for p in tmp_path.glob("e*.pt")) == ["e0.pt"]
    reread = TrialFiles(tmp_path, "val_loss", "min", keep_top_k=3)
    assert sorted(reread.entries) == ["e0.pt"] and reread.best()[0] == "e0.pt"
    files.forget_after(-1)
    assert not list(tmp_path.glob("e*.pt")) and files.best() is None


def test_load_checkpoint_detects_corruption(tmp_path) -> None:
    files = TrialFiles(tmp_path, "val_loss", "min", keep_top_k=1)
    files.save("c.pt", {"model_state_dict": {"w": torch.ones(3)}}, "best", 0, 0.5)
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["model_state_dict"]["w"], torch.ones(3))
    data = bytearray((tmp_path / "c.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "c.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="c.pt is corrupt"):
        load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "gone.pt")


def _make_candidate(folder: Path, trial: int, value: float) -> Path:
    path = folder / "trials" / str(trial) / "best.pt"
    atomic_torch_save({"model_state_dict": {"w": torch.full((4,), value)}, "trial": trial}, path)
    return path


def _offer(results_dir: str, trial: int, value: float, barrier) -> None:
    path = Path(results_dir) / "trials" / str(trial) / "best.pt"
    barrier.wait()
    update_study_best(Path(results_dir), path, {"trial": trial, "value": value}, minimize=False)


def test_study_best_under_concurrent_workers(tmp_path) -> None:
    values = [0.3, 0.9, 0.5, 0.7, 0.1, 0.8]
    for round_ in range(2):
        root = tmp_path / f"r{round_}"
        for trial, value in enumerate(values):
            _make_candidate(root, trial, value)
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(len(values))
        procs = [ctx.Process(target=_offer, args=(str(root), t, v, barrier))
                 for t, v in enumerate(values)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        meta = read_best_meta(root)
        assert meta["trial"] == 1 and meta["value"] == 0.9
        ckpt = load_checkpoint(root)  # checks the sha256 recorded in meta.json
        assert ckpt["trial"] == 1
        assert (root / "best").is_symlink()


def test_study_best_keeps_better_and_hardlinks(tmp_path) -> None:
    good = _make_candidate(tmp_path, 0, 0.9)
    worse = _make_candidate(tmp_path, 1, 0.2)
    assert update_study_best(tmp_path, good, {"trial": 0, "value": 0.9}, minimize=False)
    assert not update_study_best(tmp_path, worse, {"trial": 1, "value": 0.2}, minimize=False)
    assert not update_study_best(tmp_path, worse, {"trial": 1, "value": float("nan")},
                                 minimize=False)
    assert read_best_meta(tmp_path)["trial"] == 0
    assert os.stat(tmp_path / "best" / "model.pt").st_ino == os.stat(good).st_ino


def test_failed_best_update_leaves_previous_best(tmp_path, monkeypatch) -> None:
    good = _make_candidate(tmp_path, 0, 0.5)
    better = _make_candidate(tmp_path, 1, 0.9)
    update_study_best(tmp_path, good, {"trial": 0, "value": 0.5}, minimize=False)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("best"):
            raise OSError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(FileWriteError, match="best"):
        update_study_best(tmp_path, better, {"trial": 1, "value": 0.9}, minimize=False)
    monkeypatch.undo()
    assert read_best_meta(tmp_path)["trial"] == 0
    assert load_checkpoint(tmp_path)["trial"] == 0
