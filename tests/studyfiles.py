"""Tiny study files for tests: small data, few epochs, fast on 2 cores."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

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


def tiny(**sections: dict[str, Any]) -> dict[str, Any]:
    """TINY with some sections' keys replaced (one level deep)."""
    raw = copy.deepcopy(TINY)
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(name), dict):
            raw[name].update(values)
        else:
            raw[name] = values
    return raw


def write_study(folder: Path, raw: dict[str, Any], name: str = "study.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
