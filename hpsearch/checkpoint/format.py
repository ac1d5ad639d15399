"""Reading a checkpoint back: finding it, checking its sha256, and loading it safely."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from hpsearch.errors import CheckpointError
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


def load_checkpoint(path: str | Path, map_location: Any = None,
                    results_root: str | Path = "results") -> dict[str, Any]:
    """Load a checkpoint (weights and metadata), checking its recorded sha256.

    Args:
        path: A checkpoint file, a study's results folder (loads its best), or a study file.
        map_location: As for ``torch.load``.
        results_root: Where a study file's results are (the run's ``--results-dir``).

    Returns:
        The checkpoint dict: ``model_state_dict`` plus metadata.

    Raises:
        CheckpointError: The file is missing, corrupt, or differs from its recorded sha256, or
            ``map_location`` names a CUDA device this machine does not have.
    """
    check_map_location(map_location)
    file = resolve_checkpoint(path, results_root)
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
