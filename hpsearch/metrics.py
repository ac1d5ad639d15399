"""Metric names: the vocabulary, which metrics each task computes, how a split names them, and
which direction is better.

A split's metric is ``<split>_<base>``: ``val_acc``, ``test_f1``, ``train_loss``. The base
names are the built-ins of :data:`BUILTIN` (``accuracy`` is an alias of ``acc``) and the user's
own metrics, given in ``train.metrics`` as ``"package.module:function"`` and named by the
function (``"mypkg.scores:balanced"`` -> ``val_balanced``). The study metric and the checkpoint
monitor are one of :func:`monitorable`; the report scores the test split with the same base
metric (:func:`on_split`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Literal, NamedTuple

Task = Literal["classification", "regression"]
Direction = Literal["minimize", "maximize"]


class Builtin(NamedTuple):
    """A built-in metric: the tasks it applies to and the direction that is better."""

    tasks: tuple[str, ...]
    direction: Direction


CLASSIFICATION, REGRESSION = ("classification",), ("regression",)
BUILTIN: dict[str, Builtin] = {
    "loss": Builtin(CLASSIFICATION + REGRESSION, "minimize"),
    "acc": Builtin(CLASSIFICATION, "maximize"),
    "precision": Builtin(CLASSIFICATION, "maximize"),
    "recall": Builtin(CLASSIFICATION, "maximize"),
    "f1": Builtin(CLASSIFICATION, "maximize"),
    "auroc": Builtin(CLASSIFICATION, "maximize"),
    "mse": Builtin(REGRESSION, "minimize"),
    "mae": Builtin(REGRESSION, "minimize"),
    "r2": Builtin(REGRESSION, "maximize"),
}
ALIASES = {"accuracy": "acc"}
LOSS = "loss"
"""Always computed, on every split, with the study's ``train.loss``."""

# What evaluating a model on one split computes by default, by task (``train.metrics``
# unset); the loss is always computed besides.
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("acc",),
    "regression": ("mse", "mae"),
}
BASE_METRICS: dict[str, tuple[str, ...]] = {
    task: (LOSS, *names) for task, names in DEFAULT_METRICS.items()
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


def is_user_metric(entry: str) -> bool:
    """Whether a ``train.metrics`` entry is a ``"package.module:function"`` reference."""
    return ":" in entry


def base_name(entry: str) -> str:
    """The base name a ``train.metrics`` entry computes: ``accuracy`` -> ``acc``,
    ``"mypkg.scores:balanced"`` -> ``balanced``."""
    if is_user_metric(entry):
        return entry.rpartition(":")[2]
    return ALIASES.get(entry, entry)


def check_entry(entry: str, task: str | None) -> str:
    """The base name of a ``train.metrics`` entry; ValueError when it names no metric (or
    one that ``task`` does not compute, where the task is known)."""
    if is_user_metric(entry):
        name = base_name(entry)
        if name in BUILTIN or name in ALIASES:
            raise ValueError(f"{entry!r}: the user metric's name {name!r} is a built-in's; "
                             "rename the function")
        return name
    name = base_name(entry)
    if name not in BUILTIN or name == LOSS:
        valid = tuple(n for n in (*BUILTIN, *ALIASES) if n != LOSS)
        close = difflib.get_close_matches(entry, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown metric {entry!r}{hint} (valid: {', '.join(valid)}, or "
                         '"package.module:function"; the loss is always computed)')
    if task is not None and task not in BUILTIN[name].tasks:
        raise ValueError(f"{entry!r} is not a {task} metric")
    return name


def computed(task: str, entries: Sequence[str] | None = None) -> tuple[str, ...]:
    """Base names a split is evaluated with: the loss, then ``train.metrics`` (its entries'
    base names) or the task's defaults."""
    names = DEFAULT_METRICS[task] if entries is None else [base_name(e) for e in entries]
    return (LOSS, *names)


def monitorable(task: str, entries: Sequence[str] | None = None) -> tuple[str, ...]:
    """Metrics a study can monitor: the training loss and every validation metric."""
    return (named("train", LOSS), *(named("val", b) for b in computed(task, entries)))


def direction_of(metric: str) -> Direction | None:
    """The direction that is better for a split metric (``val_f1`` -> maximize), or None for
    a user metric, whose direction the study file must give."""
    base = ALIASES.get(base_of(metric), base_of(metric))
    spec = BUILTIN.get(base)
    return spec.direction if spec is not None else None
