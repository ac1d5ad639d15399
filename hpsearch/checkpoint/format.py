"""Reading a checkpoint back: finding it, checking its sha256, and loading it safely."""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hpsearch.checkpoint.shared import fetch_best, open_recorded
from hpsearch.errors import CheckpointError, UsageError
from hpsearch.files import read_json
from hpsearch.results import MANIFEST, ResultsLayout, is_study_file, locate


def _manifest_sha(path: Path) -> str | None:
    """The recorded sha256 of a checkpoint file, from its folder's manifest or meta.json."""
    manifest = read_json(path.parent / MANIFEST)
    if manifest and path.name in manifest.get("files", {}):
        return manifest["files"][path.name]["sha256"]
    meta = read_json(path.parent / "meta.json")
    if meta and path.name == "model.pt":
        return meta.get("sha256")
    return None


def resolve_checkpoint(path: str | Path, results_root: str | Path = "results") -> Path:
    """A checkpoint file, a results folder (its ``best/model.pt``) or a study file (whose
    results are under ``results_root``)."""
    path = Path(path)
    if is_study_file(path) and path.is_file():
        path = locate(path, results_root)[1].root
    if path.is_dir():
        best = ResultsLayout(path).best_model
        if not best.exists():
            raise CheckpointError(f"no study best in {path}: {best} is missing")
        return best.resolve()
    if not path.exists():
        raise CheckpointError(f"checkpoint missing: {path}")
    return path


@contextlib.contextmanager
def checkpoint_file(path: str | Path | None, results_root: str | Path = "results",
                    storage: str | None = None, study: str | None = None) -> Iterator[Path]:
    """The checkpoint a user names, as a local file for as long as the context lasts.

    Either ``path`` (see :func:`resolve_checkpoint`), or ``storage`` (and ``study``): the
    study best the storage records, fetched from the study's shared store into a temporary
    folder (see :mod:`hpsearch.checkpoint.shared`).

    Raises:
        CheckpointError: Nothing to load there.
        UsageError: Neither (or both) given, or the storage or study cannot be opened.
    """
    if (path is None) == (storage is None):
        raise UsageError("name one checkpoint: a results folder, study file or checkpoint "
                         "file, or storage= (with study=) for the study best it records")
    if path is not None:
        yield resolve_checkpoint(path, results_root)
        return
    with tempfile.TemporaryDirectory(prefix="hpsearch-best-") as folder:
        yield fetch_best(open_recorded(str(storage), study), Path(folder))


def check_map_location(map_location: Any) -> None:
    """Refuse a CUDA ``map_location`` this machine cannot honour, saying why."""
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError):
        return  # torch.load reports what it makes of it
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = ("this torch is not compiled with CUDA" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise CheckpointError(f"cannot load onto {device}: CUDA is not available ({why}); "
                              "use map_location='cpu'")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise CheckpointError(f"cannot load onto {device}: this machine has {count} CUDA "
                              f"device(s) (cuda:0 to cuda:{count - 1})")


def load_checkpoint(path: str | Path | None = None, map_location: Any = None,
                    results_root: str | Path = "results", *, storage: str | None = None,
                    study: str | None = None) -> dict[str, Any]:
    """Load a checkpoint (weights and metadata), checking its recorded sha256.

    Args:
        path: A checkpoint file, a study's results folder (loads its best), or a study file.
        map_location: As for ``torch.load``.
        results_root: Where a study file's results are (the run's ``--results-dir``).
        storage: Instead of ``path``: a storage URL, to load the study best it records from
            the study's shared store (any machine; no results folder needed).
        study: With ``storage``: the study's name (needed when the storage holds several).

    Returns:
        The checkpoint dict: ``model_state_dict`` plus metadata.

    Raises:
        CheckpointError: The file is missing, corrupt, or differs from its recorded sha256, or
            ``map_location`` names a CUDA device this machine does not have.
    """
    check_map_location(map_location)
    with checkpoint_file(path, results_root, storage, study) as file:
        return _load_file(file, map_location)


def _load_file(file: Path, map_location: Any) -> dict[str, Any]:
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
