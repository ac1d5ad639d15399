"""The user's training step (``train.step``): how a batch of any structure becomes the loss,
and the outputs and targets that the metrics are computed from.

``train.step: "package.module:function"`` is called as ``step(model, batch)``, in training
(under autocast with ``train.precision``, gradients on) and in validation and test scoring
(float32, no gradients, the model in eval mode). ``batch`` is what the data gives, on the
device: an ``(inputs, targets)`` pair of tensors for array data, else what the data factory's
``collate_fn`` makes (default: torch's collation). ``model`` is the trial's model (compiled
with ``train.compile``). The step returns either

- the batch's mean loss as a 0-dim tensor (enough for training), or
- a dict with ``outputs`` and ``targets``, and optionally ``loss``: without ``loss``,
  ``train.loss`` (with the trial's sampled arguments) is applied to outputs and targets.

Validation and test scoring need ``outputs`` and ``targets``: the metrics are computed from
them over the whole split (classification: logits ``(N, classes)`` and class indices
``(N,)``; regression: ``(N, outputs)`` and ``(N, outputs)``), and ``val_loss`` is the step's
loss (or ``train.loss``) averaged over the split's samples.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from hpsearch import user_code
from hpsearch.data import samples_in
from hpsearch.losses import Loss

KEYS = ("loss", "outputs", "targets")
"""The keys a step's dict may have."""
EXPECTED = ("the batch's mean loss as a 0-dim tensor, or a dict with 'outputs' and 'targets' "
            "(tensors, one row per sample) and optionally 'loss' (a 0-dim tensor)")


class StepResult(NamedTuple):
    """A step's return value, checked: what it gave, None where it gave nothing."""

    loss: torch.Tensor | None
    outputs: torch.Tensor | None
    targets: torch.Tensor | None


class Step:
    """``train.step``: the user's function of (model, batch), and the study's loss for steps
    that return outputs and targets only."""

    def __init__(self, reference: str, loss: Loss) -> None:
        self.reference = reference
        self.fn: Callable[..., Any] = user_code.resolve(reference)
        self.loss = loss

    def train_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """The batch's mean loss, to differentiate, and its number of samples (the targets'
        when the step returns them, else the batch's first tensor's first dimension)."""
        result = self.check(self.fn(model, batch))
        loss = result.loss
        if loss is None:
            loss = self.loss(result.outputs, result.targets)  # type: ignore[arg-type]
        elif not loss.requires_grad:
            raise TypeError(self.returned("a loss that does not require grad (computed under "
                                          "torch.no_grad, or detached)"))
        n = len(result.targets) if result.targets is not None else samples_in(batch)
        return loss, n

    def evaluate(self, model: nn.Module, batch: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A validation batch's float32 outputs, its targets (on the outputs' device), and the
        sum of its samples' losses."""
        result = self.check(self.fn(model, batch))
        if result.outputs is None or result.targets is None:
            raise TypeError(self.returned(
                "only a loss", "a dict with 'outputs' and 'targets' in validation: the metrics "
                "are computed from them"))
        out = result.outputs.float()
        y = result.targets.to(out.device)
        if result.loss is None:
            total = self.loss.total(out, y)
        else:
            total = result.loss.double() * len(y)
        return out, y, total

    def check(self, result: Any) -> StepResult:
        """The step's return value as a StepResult; TypeError saying what it returned and what
        is expected when it is not one."""
        if isinstance(result, torch.Tensor):
            if result.dim() != 0:
                raise TypeError(self.returned(f"a tensor of shape {tuple(result.shape)}"))
            return StepResult(result, None, None)
        if not isinstance(result, Mapping):
            raise TypeError(self.returned(f"a {type(result).__name__}"))
        unknown = [str(k) for k in result if k not in KEYS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(self.returned(f"a dict with the key(s) {sorted(unknown)}{hint}"))
        for key in KEYS:
            value = result.get(key)
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(self.returned(f"{key!r} as a {type(value).__name__}"))
        loss, outputs, targets = (result.get(k) for k in KEYS)
        if loss is not None and loss.dim() != 0:
            raise TypeError(self.returned(f"'loss' of shape {tuple(loss.shape)}"))
        if (outputs is None) != (targets is None):
            given, missing = ("outputs", "targets") if targets is None else ("targets", "outputs")
            raise TypeError(self.returned(f"{given!r} without {missing!r}"))
        if outputs is None and loss is None:
            raise TypeError(self.returned("a dict without 'loss', 'outputs' or 'targets'"))
        if outputs is not None and targets is not None:
            if outputs.dim() == 0 or targets.dim() == 0 or len(outputs) != len(targets):
                raise TypeError(self.returned(
                    f"'outputs' of shape {tuple(outputs.shape)} and 'targets' of shape "
                    f"{tuple(targets.shape)}", "one row per sample in both"))
        return StepResult(loss, outputs, targets)

    def returned(self, what: str, expected: str = EXPECTED) -> str:
        return f"train.step {self.reference!r} returned {what}; expected {expected}"
