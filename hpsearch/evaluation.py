"""Evaluating a model on a whole split: the loss and the study's metrics.

Every metric is computed over the whole split, never averaged over batches: the loss,
accuracy, MSE and MAE as sums in one pass (on the device, one host sync per split); every
other metric (precision, recall, F1, AUROC, R², the user's) from the split's outputs and
targets gathered across batches, once, with ``torchmetrics`` (imported only then, so a study
of the default metrics never pays for it). Evaluation runs in float32 whatever
``train.precision`` is, so a value reproduces on any device.

A user metric (``train.metrics: ["package.module:function"]``) is called once per split as
``fn(outputs, targets)`` with CPU tensors: the model's raw outputs for the whole split
(classification: logits of shape ``(N, classes)``; regression: ``(N, outputs)``) and the
targets (class indices of shape ``(N,)``; regression values of shape ``(N, outputs)``). It
returns a number (a float or a 0-dim tensor).

With ``train.step`` the outputs, the targets and the loss of each batch come from the user's
step (:mod:`hpsearch.step`), for batches of any structure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from hpsearch import metrics, user_code
from hpsearch.config import StudyConfig
from hpsearch.data import DeviceBatches
from hpsearch.losses import Loss, build_loss
from hpsearch.step import Step

EVAL_BATCH = 4096
SUMMED = ("loss", "acc", "mse", "mae")
"""Metrics summed per sample in one pass (exact over the split, and cheap)."""


class Evaluator:
    """The loss and metrics of one study (``train.loss``, ``train.metrics``, ``train.step``)
    on a task."""

    def __init__(self, task: str, entries: Sequence[str] | None = None,
                 loss: Loss | None = None, step: str | None = None) -> None:
        self.task = task
        self.names = metrics.computed(task, entries)
        self.loss = loss or build_loss(None, {}, task)
        self.step = Step(step, self.loss) if step else None
        self.user: dict[str, Callable[..., Any]] = {
            metrics.base_name(e): user_code.resolve(e)
            for e in entries or () if metrics.is_user_metric(e)
        }
        self.gathered = tuple(n for n in self.names if n not in SUMMED)

    @torch.no_grad()
    def __call__(self, model: nn.Module, batches: DeviceBatches) -> dict[str, float]:
        """Base metric name -> value over the whole split (model in eval mode meanwhile)."""
        was_training = model.training
        model.eval()
        totals: dict[str, torch.Tensor] = {}
        outputs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        n = 0
        try:
            for out, yb, loss_sum in self._outputs(model, batches):
                for name, v in self._sums(out, yb, loss_sum).items():
                    totals[name] = totals.get(name, 0) + v.double()
                if self.gathered:
                    outputs.append(out)
                    targets.append(yb)
                n += len(yb)
        finally:
            model.train(was_training)
        # One host sync for all the summed metrics.
        values = torch.stack(list(totals.values())).cpu().tolist() if totals else []
        result = {name: v / max(n, 1) for name, v in zip(totals, values)}
        if self.gathered:
            out, y = torch.cat(outputs), torch.cat(targets)
            for name in self.gathered:
                result[name] = self._gathered(name, out, y)
        return {name: result[name] for name in self.names}

    def _outputs(self, model: nn.Module, batches: DeviceBatches
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Each batch's float32 outputs, targets, and its summed loss where a step gave it."""
        if self.step is None:
            for xb, yb in batches.iterate(EVAL_BATCH):
                yield model(xb).float(), yb, None
            return
        for batch in batches.batches(EVAL_BATCH):
            yield self.step.evaluate(model, batch)

    def _sums(self, out: torch.Tensor, y: torch.Tensor,
              loss_sum: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        parts = {"loss": self.loss.total(out, y) if loss_sum is None else loss_sum}
        if "acc" in self.names:
            parts["acc"] = (out.argmax(1) == y).sum()
        dims = tuple(range(1, out.dim()))
        if "mse" in self.names:
            parts["mse"] = ((out - y) ** 2).mean(dim=dims).sum()
        if "mae" in self.names:
            parts["mae"] = (out - y).abs().mean(dim=dims).sum()
        return parts

    def _gathered(self, name: str, out: torch.Tensor, y: torch.Tensor) -> float:
        if name in self.user:
            return float(self.user[name](out.cpu(), y.cpu()))
        return float(builtin_metric(name, out, y))


def builtin_metric(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A built-in metric over a whole split, with ``torchmetrics``: precision, recall and F1
    macro-averaged over the classes, AUROC one-vs-rest on softmax probabilities (macro), R²
    averaged over the outputs; acc, mse and mae too (the same numbers as the summed ones)."""
    from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_auroc,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    classes = out.shape[1] if out.dim() > 1 else 1
    per_class = {"precision": multiclass_precision, "recall": multiclass_recall,
                 "f1": multiclass_f1_score}
    if name in per_class:
        return per_class[name](out, y, num_classes=classes, average="macro")
    if name == "acc":
        return multiclass_accuracy(out, y, num_classes=classes, average="micro")
    if name == "auroc":
        return multiclass_auroc(out.softmax(1), y, num_classes=classes, average="macro")
    regression = {"mse": mean_squared_error, "mae": mean_absolute_error, "r2": r2_score}
    if name in regression:
        return regression[name](out, y)
    raise KeyError(f"no built-in metric {name!r}")


def evaluate(model: nn.Module, batches: DeviceBatches, task: str,
             entries: Sequence[str] | None = None, loss: Loss | None = None,
             ) -> dict[str, float]:
    """The loss and metrics over a whole split (``entries``: ``train.metrics``, default the
    task's; ``loss``: default the task's)."""
    return Evaluator(task, entries, loss)(model, batches)


def study_evaluator(config: StudyConfig, task: str,
                    loss_arguments: dict[str, Any] | None = None) -> Evaluator:
    """The evaluator of a study's ``train.metrics``, ``train.loss`` (with one trial's
    sampled loss arguments) and ``train.step``, as its trials validate and the report tests."""
    loss = config.train.loss
    return Evaluator(task, config.train.metrics,
                     build_loss(loss.name if loss else None, loss_arguments or {}, task),
                     config.train.step)
