"""Training losses: the built-in vocabulary of ``train.loss``, its arguments, and the loss
function a trial trains and evaluates with.

``train.loss`` is a name or ``{name: ..., <argument>: ...}``; an argument may be a search
distribution (the Optuna parameter ``loss.<argument>``). A user loss is
``"package.module:function"``, called as ``fn(outputs, targets, **arguments)`` and returning
the batch's mean loss as a 0-dim tensor (it is differentiated, so use torch operations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from hpsearch import user_code


class LossSpec(NamedTuple):
    """A built-in loss: the tasks it applies to and the arguments it takes."""

    tasks: tuple[str, ...]
    arguments: tuple[str, ...]


LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(("classification",), ("label_smoothing", "weight")),
    "mse": LossSpec(("regression",), ()),
    "l1": LossSpec(("regression",), ()),
    "huber": LossSpec(("regression",), ("delta",)),
    "bce_with_logits": LossSpec(("classification", "regression"), ("pos_weight",)),
}
DEFAULT_LOSS = {"classification": "cross_entropy", "regression": "mse"}
LIST_ARGUMENTS = ("weight", "pos_weight")
"""Arguments given as a list of floats, one per class (not searchable)."""


def is_user_loss(name: str) -> bool:
    return ":" in name


def check_argument(loss: str, key: str, value: Any) -> None:
    """ValueError unless ``value`` (a literal, after sampling) is valid for ``key``."""
    if key in LIST_ARGUMENTS:
        items = value if isinstance(value, list) else [value]
        if key == "weight" and not isinstance(value, list):
            raise ValueError("must be a list of floats, one per class")
        if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                and v >= 0 for v in items):
            raise ValueError("must be non-negative numbers")
    elif key == "label_smoothing":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise ValueError(f"must be a number in [0, 1), not {value!r}")
    elif key == "delta":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"must be a number > 0, not {value!r}")


class Loss:
    """One trial's loss: ``loss(outputs, targets)`` is the batch mean that is trained on;
    ``loss.total(outputs, targets)`` the batch's sum (a split's loss is the sum over its
    batches divided by its size)."""

    def __init__(self, name: str, arguments: dict[str, Any], task: str) -> None:
        self.name, self.task = name, task
        args = dict(arguments)
        for key in LIST_ARGUMENTS:
            if key in args:
                args[key] = torch.as_tensor(args[key], dtype=torch.float32)
        self.arguments = args
        self._fn: Callable[..., torch.Tensor] = (
            user_code.resolve(name) if is_user_loss(name) else _BUILTIN_FNS[name]
        )
        self._on: torch.device | None = None

    def _args(self, device: torch.device) -> dict[str, Any]:
        if self._on != device:
            self.arguments = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                              for k, v in self.arguments.items()}
            self._on = device
        return self.arguments

    def _targets(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.name == "bce_with_logits" and self.task == "classification":
            # One logit per class: the class index becomes a one-hot target.
            return nn.functional.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
        return targets

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        args = self._args(outputs.device)
        if is_user_loss(self.name):
            return self._fn(outputs, targets, **args)
        return self._fn(outputs, self._targets(outputs, targets), **args)

    def total(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        args = self._args(outputs.device)
        if is_user_loss(self.name):
            return self._fn(outputs, targets, **args) * len(targets)
        return self._fn(outputs, self._targets(outputs, targets), reduction="sum", **args)


def _bce(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
         pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    out = nn.functional.binary_cross_entropy_with_logits(
        outputs, targets.to(outputs.dtype), reduction="none", pos_weight=pos_weight)
    # Per sample: the mean over its outputs, so the sum over a split divides by its size.
    per_sample = out.reshape(len(out), -1).mean(1)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _per_sample(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A regression loss whose sum is over samples (each the mean over its outputs), so
    ``total / n`` is the same number as the batch mean."""

    def loss(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
             **kwargs: Any) -> torch.Tensor:
        if reduction == "mean":
            return fn(outputs, targets, **kwargs)
        per = fn(outputs, targets, reduction="none", **kwargs)
        return per.reshape(len(per), -1).mean(1).sum()

    return loss


_BUILTIN_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": nn.functional.cross_entropy,
    "mse": _per_sample(nn.functional.mse_loss),
    "l1": _per_sample(nn.functional.l1_loss),
    "huber": _per_sample(nn.functional.huber_loss),
    "bce_with_logits": _bce,
}


def build_loss(name: str | None, arguments: dict[str, Any], task: str) -> Loss:
    """The loss a trial trains with: ``train.loss`` with its (sampled) arguments, or the
    task's default."""
    return Loss(name or DEFAULT_LOSS[task], arguments, task)
