"""Metric names: which metrics each task computes, and how a split names them.

A split's metric is ``<split>_<base>``: ``val_acc``, ``test_acc``, ``train_loss``. The study
metric and the checkpoint monitor are one of :func:`monitorable`; the report scores the test
split with the same base metric (:func:`on_split`).
"""

from __future__ import annotations

from typing import Literal

Task = Literal["classification", "regression"]

# What evaluating a model on one split computes, by task.
BASE_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("loss", "acc"),
    "regression": ("loss", "mse", "mae"),
}
SPLIT_PREFIXES = ("train_", "val_")


def named(split: str, base: str) -> str:
    return f"{split}_{base}"


def base_of(metric: str) -> str:
    """``val_acc`` -> ``acc``."""
    return metric.split("_", 1)[1]


def on_split(metric: str, split: str) -> str:
    """The same metric on another split: ``on_split("val_acc", "test")`` -> ``test_acc``."""
    return named(split, base_of(metric))


def monitorable(task: str) -> tuple[str, ...]:
    """Metrics a study can monitor: the training loss and every validation metric."""
    return (named("train", "loss"), *(named("val", b) for b in BASE_METRICS[task]))
