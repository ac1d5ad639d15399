"""The optimizer and the learning-rate schedule of one trial (``train.optimizer``,
``train.lr_scheduler``).

``plateau`` and ``step`` are stepped once per epoch (plateau with the monitored value);
``cosine`` (with linear warmup) and ``onecycle`` after every optimizer step, over the whole
``train.max_epochs``. The schedule's state is part of the resume state, so a resumed trial
continues the same learning-rate sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hpsearch.config import (
    CosineSchedulerConfig,
    OneCycleSchedulerConfig,
    SchedulerConfig,
    StepSchedulerConfig,
)

LRScheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


def build_optimizer(model: nn.Module, train: dict[str, Any]) -> torch.optim.Optimizer:
    """The trial's optimizer from its (sampled) training parameters."""
    name, lr, wd = train["optimizer"], float(train["lr"]), float(train["weight_decay"])
    if name == "sgd":
        momentum = float(train["momentum"])
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd, momentum=momentum)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=lr, weight_decay=wd)


def warmup_cosine(warmup_steps: int, total_steps: int,
                  min_ratio: float) -> Callable[[int], float]:
    """The learning-rate factor after ``step`` optimizer steps: linear warmup to 1 over
    ``warmup_steps``, then half a cosine down to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Schedule:
    """A learning-rate scheduler and when it steps."""

    def __init__(self, scheduler: LRScheduler, per_step: bool) -> None:
        self.scheduler, self.per_step = scheduler, per_step

    def after_optimizer_step(self) -> None:
        if self.per_step:
            self.scheduler.step()  # type: ignore[call-arg]

    def after_epoch(self, value: float) -> None:
        """End of an epoch: ``value`` is the monitored metric (plateau reads it)."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if math.isfinite(value):
                self.scheduler.step(value)
        elif not self.per_step:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)


def build_schedule(
    optimizer: torch.optim.Optimizer,
    config: Any,
    mode: str,
    max_epochs: int,
    steps_per_epoch: int,
) -> Schedule | None:
    """The schedule ``train.lr_scheduler`` asks for (None: a constant learning rate).

    Args:
        optimizer: The trial's optimizer (its learning rate is the trial's ``lr``).
        config: ``train.lr_scheduler``.
        mode: ``checkpoint.mode`` (plateau reduces when the monitored value stops improving).
        max_epochs: ``train.max_epochs``: the length of cosine and onecycle.
        steps_per_epoch: Optimizer steps per epoch (batches / accumulate_grad_batches,
            rounded up).
    """
    sched = torch.optim.lr_scheduler
    if config is None:
        return None
    if isinstance(config, SchedulerConfig):
        return Schedule(sched.ReduceLROnPlateau(optimizer, mode=mode, patience=config.patience,
                                                factor=config.factor, min_lr=config.min_lr),
                        per_step=False)
    if isinstance(config, StepSchedulerConfig):
        return Schedule(sched.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma),
                        per_step=False)
    total = max(1, max_epochs * steps_per_epoch)
    lr = float(optimizer.param_groups[0]["lr"])
    if isinstance(config, CosineSchedulerConfig):
        ratio = config.min_lr / lr if lr > 0 else 0.0
        factor = warmup_cosine(config.warmup_epochs * steps_per_epoch, total, ratio)
        return Schedule(sched.LambdaLR(optimizer, factor), per_step=True)
    if isinstance(config, OneCycleSchedulerConfig):
        return Schedule(sched.OneCycleLR(
            optimizer, max_lr=config.max_lr or lr, total_steps=total,
            pct_start=config.pct_start, div_factor=config.div_factor,
            final_div_factor=config.final_div_factor,
            cycle_momentum="momentum" in optimizer.defaults or "betas" in optimizer.defaults,
        ), per_step=True)
    raise ValueError(f"unknown lr_scheduler {config!r}")
