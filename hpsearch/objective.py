"""The escape hatch: ``objective: "package.module:function"`` trains each trial with the user's
own loop, and hpsearch keeps every guarantee of its built-in one.

hpsearch calls ``fn(ctx)`` with an :class:`ObjectiveContext`. The function trains
``ctx.model`` its own way and calls ``ctx.report(epoch, metrics, ...)`` once per epoch of
``ctx.epochs()``; each report goes through the same book-keeping as a built-in epoch
(:class:`hpsearch.train.TrialRun`): Optuna's intermediate value and pruning, the best-epoch
checkpoint, the resume state, early stopping, callbacks, TensorBoard. The trial's value is the
monitored metric of its best epoch, and the function's return value is ignored.

::

    def objective(ctx):
        model = ctx.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=ctx.params["lr"])
        ctx.restore(optimizer=optimizer)          # a resumed trial continues; else a no-op
        for epoch in ctx.epochs():
            ...train one epoch...
            ctx.report(epoch, {"val_acc": ...}, optimizer=optimizer)
        if ctx.scoring_test:                      # only when the report asks
            ctx.report_test({"test_acc": ...})   # ctx.model holds the best epoch's weights

The same function scores the test split for the report (:func:`train_and_test`: a seed
retrain; :func:`score_checkpoint`: a kept checkpoint, with no epoch left to train). During the
search ``ctx.scoring_test`` is False, the test split is refused and ``report_test`` does
nothing, so nothing the search decides can depend on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch
from torch import nn

from hpsearch import metrics, user_code
from hpsearch.checkpoint.loading import load_model
from hpsearch.checkpoint.trial_files import snapshot
from hpsearch.config import StudyConfig
from hpsearch.data import Dataset, DeviceBatches
from hpsearch.space import TrialParams
from hpsearch.train import (
    Tracker,
    TrialEnv,
    TrialRun,
    _rng_state,
    _set_rng_state,
    seed_everything,
    trial_model,
)

__all__ = ["ObjectiveContext", "run_objective_trial", "score_checkpoint", "train_and_test"]

RESERVED = ("epoch", "seconds")
"""Record keys hpsearch writes itself; a report may not name them."""


class ObjectiveTraining:
    """The state of a user's loop that the book-keeping sees (:class:`hpsearch.train.Training`):
    the model hpsearch built, the optimizer and schedule the objective hands over, the
    tracker, the history and the RNG states."""

    def __init__(self, config: StudyConfig, params: TrialParams, dataset: Dataset,
                 device: torch.device, seed: int, in_memory: bool = True,
                 model: nn.Module | None = None, scored_split: str = "test") -> None:
        seed_everything(seed)
        # What ctx.batches("test") reads: the validation split when verify reproduces the
        # recorded value with the objective's own scoring code.
        self.scored_split = scored_split
        self.config, self.dataset, self.device, self.in_memory = config, dataset, device, in_memory
        self.model = (model or trial_model(config, params, dataset)).to(device)
        self.monitor, self.mode = config.monitor, config.checkpoint.mode
        self.tracker = Tracker.of(config)
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0
        self.start_epoch = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.pending: dict[str, Any] | None = None
        """A resumed trial's state, until ``ctx.restore`` hands over what it restores into."""
        self.splits: dict[str, DeviceBatches] = {}

    def resume_state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": (self.optimizer.state_dict()
                                     if self.optimizer is not None else None),
            "scheduler_state_dict": (self.scheduler.state_dict()
                                     if self.scheduler is not None else None),
            "tracker": self.tracker.state_dict(),
            "history": list(self.history),
            "seconds": self.seconds,
            "rng": _rng_state(self.generator, self.device),
        }

    def load_resume_state(self, state: dict[str, Any]) -> None:
        # The weights, optimizer, schedule and RNG wait for ctx.restore: the objective builds
        # its optimizer first, and its setup must not draw from the restored RNG.
        self.tracker.load_state_dict(state["tracker"])
        self.history = list(state["history"])
        self.seconds = float(state["seconds"])
        self.start_epoch = int(state["epoch"]) + 1
        self.pending = state

    def restore(self, optimizer: Any, scheduler: Any) -> None:
        """Load the pending resume state into the model, ``optimizer`` and ``scheduler``."""
        self.optimizer, self.scheduler = optimizer, scheduler
        state, self.pending = self.pending, None
        if state is None:
            return
        for name, given in (("optimizer", optimizer), ("scheduler", scheduler)):
            if state.get(f"{name}_state_dict") is not None and given is None:
                raise RuntimeError(
                    f"the resumed trial has {name} state: pass {name}= to ctx.restore")
        self.model.load_state_dict(state["model_state_dict"])
        if optimizer is not None and state["optimizer_state_dict"] is not None:
            optimizer.load_state_dict(state["optimizer_state_dict"])
        if scheduler is not None and state["scheduler_state_dict"] is not None:
            scheduler.load_state_dict(state["scheduler_state_dict"])
        _set_rng_state(state["rng"], self.generator, self.device)

    def step_scheduler(self, value: float) -> None:
        pass  # the objective steps its own schedule

    def batches(self, split: str) -> DeviceBatches:
        if split not in self.splits:
            source = self.scored_split if split == "test" else split
            self.splits[split] = DeviceBatches(self.dataset, source, self.device,
                                               self.in_memory and split != "test",
                                               num_workers=self.config.data.num_workers)
        return self.splits[split]

    def close(self) -> None:
        for batches in self.splits.values():
            batches.close()


