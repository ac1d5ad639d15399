"""Checkpoint files: atomic writes, the per-trial manifest, retention, the study best, loading.

Every file is written to a temporary name in its own folder, fsynced, then ``os.replace``d, so
no reader ever sees a partial file. Each checkpoint's sha256 is recorded in a manifest (a trial
folder's ``manifest.json``, or ``best/meta.json``); "best" is never found by file time or name.
Checkpoints hold tensors plus JSON-safe metadata, so ``torch.load(path, weights_only=True)``
reads them forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)
MANIFEST = "manifest.json"
LAST = "last.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match its recorded sha256."""


class CheckpointWriteError(OSError):
    """A checkpoint or metadata file could not be written; the message names the path."""


# ---------------------------------------------------------------- atomic files


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse directory fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes | memoryview, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part.

    ``durable=False`` skips the fsyncs, for status files that only need atomicity.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable:
            _fsync_dir(path.parent)
    except OSError as err:
        raise CheckpointWriteError(
            err.errno, f"cannot write {path}: {err.strerror or err}", str(path)
        ) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(path, data, durable=durable)


def serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_torch_save(obj: Any, path: Path) -> str:
    """Save ``obj`` with torch.save atomically; returns the file's sha256."""
    data = serialize(obj)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_stale_temporaries(root: Path) -> int:
    """Remove temporary files a crash left behind. Returns how many were removed."""
    removed = 0
    if not root.exists():
        return 0
    for tmp in root.rglob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed += 1
    return removed


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock between processes on this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------- what "better" means


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """NaN and inf never improve; the first finite value always does."""
    if value is None or not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


# ---------------------------------------------------------------- snapshots and the writer


def snapshot(obj: Any) -> Any:
    """A CPU copy of every tensor in a nested structure, taken on the training thread."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs file writes on one background thread, at most one in flight.

    ``submit`` first waits for the previous write and re-raises its error, so a failed save
    surfaces at the next save (or at ``flush``) and is never swallowed.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self._pending: Future[None] | None = None

    def submit(self, fn: Callable[[], None]) -> None:
        self.flush()
        self._pending = self._pool.submit(fn)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)


# ---------------------------------------------------------------- per-trial manifest


@dataclass
class Entry:
    kind: str  # best | every_n | last_model
    epoch: int
    value: float
    sha256: str


class TrialFiles:
    """A trial's folder: checkpoints, the resume state and the manifest saying which is which.

    Only the background writer thread mutates files (besides ``last.pt``'s deletion at trial
    end, after a flush), so the manifest needs no lock.
    """

    def __init__(self, folder: Path, monitor: str, mode: str, keep_top_k: int) -> None:
        self.folder = folder
        self.monitor, self.mode, self.keep_top_k = monitor, mode, keep_top_k
        self.entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        path = folder / MANIFEST
        if path.exists():
            raw = json.loads(path.read_text())
            self.entries = {name: Entry(**e) for name, e in raw.get("files", {}).items()}
            self.monitor = monitor or raw.get("monitor", "")
            self.mode = mode or raw.get("mode", "")

    def _write_manifest(self) -> None:
        atomic_write_json(
            self.folder / MANIFEST,
            {
                "monitor": self.monitor,
                "mode": self.mode,
                "files": {n: vars(e) for n, e in sorted(self.entries.items())},
            },
        )

    def save(self, name: str, obj: Any, kind: str, epoch: int, value: float) -> None:
        """Write one checkpoint, record it, and drop best files beyond the top-k."""
        sha = atomic_torch_save(obj, self.folder / name)
        with self._lock:
            if kind == "last_model":
                for old in [n for n, e in self.entries.items() if e.kind == kind and n != name]:
                    self._remove(old)
            self.entries[name] = Entry(kind, epoch, float(value), sha)
            if kind == "best":
                self._rotate()
            self._write_manifest()

    def _rotate(self) -> None:
        bests = [(n, e) for n, e in self.entries.items() if e.kind == "best"]
        sign = 1.0 if self.mode == "min" else -1.0
        bests.sort(key=lambda ne: (sign * ne[1].value, -ne[1].epoch))
        for name, _ in bests[self.keep_top_k :]:
            self._remove(name)

    def _remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / name).unlink()
        self.entries.pop(name, None)

    def best(self) -> tuple[str, Entry] | None:
        """The file of the best epoch (or the model of the last epoch under save: last)."""
        for kind in ("best", "last_model"):
            found = [(n, e) for n, e in self.entries.items() if e.kind == kind]
            if found:
                sign = 1.0 if self.mode == "min" else -1.0
                return min(found, key=lambda ne: (sign * ne[1].value, -ne[1].epoch))
        return None

    def adopt(self, other: TrialFiles) -> None:
        """Move another (failed, resumed) trial's checkpoints into this folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            for name, entry in other.entries.items():
                src = other.folder / name
                if src.exists():
                    os.replace(src, self.folder / name)
                    self.entries[name] = entry
            other.entries.clear()
            other._write_manifest()
            self._write_manifest()

    def forget_after(self, epoch: int) -> None:
        """Delete checkpoints of epochs after ``epoch``: a resumed trial trains them again
        from an older ``last.pt``, and no file may describe an epoch its history lacks."""
        with self._lock:
            later = [n for n, e in self.entries.items() if e.epoch > epoch]
            for name in later:
                self._remove(name)
            if later:
                self._write_manifest()

    def delete_all(self) -> None:
        """Delete every checkpoint (the trial fell out of the study's top-k)."""
        with self._lock:
            for name in list(self.entries):
                self._remove(name)
            with contextlib.suppress(FileNotFoundError):
                (self.folder / LAST).unlink()
            self._write_manifest()


