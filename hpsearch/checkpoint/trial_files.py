"""A trial's folder: its checkpoints, its resume state and the manifest saying which is which,
written from one background thread so training never waits on the disk."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpsearch.checkpoint.mirror import TrialMirror
from hpsearch.files import atomic_torch_save, atomic_write_json
from hpsearch.results import MANIFEST, RESUME_STATE

FORMAT_VERSION = 1
"""Version of the checkpoint dict's layout, recorded in every checkpoint."""


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


@dataclass
class Entry:
    kind: str  # best | every_n | last_model
    epoch: int
    value: float
    sha256: str


class TrialFiles:
    """A trial's folder: checkpoints, the resume state and the manifest saying which is which.

    Only the background writer thread mutates files (besides ``last.pt``'s deletion at trial
    end, after a flush), so the manifest needs no lock. With a ``mirror`` (a shared store),
    every checkpoint and the manifest are written to the store too, and deleted from it.
    """

    def __init__(self, folder: Path, monitor: str, mode: str, keep_top_k: int,
                 mirror: TrialMirror | None = None) -> None:
        self.folder = folder
        self.mirror = mirror
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
        if self.mirror is not None:
            self.mirror.put(self.folder / MANIFEST)

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
            if self.mirror is not None and name in self.entries:
                self._put(name)

    def _put(self, name: str) -> None:
        """Write a checkpoint to the store, after a manifest that names it: so the store
        never holds a file that no manifest names (and that nothing would delete)."""
        assert self.mirror is not None
        self.mirror.put(self.folder / name)

    def _rotate(self) -> None:
        bests = [(n, e) for n, e in self.entries.items() if e.kind == "best"]
        sign = 1.0 if self.mode == "min" else -1.0
        bests.sort(key=lambda ne: (sign * ne[1].value, -ne[1].epoch))
        for name, _ in bests[self.keep_top_k :]:
            self._remove(name)

    def _remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / name).unlink()
        if self.mirror is not None:
            self.mirror.remove(name)
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
        """Move another (failed, resumed) trial's checkpoints into this folder.

        A checkpoint its manifest does not name was being saved when that trial's worker
        died: its epoch came after the last resume state, so the retry trains it again, and
        the file is deleted (kept, nothing would ever delete it).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            adopted = []
            for name, entry in other.entries.items():
                src = other.folder / name
                if src.exists():
                    os.replace(src, self.folder / name)
                    self.entries[name] = entry
                    adopted.append(name)
            for orphan in other.folder.glob("*.pt"):
                if orphan.name != RESUME_STATE:  # the resumed state, moved by the caller
                    orphan.unlink(missing_ok=True)
            other.entries.clear()
            other._write_manifest()
            self._write_manifest()
            if self.mirror is not None:
                for name in adopted:
                    self._put(name)

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
                (self.folder / RESUME_STATE).unlink()
            if self.mirror is not None:
                self.mirror.remove(RESUME_STATE)
            self._write_manifest()