class _Bookkeeping(Protocol):
    """Where ``ctx.report`` sends an epoch: an Optuna trial's :class:`TrialRun`, or a
    report's retrain (:class:`_Retrain`)."""

    def epoch_ended(self, epoch: int, record: dict[str, float]) -> bool: ...

    def restore_best(self) -> None: ...


class _Retrain:
    """The report's retrain of a configuration: best tracking and early stopping, as in a
    trial, without Optuna or files."""

    def __init__(self, training: ObjectiveTraining) -> None:
        self.training = training
        self.best_state: dict[str, torch.Tensor] | None = None

    def epoch_ended(self, epoch: int, record: dict[str, float]) -> bool:
        training = self.training
        if training.tracker.update(record[training.monitor], epoch):
            self.best_state = snapshot(training.model.state_dict())
        return not training.tracker.should_stop

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.training.model.load_state_dict(self.best_state)


class ObjectiveContext:
    """What the user's objective gets from hpsearch: the trial's parameters, device, model and
    data, its epochs, and the calls that restore, report and score.

    Attributes:
        params: The sampled parameters as the study file names them (``architecture``, the
            architecture's own, ``lr``, ``batch_size``, ...).
        trial_params: The same, split into ``architecture``, ``model``, ``train``, ``loss``.
        config: The study's config.
        device: The device this trial runs on.
        dataset: The study's data (``data:``): splits as tensors, or streaming datasets.
        model: The trial's model, built by the configured factory for the sampled
            parameters, on ``device`` (checkpoints record that factory, so
            ``load_best_model`` rebuilds it).
        generator: A ``torch.Generator`` seeded for this trial and saved with the resume
            state: shuffle with it and a resumed trial sees the same batches.
        seed: The trial's seed (``train.seed`` + trial number; the report's retrain seed).
        max_epochs: ``train.max_epochs``.
        trial_number: The Optuna trial number; None when the report runs the objective.
        scoring_test: True only when the report runs the objective to score the test split:
            then call :meth:`report_test` after the epochs.
    """

    def __init__(self, config: StudyConfig, params: TrialParams, training: ObjectiveTraining,
                 bookkeeping: _Bookkeeping, *, seed: int, trial_number: int | None = None,
                 scoring_test: bool = False, log: Callable[[str], None] = lambda line: None,
                 ) -> None:
        self.config, self.trial_params, self.params = config, params, params.flat()
        self.device, self.dataset = training.device, training.dataset
        self.model, self.generator = training.model, training.generator
        self.seed, self.max_epochs = seed, config.train.max_epochs
        self.trial_number, self.scoring_test = trial_number, scoring_test
        self._training, self._book, self._log = training, bookkeeping, log
        self._restored = False
        self._epoch: int | None = None
        self._reported = False
        self._train_on = True
        self._epochs_done = False
        self._epoch_started = 0.0
        self.test_scores: dict[str, float] | None = None

    @property
    def start_epoch(self) -> int:
        """The first epoch :meth:`epochs` yields (after a resume, the one after the last
        epoch the resume state holds)."""
        return self._training.start_epoch

    def log(self, line: str) -> None:
        """Append a line to the trial's ``train.log``."""
        self._log(line)

    def batches(self, split: str) -> DeviceBatches:
        """The study's ``train`` or ``val`` split (``test`` only while :attr:`scoring_test`),
        batched on the device: ``for x, y in ctx.batches("train").iterate(batch_size,
        ctx.generator)``; without a generator, in order."""
        if split == "test" and not self.scoring_test:
            raise RuntimeError("the test split is read only when hpsearch scores it "
                               "(ctx.scoring_test); the search never sees it")
        return self._training.batches(split)

    def restore(self, *, optimizer: Any = None, scheduler: Any = None) -> int:
        """Hand over the optimizer and learning-rate schedule (anything with ``state_dict``
        and ``load_state_dict``) and, in a resumed trial, load the model's, theirs and the
        RNG states of the last epoch saved. Call it once, before :meth:`epochs`.

        Returns:
            The first epoch to train.
        """
        if self._restored:
            raise RuntimeError("ctx.restore was called twice")
        self._training.restore(optimizer, scheduler)
        self._restored = True
        return self.start_epoch

    def epochs(self) -> Iterator[int]:
        """The epochs to train: from :attr:`start_epoch` up to ``train.max_epochs``, ending
        early when early stopping says so. Each must be reported with :meth:`report`. When
        they end, ``ctx.model`` holds the best epoch's weights."""
        if not self._restored:
            raise RuntimeError("call ctx.restore(optimizer=..., scheduler=...) before "
                               "ctx.epochs(): it continues a resumed trial (and does nothing "
                               "for a fresh one)")
        if self._epoch is not None or self._epochs_done:
            raise RuntimeError("ctx.epochs() was called twice")
        for epoch in range(self._training.start_epoch, self.max_epochs):
            self._epoch, self._reported = epoch, False
            self._epoch_started = time.perf_counter()
            yield epoch
            if not self._reported:
                raise RuntimeError(f"epoch {epoch} was not reported: call ctx.report({epoch}, "
                                   "metrics) once in each epoch")
            if not self._train_on:
                break
        self._book.restore_best()
        self._epochs_done = True

    def report(self, epoch: int, metrics: dict[str, Any], *, model: nn.Module | None = None,
               optimizer: Any = None, scheduler: Any = None) -> None:
        """Record an epoch: its metrics (``val_<name>`` for validation, any number of them,
        the study metric and ``checkpoint.monitor`` among them; ``train_loss`` is checked for
        NaN and inf when given). Reports the intermediate value, keeps the best epoch's
        checkpoint and the resume state, and steps early stopping.

        Args:
            epoch: The epoch :meth:`epochs` yielded last.
            metrics: Name -> number (a float, or a one-element tensor).
            model: ``ctx.model`` (or a ``torch.compile`` of it); the weights saved are always
                ``ctx.model``'s.
            optimizer: The optimizer, if it changed since :meth:`restore`.
            scheduler: The learning-rate schedule, if it changed since :meth:`restore`.

        Raises:
            optuna.TrialPruned: The pruner stopped the trial: let it propagate.
            hpsearch.errors.Interrupted: The run is stopping; the resume state of this epoch
                is saved: let it propagate.
        """
        if self._epoch is None or epoch != self._epoch or self._reported:
            expected = "none (iterate ctx.epochs())" if self._epoch is None else self._epoch
            raise RuntimeError(f"ctx.report({epoch}): the epoch to report is {expected}, once")
        if model is not None and model is not self.model \
                and getattr(model, "_orig_mod", None) is not self.model:
            raise RuntimeError("ctx.report(model=...) must be ctx.model: the checkpoint "
                               "records the factory that rebuilds ctx.model")
        training = self._training
        if optimizer is not None:
            training.optimizer = optimizer
        if scheduler is not None:
            training.scheduler = scheduler
        record = self._record(epoch, metrics)
        self._reported = True
        training.history.append(record)
        self._train_on = self._book.epoch_ended(epoch, record)

    def _record(self, epoch: int, values: dict[str, Any]) -> dict[str, float]:
        record: dict[str, float] = {"epoch": epoch}
        for key, value in values.items():
            if not isinstance(key, str) or key in RESERVED:
                raise ValueError(f"ctx.report: {key!r} is not a metric name (epoch and seconds "
                                 "are hpsearch's)")
            try:
                record[key] = float(value)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"ctx.report: {key} is {type(value).__name__}, not a "
                                "number") from None
        wanted = {"study.metric": self.config.study.metric,
                  "checkpoint.monitor": self._training.monitor}
        for key, name in wanted.items():
            if name not in record:
                raise ValueError(f"ctx.report({epoch}) lacks {name!r} ({key}); it reported "
                               f"{sorted(values)}")
        optimizer = self._training.optimizer
        if "lr" not in record and optimizer is not None:
            record["lr"] = float(optimizer.param_groups[0]["lr"])
        self._training.seconds += time.perf_counter() - self._epoch_started
        record["seconds"] = round(self._training.seconds, 4)
        return record

    def report_test(self, metrics: dict[str, Any]) -> None:
        """Give the test split's metrics of ``ctx.model`` after :meth:`epochs` ended (it
        then holds the best epoch's weights), when :attr:`scoring_test`; ignored otherwise.
        The study metric's test counterpart (``val_acc`` -> ``test_acc``) is required."""
        if not self.scoring_test:
            return
        if not self._epochs_done:
            raise RuntimeError("ctx.report_test before ctx.epochs() ended: the test split is "
                               "scored with the best epoch's weights, restored at the end")
        wanted = _test_metric(self.config)
        scores = {str(k): float(v) for k, v in metrics.items()}
        if wanted not in scores:
            raise ValueError(f"ctx.report_test lacks {wanted!r} (the study metric on the test "
                           f"split); it reported {sorted(scores)}")
        self.test_scores = scores


