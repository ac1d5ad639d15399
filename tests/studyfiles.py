"""Tiny study files for tests: small data, few epochs, fast on 2 cores."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.storages.journal import JournalFileBackend, JournalStorage

TINY: dict[str, Any] = {
    "study": {
        "name": "tiny",
        "metric": "val_acc",
        "direction": "maximize",
        "n_trials": 6,
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "none"},
        "heartbeat_interval": 0.5,
        "grace_period": 3,
    },
    "data": {"name": "mnist1d", "args": {"num_samples": 500}},
    "model": {
        "architecture": {
            "linear": {},
            "mlp": {"hidden": {"type": "int", "low": 16, "high": 64, "log": True}},
            "cnn1d": {
                "channels": {"type": "int", "low": 4, "high": 8},
                "kernel_size": {"type": "categorical", "choices": [3, 5]},
                "depth": {"type": "int", "low": 2, "high": 3},
            },
        }
    },
    "train": {
        "max_epochs": 4,
        "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "batch_size": 64,
    },
    "checkpoint": {"keep_top_k_trials": 2},
    "resources": {"workers": 2},
    "report": {"enabled": False},
}


# A regression study on CPU, no pruning and no early stopping: every trial runs every epoch.
REGRESSION: dict[str, Any] = {
    "study": {
        "name": "regression",
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 3,
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "heartbeat_interval": 0.5,
        "grace_period": 3,
    },
    "data": {"name": "synthetic_regression", "args": {"n_samples": 600}},
    "model": {"architecture": {"mlp": {"hidden": {"type": "int", "low": 8, "high": 32}}}},
    "train": {
        "max_epochs": 3,
        "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "batch_size": 32,
        "early_stopping": None,
    },
    "checkpoint": {"keep_top_k_trials": 3},
    "resources": {"devices": "cpu", "workers": 2, "torch_threads": 1},
    "report": {"enabled": False},
}


def derive(base: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A copy of ``base`` with some sections' keys replaced (one level deep)."""
    raw = copy.deepcopy(base)
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(name), dict):
            raw[name].update(values)
        else:
            raw[name] = values
    return raw


def tiny(**sections: Any) -> dict[str, Any]:
    """TINY with some sections' keys replaced (one level deep)."""
    return derive(TINY, **sections)


def regression(**sections: Any) -> dict[str, Any]:
    """REGRESSION with some sections' keys replaced (one level deep)."""
    return derive(REGRESSION, **sections)


def write_study(folder: Path, raw: dict[str, Any], name: str = "study.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def open_results(results: Path, name: str | None = None) -> optuna.Study:
    """The study a run left in ``results``, from its journal file (name: the folder's)."""
    storage = JournalStorage(JournalFileBackend(str(results / "journal.log")))
    return optuna.load_study(study_name=name or results.name, storage=storage)


def user_module(folder: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                source: str) -> Iterator[Path]:
    """Make ``folder/<name>.py`` importable for one test (a fresh import each time); yields
    ``folder``. For fixtures: ``yield from user_module(...)``."""
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop(name, None)
    yield folder
    sys.modules.pop(name, None)
