"""Files on disk: atomic writes, failed writes, corrupt and missing checkpoints, temporaries.

The unit tests inject failures where the operating system would (``os.replace``, ``os.link``,
``os.symlink``, or a directory standing where a file must go: as root, chmod stops nothing).
The end-to-end tests damage the files of a real finished study and check that ``verify`` and
``load_checkpoint`` name the damaged file, and that a rerun cleans what a crash left behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from studyfiles import open_results, regression, write_study

import hpsearch
from hpsearch.checkpoint.format import load_checkpoint
from hpsearch.checkpoint.study_best import read_best_meta, update_study_best
from hpsearch.checkpoint.trial_files import BackgroundWriter, TrialFiles
from hpsearch.errors import CheckpointError, FileWriteError
from hpsearch.files import (
    TMP_PREFIX,
    atomic_torch_save,
    atomic_write_json,
    clean_stale_temporaries,
    sha256_file,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDY_NAME = "files"


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(f"{TMP_PREFIX}*"))


def fake_checkpoint(trial: int, value: float, epoch: int = 0) -> dict[str, Any]:
    torch.manual_seed(trial)
    return {
        "model_state_dict": {"w": torch.randn(4, 3), "b": torch.zeros(3)},
        "trial": trial,
        "epoch": epoch,
        "value": value,
        "monitor": "val_loss",
    }


def failing(
    real: Callable[..., Any], when: Callable[..., bool], err: int = errno.ENOSPC
) -> Callable[..., Any]:
    """Wrap an ``os`` function so that it fails like the OS would whenever ``when`` holds."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when(*args):
            raise OSError(err, os.strerror(err), str(args[0]), None, str(args[-1]))
        return real(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------- atomic writes


def test_failed_replace_names_the_path_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "trials" / "0" / "last.pt"
    atomic_torch_save(fake_checkpoint(0, 1.0), path)
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", failing(os.replace, lambda src, dst: True))
    with pytest.raises(FileWriteError) as info:
        atomic_torch_save(fake_checkpoint(1, 0.5), path)
    monkeypatch.undo()
    assert str(path) in str(info.value)
    assert "No space left on device" in str(info.value)
    assert path.read_bytes() == before
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("blocker", ["directory", "file-as-parent"])
def test_a_path_blocked_on_disk_is_an_error_naming_it(tmp_path: Path, blocker: str) -> None:
    if blocker == "directory":
        path = tmp_path / "model.pt"
        (path / "inside").mkdir(parents=True)
    else:
        (tmp_path / "trials").write_text("not a folder")
        path = tmp_path / "trials" / "0" / "model.pt"
    with pytest.raises(FileWriteError) as info:
        atomic_torch_save(fake_checkpoint(0, 1.0), path)
    assert str(path) in str(info.value)
    assert temporaries(tmp_path) == []


def test_readers_see_the_old_file_or_the_new_one_never_a_part(tmp_path: Path) -> None:
    path = tmp_path / "meta.json"
    versions = [{"version": i, "pad": "x" * (50_000 + 7 * i)} for i in range(2)]
    atomic_write_json(path, versions[0])
    valid = {json.dumps(v, indent=2, sort_keys=True) + "\n" for v in versions}
    stop = threading.Event()
    seen: list[str] = []

    def read() -> None:
        while not stop.is_set():
            seen.append(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(200):
            atomic_write_json(path, versions[i % 2], durable=False)
    finally:
        stop.set()
        reader.join()
    assert seen
    assert not [s for s in seen if s not in valid]


SAVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    from hpsearch.files import atomic_torch_save

    path = Path(sys.argv[1])
    i = 0
    while True:
        atomic_torch_save({"i": i, "model_state_dict": {"w": torch.full((256, 256), float(i))}},
                          path)
        i += 1
        print(i, flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_during_saves_leaves_a_loadable_file(tmp_path: Path) -> None:
    """A process killed while saving leaves the previous complete file plus temporaries."""
    path = tmp_path / "last.pt"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        for _ in range(5):  # a few complete saves, then kill during the next ones
            assert proc.stdout.readline(), "the saver stopped"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["i"] >= 4
    assert torch.equal(ckpt["model_state_dict"]["w"], torch.full((256, 256), float(ckpt["i"])))
    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("last.pt", "saver.py")]
    assert all(p.name.startswith(TMP_PREFIX) for p in leftovers), leftovers
    assert clean_stale_temporaries(tmp_path) == len(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "saver.py"]


def test_clean_stale_temporaries_removes_only_temporaries(tmp_path: Path) -> None:
    planted = [
        tmp_path / ".tmp-abc.pt",
        tmp_path / "trials" / "3" / ".tmp-xyz.json",
        tmp_path / ".best" / ".tmp-trial-3-1234" / "model.pt",
    ]
    kept = [
        tmp_path / "trials" / "3" / "epoch001-val_loss0.5.pt",
        tmp_path / "trials" / "3" / "notes.tmp-1",
        tmp_path / ".best" / "trial-2" / "model.pt",
    ]
    for p in planted + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    # A temporary symlink (the best-link swap) goes too; its target stays.
    os.symlink(".best/trial-2", tmp_path / ".tmp-best-link-99")
    assert clean_stale_temporaries(tmp_path) == 4
    assert temporaries(tmp_path) == []
    assert all(p.exists() for p in kept)
    assert clean_stale_temporaries(tmp_path / "nothing-here") == 0


# ---------------------------------------------------------------- failed checkpoint saves


def test_failed_checkpoint_save_keeps_the_manifest_and_the_previous_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = TrialFiles(tmp_path, "val_loss", "min", keep_top_k=1)
    files.save("epoch000.pt", fake_checkpoint(0, 0.9), "best", 0, 0.9)
    monkeypatch.setattr(
        os, "replace", failing(os.replace, lambda src, dst: Path(dst).name == "epoch001.pt")
    )
    with pytest.raises(FileWriteError, match="epoch001.pt"):
        files.save("epoch001.pt", fake_checkpoint(0, 0.5, epoch=1), "best", 1, 0.5)
    monkeypatch.undo()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert list(manifest["files"]) == ["epoch000.pt"]
    assert files.best() is not None and files.best()[0] == "epoch000.pt"
    assert load_checkpoint(tmp_path / "epoch000.pt")["value"] == 0.9
    assert not (tmp_path / "epoch001.pt").exists()
    assert temporaries(tmp_path) == []


def test_background_writer_never_swallows_a_failed_save() -> None:
    writer = BackgroundWriter()

    def broken() -> None:
        raise FileWriteError(errno.EIO, "cannot write /x/epoch003.pt: I/O error")

    try:
        writer.submit(broken)
        with pytest.raises(FileWriteError, match="epoch003.pt"):
            writer.submit(lambda: None)  # the next save reports the previous failure
        writer.submit(broken)
        with pytest.raises(FileWriteError):
            writer.flush()
    finally:
        writer.close()


def _results_with_best(tmp_path: Path) -> tuple[Path, Path]:
    """A results folder whose study best is trial 0, and a better candidate from trial 1."""
    results = tmp_path / "res" / "study"
    first = results / "trials" / "0" / "epoch002.pt"
    atomic_torch_save(fake_checkpoint(0, 0.8, epoch=2), first)
    assert update_study_best(results, first, {"trial": 0, "value": 0.8}, minimize=True)
    second = results / "trials" / "1" / "epoch004.pt"
    atomic_torch_save(fake_checkpoint(1, 0.3, epoch=4), second)
    return results, second


def _assert_best_is_trial_0(results: Path) -> None:
    meta = read_best_meta(results)
    assert meta is not None and meta["trial"] == 0
    ckpt = hpsearch.load_checkpoint(results)  # checks the recorded sha256
    assert ckpt["trial"] == 0 and ckpt["value"] == 0.8
    assert sha256_file(results / "best" / "model.pt") == meta["sha256"]


@pytest.mark.parametrize(
    "step",
    ["meta.json", "stage", "link-swap", "symlink"],
)
def test_failed_study_best_update_leaves_previous_best_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    results, candidate = _results_with_best(tmp_path)
    if step == "symlink":
        monkeypatch.setattr(os, "symlink", failing(os.symlink, lambda src, dst: True, errno.EIO))
    else:
        def hits(src: Any, dst: Any) -> bool:
            dst = Path(dst)
            return {
                "meta.json": dst.name == "meta.json",
                "stage": dst.parent.name == ".best",
                "link-swap": dst == results / "best",
            }[step]

        monkeypatch.setattr(os, "replace", failing(os.replace, hits))
    with pytest.raises(FileWriteError) as info:
        update_study_best(results, candidate, {"trial": 1, "value": 0.3}, minimize=True)
    monkeypatch.undo()
    message = str(info.value)
    assert str(results) in message, message
    assert "cannot write" in message
    _assert_best_is_trial_0(results)
    # What the failure left behind is temporary, and cleaning it keeps the best.
    clean_stale_temporaries(results)
    _assert_best_is_trial_0(results)
    # Once the disk is fine again the better trial becomes the best.
    assert update_study_best(results, candidate, {"trial": 1, "value": 0.3}, minimize=True)
    assert hpsearch.load_checkpoint(results)["trial"] == 1


def test_hard_link_refused_falls_back_to_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, candidate = _results_with_best(tmp_path)
    monkeypatch.setattr(os, "link", failing(os.link, lambda src, dst: True, errno.EXDEV))
    assert update_study_best(results, candidate, {"trial": 1, "value": 0.3}, minimize=True)
    monkeypatch.undo()
    best = results / "best" / "model.pt"
    assert best.read_bytes() == candidate.read_bytes()
    assert not os.path.samefile(best, candidate)
    assert hpsearch.load_checkpoint(results)["trial"] == 1


# ---------------------------------------------------------------- a real finished study


STUDY = regression(study={"name": STUDY_NAME, "sampler": {"name": "random", "seed": 1}})


def run_cli(cwd: Path, *args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a study file and the results of a complete run of it."""
    folder = tmp_path_factory.mktemp("finished")
    write_study(folder, STUDY)
    proc = run_cli(folder, "hpsearch.run", "study.yaml", "--results-dir", "res")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder


@pytest.fixture
def study_copy(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the finished study (the ``best`` link is relative and survives)."""
    dest = tmp_path / "copy"
    shutil.copytree(finished, dest, symlinks=True)
    return dest


def results_of(folder: Path) -> Path:
    return folder / "res" / STUDY_NAME


def trial_checkpoints(results: Path) -> dict[int, Path]:
    """Each trial's best checkpoint, from its manifest."""
    out = {}
    for manifest in sorted(results.glob("trials/*/manifest.json")):
        names = [n for n, e in json.loads(manifest.read_text())["files"].items()
                 if e["kind"] == "best"]
        if names:
            out[int(manifest.parent.name)] = manifest.parent / names[0]
    return out


def non_best_checkpoint(results: Path) -> Path:
    best = json.loads((results / "best" / "meta.json").read_text())["trial"]
    others = [p for n, p in trial_checkpoints(results).items() if n != best]
    assert others, "the finished study should keep more than one trial's checkpoint"
    return others[0]


def verify(folder: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(folder, "hpsearch.verify", str(results_of(folder).relative_to(folder)))


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF
    with open(path, "r+b") as f:  # in place: the same inode, as a disk error would
        f.write(data)


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.slow
def test_intact_study_verifies_and_loads(study_copy: Path) -> None:
    results = results_of(study_copy)
    proc = verify(study_copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hpsearch.load_checkpoint(results)["model_state_dict"]
    for path in trial_checkpoints(results).values():
        assert load_checkpoint(path)["model_state_dict"]
        torch.load(path, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("damage", [flip_bytes, truncate], ids=["flipped", "truncated"])
def test_corrupt_study_best_is_reported(study_copy: Path, damage: Callable[[Path], None]) -> None:
    results = results_of(study_copy)
    model = results / "best" / "model.pt"
    damage(model)
    with pytest.raises(CheckpointError) as info:
        hpsearch.load_checkpoint(results)
    assert str(model.resolve()) in str(info.value)
    assert "corrupt" in str(info.value)
    with pytest.raises(CheckpointError, match="corrupt"):
        hpsearch.load_best_model(results)

    proc = verify(study_copy)
    assert proc.returncode != 0, proc.stdout
    assert "best/model.pt" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("damage", [flip_bytes, truncate], ids=["flipped", "truncated"])
def test_corrupt_trial_checkpoint_is_reported(
    study_copy: Path, damage: Callable[[Path], None]
) -> None:
    path = non_best_checkpoint(results_of(study_copy))
    damage(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)

    proc = verify(study_copy)
    assert proc.returncode != 0, "verify passed a study with a corrupt checkpoint:\n" + proc.stdout
    assert path.name in proc.stdout + proc.stderr


def test_corrupt_file_outside_any_manifest_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "loose.pt"
    atomic_torch_save(fake_checkpoint(0, 1.0), path)
    truncate(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.slow
def test_missing_study_best_is_reported(study_copy: Path) -> None:
    results = results_of(study_copy)
    model = results / "best" / "model.pt"
    model.unlink()
    with pytest.raises(CheckpointError) as info:
        hpsearch.load_checkpoint(results)
    assert str(model) in str(info.value)
    proc = verify(study_copy)
    assert proc.returncode != 0
    assert "best/model.pt" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_missing_trial_checkpoint_is_reported(study_copy: Path) -> None:
    path = non_best_checkpoint(results_of(study_copy))
    path.unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    proc = verify(study_copy)
    assert proc.returncode != 0, "verify passed a study with a missing checkpoint:\n" + proc.stdout
    assert path.name in proc.stdout + proc.stderr


# ---------------------------------------------------------------- reruns


def run_log(results: Path) -> str:
    return (results / "run.log").read_text()


@pytest.mark.slow
def test_rerun_removes_temporaries_a_crash_left(study_copy: Path) -> None:
    results = results_of(study_copy)
    planted = [
        results / "trials" / "0" / f"{TMP_PREFIX}k2j3h.pt",
        results / ".best" / f"{TMP_PREFIX}trial-7-4242" / "model.pt",
        results / f"{TMP_PREFIX}best-link-4242",
    ]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a checkpoint")
    best_before = read_best_meta(results)

    proc = run_cli(study_copy, "hpsearch.run", "study.yaml", "--results-dir", "res")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert temporaries(results) == []
    assert "removed 3 temporary file(s)" in run_log(results)
    assert read_best_meta(results) == best_before


@pytest.mark.slow
def test_write_failure_during_a_run_fails_that_trial_and_keeps_the_best(study_copy: Path) -> None:
    """A directory stands where trial 3's checkpoint must go: like a disk refusing the file."""
    results = results_of(study_copy)
    raw = json.loads(json.dumps(STUDY))
    raw["study"]["n_trials"] = 4
    # A fixed name, so the test knows the path the next trial writes.
    raw["checkpoint"]["filename"] = "trial{trial}-best.pt"
    write_study(study_copy, raw)
    blocked = results / "trials" / "3" / "trial3-best.pt"
    (blocked / "in-the-way").mkdir(parents=True)
    best_before = read_best_meta(results)

    proc = run_cli(study_copy, "hpsearch.run", "study.yaml", "--results-dir", "res")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in proc.stderr, out

    trials = open_results(results, STUDY_NAME).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL], out
    reason = trials[3].user_attrs["fail_reason"]
    assert str(blocked.relative_to(study_copy)) in reason, reason  # as the user named it
    assert "cannot write" in reason
    assert not (results / "trials" / "3" / "last.pt").exists()
    assert read_best_meta(results) == best_before
    assert hpsearch.load_checkpoint(results)["trial"] == best_before["trial"]
    assert verify(study_copy).returncode == 0