def _test_metric(config: StudyConfig) -> str:
    return metrics.on_split(config.study.metric, "test")


def _objective(config: StudyConfig) -> Callable[[ObjectiveContext], Any]:
    assert config.objective is not None
    return user_code.resolve(config.objective)


def _call(fn: Callable[[ObjectiveContext], Any], ctx: ObjectiveContext, reference: str) -> None:
    """Run the objective; it must have reported at least one epoch (or resumed with all
    epochs done)."""
    fn(ctx)
    if not ctx._training.history:
        raise RuntimeError(f"objective {reference} returned without reporting an epoch: call "
                           "ctx.report(epoch, metrics) in each epoch of ctx.epochs()")


def run_objective_trial(trial: optuna.Trial, params: TrialParams, env: TrialEnv) -> float:
    """Train one trial with the study's ``objective`` and return its best-epoch value.

    Raises:
        As :func:`hpsearch.train.run_trial`, and whatever the objective raises.
    """
    cfg = env.config
    seed = cfg.train.seed + trial.number
    training = ObjectiveTraining(cfg, params, env.dataset, env.device, seed, env.in_memory)
    run = TrialRun(trial, params, env, training)
    ctx = ObjectiveContext(cfg, params, training, run, seed=seed, trial_number=trial.number,
                           log=env.log)
    assert cfg.objective is not None
    return run.train(lambda: _call(_objective(cfg), ctx, str(cfg.objective)))


