"""Rebuild models from checkpoints: ``load_best_model`` and ``load_model``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from hpsearch.checkpoint.format import load_checkpoint
from hpsearch.errors import CheckpointError
from hpsearch.models import build_model


def load_model(path: str | Path | None = None, map_location: Any = None,
               results_root: str | Path = "results", *, storage: str | None = None,
               study: str | None = None) -> nn.Module:
    """Rebuild the model of any hpsearch checkpoint file, in eval mode, with its weights.

    ``path`` and ``storage``/``study`` name the checkpoint as for ``load_checkpoint``.

    Raises:
        CheckpointError: The file is missing or corrupt, or the model factory it records
            cannot be imported here (the message names the module and how to fix that).
    """
    ckpt = load_checkpoint(path, map_location=map_location, results_root=results_root,
                           storage=storage, study=study)
    meta = ckpt["model"]
    try:
        model = build_model(
            meta["architecture"],
            meta["params"],
            meta["input_shape"],
            meta["output_size"],
            meta.get("factory"),
        )
    except ImportError as err:
        # The user's model factory lives in their module, which this process may not see.
        raise CheckpointError(f"cannot rebuild the model of {ckpt['path']}: {err}") from None
    model.load_state_dict(ckpt["model_state_dict"])
    if map_location is not None:
        model.to(map_location)
    return model.eval()


def load_best_model(path: str | Path | None = None, map_location: Any = None,
                    results_root: str | Path = "results", *, storage: str | None = None,
                    study: str | None = None) -> nn.Module:
    """The study-best model, rebuilt, in eval mode.

    Args:
        path: A study's results folder (``results/<study>``) or its study file.
        map_location: Device for the weights, as for ``torch.load``.
        results_root: Where a study file's results are (the run's ``--results-dir``).
        storage: Instead of ``path``, from any machine: the study's storage URL; the study
            best it records is fetched from the study's shared store.
        study: With ``storage``: the study's name (needed when the storage holds several).

    Raises:
        CheckpointError: No study best yet, its file is missing or corrupt, or its model
            factory's module cannot be imported here.
        UsageError: The storage or the study cannot be opened, or it has no shared store.
    """
    return load_model(path, map_location=map_location, results_root=results_root,
                      storage=storage, study=study)