# ---------------------------------------------------------------- study-level retention


def select_kept(
    trials: Iterable[tuple[int, float, str]],
    keep_top_k_trials: int,
    minimize: bool,
    pruned: Iterable[tuple[int, float, str]] = (),
) -> set[int]:
    """Which finished trials keep their checkpoints.

    Args:
        trials: (number, value, architecture) of every COMPLETE trial.
        keep_top_k_trials: How many of the best trials to keep.
        minimize: The study's direction.
        pruned: (number, best value, architecture) of PRUNED trials.

    Returns:
        The top-k trial numbers, plus each architecture's best (the report evaluates those):
        its best complete trial, or its best pruned one when none completed.
    """
    sign = 1.0 if minimize else -1.0

    def ranked(rows: Iterable[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
        finite = [t for t in rows if t[1] is not None and math.isfinite(t[1])]
        return sorted(finite, key=lambda t: (sign * t[1], t[0]))

    complete = ranked(trials)
    kept = {t[0] for t in complete[:keep_top_k_trials]}
    seen: set[str] = set()
    for number, _, arch in complete + ranked(pruned):
        if arch not in seen:
            seen.add(arch)
            kept.add(number)
    return kept


# ---------------------------------------------------------------- the study best


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_best_meta(results_dir: Path) -> dict[str, Any] | None:
    return _read_json(results_dir / "best" / "meta.json")


def update_study_best(
    results_dir: Path, checkpoint: Path, meta: dict[str, Any], minimize: bool
) -> bool:
    """Make ``checkpoint`` the study best if it beats the current one. Safe across processes.

    ``best`` is a symlink to a folder holding ``model.pt`` and ``meta.json``; the link is
    swapped with one ``os.replace``, so readers see the old pair or the new pair, never a mix,
    and two workers finishing together serialise on a lock and never leave the worse trial.

    Returns:
        True if the best was replaced.
    """
    link = results_dir / "best"
    store = results_dir / ".best"
    with file_lock(results_dir / ".hpsearch" / "best.lock"):
        current = read_best_meta(results_dir)
        mode = "min" if minimize else "max"
        if current is not None and not is_better(meta["value"], current["value"], mode):
            return False
        stage = store / f"trial-{meta['trial']}"
        tmp_stage = store / f"{TMP_PREFIX}trial-{meta['trial']}-{os.getpid()}"
        step = tmp_stage  # the path being written, for the error message
        try:
            shutil.rmtree(tmp_stage, ignore_errors=True)
            tmp_stage.mkdir(parents=True)
            step = target = tmp_stage / "model.pt"
            try:
                os.link(checkpoint, target)  # same inode: no second copy on disk
            except OSError:
                shutil.copyfile(checkpoint, target)
            meta = {**meta, "sha256": sha256_file(target)}
            atomic_write_json(tmp_stage / "meta.json", meta)
            step = stage
            if stage.exists():
                shutil.rmtree(stage)
            os.replace(tmp_stage, stage)
            step = link
            tmp_link = results_dir / f"{TMP_PREFIX}best-link-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                tmp_link.unlink()
            os.symlink(os.path.relpath(stage, results_dir), tmp_link)
            os.replace(tmp_link, link)
            _fsync_dir(results_dir)
        except CheckpointWriteError:
            raise
        except OSError as err:
            raise CheckpointWriteError(
                err.errno, f"cannot write {step}: {err.strerror or err}", str(step)
            ) from err
        # Keep the previous stage too: a reader that resolved the old link may still be reading.
        previous = current.get("trial") if current else None
        for old in store.iterdir():
            if old.name not in (stage.name, f"trial-{previous}") and not old.name.startswith(
                TMP_PREFIX
            ):
                shutil.rmtree(old, ignore_errors=True)
        return True


# ---------------------------------------------------------------- loading


def _manifest_sha(path: Path) -> str | None:
    """The recorded sha256 of a checkpoint file, from its folder's manifest or meta.json."""
    manifest = _read_json(path.parent / MANIFEST)
    if manifest and path.name in manifest.get("files", {}):
        return manifest["files"][path.name]["sha256"]
    meta = _read_json(path.parent / "meta.json")
    if meta and path.name == "model.pt":
        return meta.get("sha256")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, a results folder (its ``best/model.pt``) or a study file."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from hpsearch.config import load_config

        cfg = load_config(path)
        path = Path("results") / cfg.study.name
    if path.is_dir():
        best = path / "best" / "model.pt"
        if not best.exists():
            raise CheckpointError(f"no study best in {path}: {best} is missing")
        return best.resolve()
    if not path.exists():
        raise CheckpointError(f"checkpoint missing: {path}")
    return path


def load_checkpoint(path: str | Path, map_location: Any = None) -> dict[str, Any]:
    """Load a checkpoint (weights and metadata), checking its recorded sha256.

    Args:
        path: A checkpoint file, a study's results folder (loads its best), or a study file.
        map_location: As for ``torch.load``.

    Returns:
        The checkpoint dict: ``model_state_dict`` plus metadata.

    Raises:
        CheckpointError: The file is missing, corrupt, or differs from its recorded sha256.
    """
    file = resolve_checkpoint(path)
    expected = _manifest_sha(file)
    try:
        data = file.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {file}: {err}") from None
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(
            f"checkpoint {file} is corrupt: its sha256 differs from the recorded {expected[:12]}…"
        )
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {file} is corrupt: {err}") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{file} is not an hpsearch checkpoint")
    ckpt["path"] = str(file)
    return ckpt