def _scores(fn: Callable[[ObjectiveContext], Any], ctx: ObjectiveContext,
            reference: str) -> dict[str, float]:
    try:
        fn(ctx)
    finally:
        ctx._training.close()
    if ctx.test_scores is None:
        raise RuntimeError(f"objective {reference} did not call ctx.report_test(...) while "
                           "hpsearch scored the test split (ctx.scoring_test)")
    bad = {k: v for k, v in ctx.test_scores.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"objective {reference} reported non-finite test metrics {bad}")
    return ctx.test_scores


def train_and_test(config: StudyConfig, params: TrialParams, dataset: Dataset,
                   device: torch.device, seed: int, in_memory: bool = True) -> dict[str, float]:
    """The report's seed retrain of an objective study: run the objective without Optuna
    (best epoch restored at the end of its epochs) and return what it scored on the test
    split (``ctx.report_test``)."""
    training = ObjectiveTraining(config, params, dataset, device, seed, in_memory)
    ctx = ObjectiveContext(config, params, training, _Retrain(training), seed=seed,
                           scoring_test=True)
    return _scores(_objective(config), ctx, str(config.objective))


def score_checkpoint(config: StudyConfig, checkpoint: Path, params: TrialParams,
                     dataset: Dataset, device: torch.device,
                     split: str = "test") -> dict[str, float]:
    """The test metrics of a kept checkpoint of an objective study: the objective runs with
    ``ctx.model`` loaded from it and no epoch left to train, then scores the test split.

    ``split="val"``: the validation split stands in for the test split (``ctx.batches("test")``
    reads it), so ``hpsearch.verify`` reproduces the recorded value with the user's own
    scoring code; the keys keep their ``test_`` names.
    """
    model = load_model(checkpoint, map_location=device)
    training = ObjectiveTraining(config, params, dataset, device, config.train.seed,
                                 model=model, scored_split=split)
    training.start_epoch = config.train.max_epochs  # trained already: only the test is left
    ctx = ObjectiveContext(config, params, training, _Retrain(training),
                           seed=config.train.seed, scoring_test=True)
    return _scores(_objective(config), ctx, str(config.objective))
