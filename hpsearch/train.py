"""One trial: train, validate, report, prune, stop early, checkpoint the best epoch, resume.

The loop sees Optuna through three things only: ``trial.report``, ``trial.should_prune`` and
``TrialPruned``. Everything else is the practice of "save the best model on validation
performance": a tracker decides what "better" means (NaN and inf never are), the best epoch is
checkpointed when it improves, the learning-rate schedule and early stopping read the same
monitored value, a ``last.pt`` resume state is written every epoch, and the best weights are
restored at the end. The trial's value is the monitored metric of its best epoch, the epoch of
its checkpoint.

The built-in loop's options (``train.precision``, ``grad_clip_norm``,
``accumulate_grad_batches``, ``lr_scheduler``, ``compile``) live in :class:`Trainer`; a
pending gradient accumulation is always stepped at the end of an epoch, so the resume state
(written between epochs) never holds half an accumulation.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import optuna
import torch
from torch import nn

from hpsearch import attrs, metrics
from hpsearch.callbacks import Callbacks, TensorBoardLog, TrialEvent
from hpsearch.checkpoint.artifacts import register_trial_checkpoint
from hpsearch.checkpoint.format import load_checkpoint
from hpsearch.checkpoint.mirror import TrialMirror
from hpsearch.checkpoint.trial_files import FORMAT_VERSION, BackgroundWriter, TrialFiles, snapshot
from hpsearch.config import StudyConfig
from hpsearch.data import Dataset, DeviceBatches
from hpsearch.errors import CallbackError, ConfigError, HpsearchError, Interrupted
from hpsearch.evaluation import EVAL_BATCH, evaluate, study_evaluator
from hpsearch.files import atomic_torch_save
from hpsearch.models import build_model, count_parameters
from hpsearch.optim import build_optimizer, build_schedule
from hpsearch.optuna_private import ArtifactStore, frozen, storage_of, study_id
from hpsearch.ranking import improves
from hpsearch.results import MANIFEST, RESUME_STATE, ResultsLayout
from hpsearch.space import TrialParams
from hpsearch.version import __version__

__all__ = ["EVAL_BATCH", "NonFiniteError", "Trainer", "TrialEnv", "evaluate", "run_trial",
           "train_and_test"]


class NonFiniteError(HpsearchError, RuntimeError):
    """The loss or the monitored metric became NaN or inf."""


# ---------------------------------------------------------------- best tracking


@dataclass
class Tracker:
    """Best value, its epoch, and the early-stopping counter."""

    mode: str
    min_delta: float = 0.0
    patience: int | None = None
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0

    @classmethod
    def of(cls, config: StudyConfig) -> Tracker:
        """A study's tracker: its monitor's mode and ``train.early_stopping``."""
        es = config.train.early_stopping
        return cls(str(config.checkpoint.mode), es.min_delta if es else 0.0,
                   es.patience if es else None)

    def update(self, value: float, epoch: int) -> bool:
        if improves(value, self.best, self.mode, self.min_delta if self.best is not None else 0):
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.bad_epochs = int(state["bad_epochs"])


# ---------------------------------------------------------------- the trainer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # Only the trial's own GPU: a resume may run on another GPU, or with fewer visible.
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "shuffle": gen.get_state(),
    }


def _set_rng_state(state: dict[str, Any], gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    # Older resume files hold a list, one state per visible GPU: not restorable by index.
    if isinstance(cuda, torch.Tensor) and device.type == "cuda":
        torch.cuda.set_rng_state(cuda.cpu(), device)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((state["python_version"], tuple(state["python"]), None))
    gen.set_state(state["shuffle"].cpu())


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


@dataclass
class Trainer:
    """Model, optimizer, schedule, tracker and history of one training run."""

    config: StudyConfig
    params: TrialParams
    dataset: Dataset
    device: torch.device
    seed: int
    in_memory: bool = True
    should_stop: Callable[[], bool] = lambda: False
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        seed_everything(self.seed)
        cfg, train = self.config, self.config.train
        if train.precision == "16" and self.device.type != "cuda":
            raise ConfigError("", "train.precision", f"16 (float16 with a GradScaler) needs a "
                              f"CUDA device, not {self.device}; use bf16 on the CPU")
        self.model = trial_model(cfg, self.params, self.dataset).to(self.device)
        # The weights, the state dicts and the checkpoints stay the plain module's.
        self.forward: nn.Module = torch.compile(self.model) if train.compile else self.model
        self.optimizer = build_optimizer(self.model, self.params.train)
        self.monitor, self.mode = cfg.monitor, cfg.checkpoint.mode
        self.tracker = Tracker.of(cfg)
        self.generator = torch.Generator().manual_seed(self.seed)
        workers = cfg.data.num_workers
        self.train_batches = DeviceBatches(self.dataset, "train", self.device, self.in_memory,
                                           num_workers=workers)
        self.val_batches = DeviceBatches(self.dataset, "val", self.device, self.in_memory,
                                         num_workers=workers)
        self.evaluator = study_evaluator(cfg, self.dataset.task, self.params.loss)
        self.loss_fn = self.evaluator.loss
        self.step = self.evaluator.step
        self.batch_size = int(self.params.train["batch_size"])
        self.accumulate = train.accumulate_grad_batches
        self.batches_per_epoch = math.ceil(len(self.train_batches) / self.batch_size)
        self.schedule = build_schedule(
            self.optimizer, train.lr_scheduler, self.mode, train.max_epochs,
            math.ceil(self.batches_per_epoch / self.accumulate))
        self.autocast_dtype = AUTOCAST_DTYPES.get(train.precision)
        # Float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if train.precision == "16" else None)
        self.clip = train.grad_clip_norm
        self.start_epoch = 0

    def _batch_loss(self, batch: Any) -> tuple[torch.Tensor, int]:
        """The built-in forward and loss of an ``(inputs, targets)`` batch, and its samples."""
        xb, yb = batch
        return self.loss_fn(self.forward(xb), yb), len(yb)

    def _step_loss(self, batch: Any) -> tuple[torch.Tensor, int]:
        """``train.step``'s loss of a batch of any structure, and its samples."""
        assert self.step is not None
        return self.step.train_loss(self.forward, batch)

    def _optimizer_step(self) -> None:
        clip = self.clip
        if self.scaler is not None:
            if clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
        if self.schedule is not None:
            self.schedule.after_optimizer_step()

    def train_epoch(self) -> float:
        opt, accumulate, n_batches = self.optimizer, self.accumulate, self.batches_per_epoch
        # Chosen once per epoch: without train.step, (x, y) batches and the built-in loss.
        if self.step is None:
            batches, batch_loss = self.train_batches.iterate, self._batch_loss
        else:
            batches, batch_loss = self.train_batches.batches, self._step_loss
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        self.forward.train()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        n = 0
        last_check = time.monotonic()
        for i, batch in enumerate(batches(self.batch_size, self.generator)):
            if i % accumulate == 0:
                opt.zero_grad(set_to_none=True)
            with autocast:
                loss, samples = batch_loss(batch)
            scaled = loss
            if accumulate > 1:
                # Each step averages over its batches (the epoch's last group may be shorter).
                scaled = loss / min(accumulate, n_batches - (i - i % accumulate))
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            if (i + 1) % accumulate == 0 or i + 1 == n_batches:
                self._optimizer_step()
            total += loss.detach().double() * samples
            n += samples
            # A stop request is honoured within about a second, even in a long epoch.
            if time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                if self.should_stop():
                    raise Interrupted()
        return float(total.item()) / max(n, 1)

    def evaluate(self, batches: DeviceBatches) -> dict[str, float]:
        """Base metric name -> value over a whole split, with the study's loss and metrics."""
        return self.evaluator(self.forward, batches)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch and validate; append and return the epoch's record."""
        t0 = time.perf_counter()
        train_loss = self.train_epoch()
        val = self.evaluate(self.val_batches)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            **{metrics.named("val", k): v for k, v in val.items()},
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": round(self.seconds, 4),
        }
        self.history.append(record)
        return record

    def close(self) -> None:
        """End the data loaders' worker processes (streaming data only)."""
        self.train_batches.close()
        self.val_batches.close()

    def step_scheduler(self, value: float) -> None:
        """End of an epoch: an epoch-wise schedule steps (plateau with the monitored value)."""
        if self.schedule is not None:
            self.schedule.after_epoch(value)

    def resume_state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.schedule.state_dict() if self.schedule else None,
            "grad_scaler_state_dict": self.scaler.state_dict() if self.scaler else None,
            "tracker": self.tracker.state_dict(),
            "history": list(self.history),
            "seconds": self.seconds,
            "rng": _rng_state(self.generator, self.device),
        }

    def load_resume_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model_state_dict"])
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        if self.schedule is not None and state["scheduler_state_dict"] is not None:
            self.schedule.load_state_dict(state["scheduler_state_dict"])
        if self.scaler is not None and state.get("grad_scaler_state_dict"):
            self.scaler.load_state_dict(state["grad_scaler_state_dict"])
        self.tracker.load_state_dict(state["tracker"])
        self.history = list(state["history"])
        self.seconds = float(state["seconds"])
        _set_rng_state(state["rng"], self.generator, self.device)
        self.start_epoch = int(state["epoch"]) + 1


def load_initial_weights(model: nn.Module, source: str) -> list[str]:
    """Copy matching weights from a checkpoint (fine-tuning); returns the keys skipped."""
    ckpt = load_checkpoint(source, map_location="cpu")
    own = model.state_dict()
    matched = {
        k: v for k, v in ckpt["model_state_dict"].items() if k in own and own[k].shape == v.shape
    }
    # A new head (another output size) is the usual transfer-learning case: skip, don't fail.
    model.load_state_dict(matched, strict=False)
    return sorted(set(own) - set(matched))


# ---------------------------------------------------------------- one Optuna trial


@dataclass
class TrialEnv:
    """What a worker gives every trial it runs."""

    config: StudyConfig
    dataset: Dataset
    device: torch.device
    layout: ResultsLayout
    worker: str
    in_memory: bool = True
    should_stop: Callable[[], bool] = lambda: False
    on_epoch: Callable[[int, int, dict[str, float]], None] = lambda trial, epoch, rec: None
    log: Callable[[str], None] = print
    on_checkpoint_kept: Callable[[optuna.Trial, Path], None] | None = None
    store: ArtifactStore | None = None
    """The study's artifact store. With ``artifacts.shared`` each trial's files are mirrored
    there (:mod:`hpsearch.checkpoint.mirror`), and its kept checkpoint is published from the
    mirror instead of through ``on_checkpoint_kept``."""


class Training(Protocol):
    """What a trial trains, as its book-keeping (:class:`TrialRun`) sees it.

    Two kinds satisfy it: the built-in :class:`Trainer`, and the state of a user's own
    training loop (``objective:``, :mod:`hpsearch.objective`).
    """

    model: nn.Module
    """The plain module whose weights are checkpointed."""
    tracker: Tracker
    history: list[dict[str, float]]
    seconds: float
    start_epoch: int
    """The first epoch still to train (after a resume, the one after the resumed state's)."""
    monitor: str
    mode: str

    def resume_state(self, epoch: int) -> dict[str, Any]:
        """Everything ``last.pt`` holds after ``epoch``, weights included."""
        ...

    def load_resume_state(self, state: dict[str, Any]) -> None:
        """Continue from a ``last.pt``: tracker, history, seconds and ``start_epoch`` at
        least."""
        ...

    def step_scheduler(self, value: float) -> None:
        """End of an epoch whose monitored value is ``value``."""
        ...

    def close(self) -> None:
        """The trial is over (ended, failed or interrupted)."""
        ...


def checkpoint_name(config: StudyConfig, epoch: int, value: float, trial: int) -> str:
    monitor = config.monitor
    return config.checkpoint.filename.format(
        epoch=epoch, monitor=monitor, value=value, trial=trial
    )


def model_meta(config: StudyConfig, params: TrialParams, dataset: Dataset) -> dict[str, Any]:
    """JSON-safe metadata that rebuilds a trial's model without the study file (what
    ``load_model`` reads back)."""
    return {
        "architecture": params.architecture,
        "factory": config.model.architecture[params.architecture].factory,
        "params": dict(params.model),
        "input_shape": list(dataset.input_shape),
        "output_size": dataset.output_size,
        "task": dataset.task,
    }


def trial_model(config: StudyConfig, params: TrialParams, dataset: Dataset) -> nn.Module:
    """A trial's model: its architecture's factory (or built-in) for the sampled parameters
    and the data's shape, with ``model.init_from``'s weights where they fit."""
    model = build_model(params.architecture, params.model, dataset.input_shape,
                        dataset.output_size, config.model.architecture[params.architecture].factory)
    if config.model.init_from:
        load_initial_weights(model, config.model.init_from)
    return model


def resume_chain(trial: optuna.Trial) -> list[int]:
    """The failed trials this one retries, oldest first (Optuna's ``retry_history``).

    Read from the stored FrozenTrial: in Optuna 5 a live Trial exposes no system attrs.
    """
    return [int(n) for n in frozen(trial).system_attrs.get(attrs.RETRY_HISTORY, [])]


def run_trial(trial: optuna.Trial, params: TrialParams, env: TrialEnv) -> float:
    """Train one trial end to end and return its best-epoch monitored value.

    Raises:
        optuna.TrialPruned: The pruner stopped it (or a non-finite metric under
            ``on_nonfinite: prune``).
        NonFiniteError: The loss or the monitored metric became NaN or inf.
        Interrupted: The run is stopping; ``last.pt`` holds the state to resume from.
    """
    cfg = env.config
    trainer = Trainer(cfg, params, env.dataset, env.device, seed=cfg.train.seed + trial.number,
                      in_memory=env.in_memory, should_stop=env.should_stop)
    run = TrialRun(trial, params, env, trainer)
    return run.train(partial(_epochs, run, trainer))


def _epochs(run: TrialRun, trainer: Trainer) -> None:
    """The built-in loop: train and validate each epoch, and hand it to the book-keeping."""
    for epoch in range(trainer.start_epoch, run.cfg.train.max_epochs):
        if not run.epoch_ended(epoch, trainer.run_epoch(epoch)):
            break


class TrialRun:
    """The book-keeping of one Optuna trial, whoever trains it: set up (or resume), then per
    epoch report, prune, track the best, keep its checkpoint and the resume state, and finish.

    The training itself is a loop handed to :meth:`train`, which calls :meth:`epoch_ended`
    after each epoch: the built-in loop (:func:`run_trial`) or the user's own objective
    (``ctx.report`` of :mod:`hpsearch.objective`).
    """

    def __init__(self, trial: optuna.Trial, params: TrialParams, env: TrialEnv,
                 training: Training) -> None:
        cfg = env.config
        self.trial, self.env, self.cfg = trial, env, cfg
        self.training = training
        self.folder = env.layout.trial(trial.number)
        self.folder.mkdir(parents=True, exist_ok=True)
        mirror = (TrialMirror.start(env.store, trial)
                  if env.store is not None and cfg.artifacts.shares_trials else None)
        self.files = TrialFiles(self.folder, training.monitor, training.mode,
                                cfg.checkpoint.keep_top_k, mirror)
        trial.set_user_attr(attrs.ARCHITECTURE, params.architecture)
        trial.set_user_attr(attrs.N_PARAMS, count_parameters(training.model))
        chain = resume_chain(trial)
        if chain:
            _resume(trial, training, self.files, chain, env)
        self.base = {
            "format_version": FORMAT_VERSION,
            "hpsearch_version": __version__,
            "model": model_meta(cfg, params, env.dataset),
            "params": params.flat(),
            "monitor": training.monitor,
            "mode": training.mode,
            "metric": cfg.study.metric,
            "trial": trial.number,
            "study": cfg.study.name,
            "config": cfg.as_study_dict(),
        }
        self.params = params
        self.callbacks = Callbacks(cfg.callbacks)
        self.tensorboard = (TensorBoardLog(env.layout.tensorboard(trial.number))
                            if cfg.logging.tensorboard else None)
        if self.tensorboard is not None:
            # A resumed trial's curves start where its predecessor's did.
            for rec in training.history:
                self.tensorboard.epoch(rec)
        self.writer = BackgroundWriter()
        self.best_state: dict[str, torch.Tensor] | None = None
        # Short epochs would spend more on last.pt than on training: it is written at most
        # every resume_min_seconds, so a crash retrains at most that much.
        self.last_resume_write = time.monotonic()

    def train(self, loop: Callable[[], None]) -> float:
        """Run ``loop`` (which calls :meth:`epoch_ended` after each epoch), finish, and tell
        the callbacks how the trial ended. Returns the trial's best-epoch value."""
        try:
            value = self._train(loop)
        except Interrupted:
            raise  # not an end: the trial resumes
        except optuna.TrialPruned:
            self._forget_stored(resume_state_only=True)
            self._end("PRUNED", None)
            raise
        except Exception:
            self._forget_stored(resume_state_only=False)
            try:
                self._end("FAIL", None)
            except CallbackError as err:
                self.env.log(f"{err} (the trial had failed already)")
            raise
        self._end("COMPLETE", value)
        return value

    def _forget_stored(self, resume_state_only: bool) -> None:
        """A trial that ends without a resume drops its resume state from a shared store; a
        failed one (never retried, never kept) all its files."""
        mirror = self.files.mirror
        if mirror is None:
            return
        try:
            if resume_state_only:
                mirror.remove(RESUME_STATE)
            else:
                mirror.remove_all()
        except Exception as err:  # the trial's own ending matters more than this cleanup
            self.env.log(f"could not delete the trial's files from the store: {err}")

    def _end(self, state: str, value: float | None) -> None:
        history = self.training.history
        last = history[-1] if history else {}
        self.callbacks(TrialEvent(
            "trial_end", self.trial.number, int(last["epoch"]) if last else None,
            dict(last), state, value, self.params.flat()))

    def _epoch_event(self, epoch: int, record: dict[str, float]) -> None:
        if self.tensorboard is not None:
            self.tensorboard.epoch(record)
        if self.callbacks.functions:
            self.callbacks(TrialEvent("epoch", self.trial.number, epoch, dict(record),
                                      "RUNNING", record[self.cfg.study.metric],
                                      self.params.flat()))

    def _train(self, loop: Callable[[], None]) -> float:
        try:
            loop()
            self.writer.flush()
        finally:
            self.writer.close()
            self.training.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
            _record(self.trial, self.training, self.files, self.env)
        return self._finish()

    def epoch_ended(self, epoch: int, record: dict[str, float]) -> bool:
        """Book-keep an epoch the training appended to its history as ``record``.

        Returns:
            Whether to train on: False once early stopping ends the trial.

        Raises:
            optuna.TrialPruned: The pruner stopped the trial.
            Interrupted: The run is stopping; the resume state of this epoch was written.
            NonFiniteError: The loss or the monitored value is NaN or inf.
        """
        value = self._validated(epoch, record)
        stopping = self._keep(epoch, record, value)
        self.env.on_epoch(self.trial.number, epoch, record)
        self._epoch_event(epoch, record)
        if self.trial.should_prune():
            self.writer.flush()
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")
        tracker = self.training.tracker
        if tracker.should_stop:
            self.env.log(f"early stopping at epoch {epoch}: no improvement in "
                         f"{tracker.bad_epochs} epochs")
            return False
        if stopping:
            self.writer.flush()
            raise Interrupted()
        return True

    def _validated(self, epoch: int, record: dict[str, float]) -> float:
        """Log the epoch, refuse non-finite values, report it; returns the monitored value."""
        monitor = self.training.monitor
        value = record.get(monitor)
        if value is None:
            raise KeyError(
                f"monitored metric {monitor!r} is not computed; available: "
                f"{sorted(k for k in record if k not in ('epoch', 'lr', 'seconds'))}"
            )
        self.env.log(f"epoch {epoch}: "
                     + " ".join(f"{k}={v:.5g}" for k, v in record.items() if k != "epoch"))
        # A user's objective may report no train_loss.
        if not (math.isfinite(record.get("train_loss", 0.0)) and math.isfinite(value)):
            reason = (f"non-finite value at epoch {epoch}: "
                      + ", ".join(f"{k}={record[k]}" for k in ("train_loss", monitor)
                                  if k in record))
            if self.cfg.train.on_nonfinite == "prune":
                self.trial.set_user_attr(attrs.PRUNE_REASON, reason)
                raise optuna.TrialPruned(reason)
            raise NonFiniteError(reason)
        self.trial.report(record[self.cfg.study.metric], epoch)
        return value

    def _keep(self, epoch: int, record: dict[str, float], value: float) -> bool:
        """Track the best, queue the epoch's files and resume state, step the scheduler.

        Returns whether the run is stopping (the resume state was then written regardless).
        """
        cfg, training = self.cfg, self.training
        improved = training.tracker.update(value, epoch)
        due = _files_due(cfg, epoch, value, self.trial.number, improved)
        stopping = self.env.should_stop()
        resume_due = stopping or (
            (epoch + 1) % cfg.checkpoint.resume_every_n_epochs == 0
            and time.monotonic() - self.last_resume_write >= cfg.checkpoint.resume_min_seconds
        )
        # One CPU copy of the weights per epoch serves every file written for it.
        weights = None
        if improved or due or resume_due:
            weights = snapshot(training.model.state_dict())
        if improved:
            self.best_state = weights
        meta = {**self.base, "epoch": epoch, "value": value, "metrics": record}
        jobs: list[Callable[[], None]] = []
        for kind, name in due:
            obj = {**meta, "history": list(training.history), "model_state_dict": weights}
            jobs.append(partial(self.files.save, name, obj, kind, epoch, value))
        training.step_scheduler(value)
        if resume_due:
            rest = {k: v for k, v in training.resume_state(epoch).items()
                    if k != "model_state_dict"}
            state = {**self.base, **snapshot(rest), "model_state_dict": weights}
            jobs.append(partial(atomic_torch_save, state, self.folder / RESUME_STATE))
            if self.files.mirror is not None:
                jobs.append(partial(self.files.mirror.put, self.folder / RESUME_STATE))
            self.last_resume_write = time.monotonic()
        if jobs:
            # Written off the training thread; the next submit waits for this one.
            self.writer.submit(partial(_run_all, jobs))
        return stopping

    def restore_best(self) -> None:
        """Put the best epoch's weights back into the model (under ``checkpoint.save: last``
        the trial ends with its last epoch's)."""
        # The model the trial ends with is the one it is ranked by.
        if self.cfg.checkpoint.save != "last" and self.best_state is not None:
            self.training.model.load_state_dict(self.best_state)

    def _finish(self) -> float:
        """Restore the best weights, publish the kept checkpoint, drop the resume state."""
        training, metric = self.training, self.cfg.study.metric
        if training.tracker.best_epoch is None:
            raise NonFiniteError("no epoch produced a finite monitored value")
        self.restore_best()
        kept = self.files.best()
        mirror = self.files.mirror
        if kept is not None and mirror is not None:
            # Already in the store: published as is, not uploaded twice.
            register_trial_checkpoint(self.trial, mirror.object_id(kept[0]),
                                      self.folder / kept[0])
        elif kept is not None and self.env.on_checkpoint_kept is not None:
            self.env.on_checkpoint_kept(self.trial, self.folder / kept[0])
        (self.folder / RESUME_STATE).unlink(missing_ok=True)
        if mirror is not None:
            mirror.remove(RESUME_STATE)
        if self.cfg.checkpoint.save == "last":
            return float(training.history[-1][metric])
        first = training.history[0]["epoch"]
        return float(training.history[training.tracker.best_epoch - first][metric])


def _files_due(
    cfg: StudyConfig, epoch: int, value: float, trial: int, improved: bool
) -> list[tuple[str, str]]:
    """(kind, file name) of the checkpoints the ``checkpoint.save`` policy writes this epoch."""
    save, due = cfg.checkpoint.save, []
    if save in ("best", "best_and_every_n") and improved:
        due.append(("best", checkpoint_name(cfg, epoch, value, trial)))
    if save == "best_and_every_n" and (epoch + 1) % cfg.checkpoint.every_n_epochs == 0:
        due.append(("every_n", f"every-epoch{epoch:03d}.pt"))
    if save == "last":
        due.append(("last_model", checkpoint_name(cfg, epoch, value, trial)))
    return due


def _run_all(jobs: list[Callable[[], None]]) -> None:
    for job in jobs:
        job()


def _record(trial: optuna.Trial, training: Training, files: TrialFiles, env: TrialEnv) -> None:
    """User attrs of however the trial ended (pruned trials too: the report may use them)."""
    best_epoch = training.tracker.best_epoch
    kept = files.best()
    if kept is not None:
        trial.set_user_attr(attrs.CHECKPOINT, env.layout.relative(files.folder / kept[0]))
        trial.set_user_attr(attrs.CHECKPOINT_SHA256, kept[1].sha256)
    ended = {
        attrs.BEST_EPOCH: best_epoch,
        attrs.BEST_VALUE: training.tracker.best,
        attrs.TRAIN_SECONDS: round(training.seconds, 3),
        attrs.HISTORY: training.history,
        attrs.DEVICE: str(env.device),
        attrs.WORKER: env.worker,
    }
    for key, value in ended.items():
        trial.set_user_attr(key, value)


def _resume(
    trial: optuna.Trial, training: Training, files: TrialFiles, chain: list[int], env: TrialEnv
) -> None:
    """Continue from the failed trials in ``chain``: state, history and best checkpoints.

    The newest ``last.pt`` in the chain wins: a retry killed before it moved its
    predecessor's state leaves that state where it was.

    With a shared store, a predecessor whose files this node lacks (it ran on another node)
    is fetched from the store first; once this trial holds its own copies there, the
    predecessors' are deleted.
    """
    source = chain[-1]
    mirror = files.mirror
    stored = {n: _stored_files(trial, n, mirror) for n in chain} if mirror else {}
    for number in chain:
        src_dir = env.layout.trial(number)
        earlier = stored.get(number)
        here = (src_dir / MANIFEST).exists() or (src_dir / RESUME_STATE).exists()
        if earlier is not None and not here:
            fetched = earlier.fetch_folder(src_dir)
            env.log(f"fetched trial {number}'s files from the store: {', '.join(fetched)}")
        if src_dir.is_dir():
            files.adopt(TrialFiles(src_dir, training.monitor, training.mode, files.keep_top_k))
        last = src_dir / RESUME_STATE
        if last.exists():
            source = number
            # Moved, not deleted: if this trial dies before its first epoch ends, the next
            # retry still resumes from here.
            os.replace(last, files.folder / RESUME_STATE)
    last = files.folder / RESUME_STATE
    if mirror is not None:
        if last.exists():
            mirror.put(last)
        for earlier in stored.values():
            if earlier is not None:
                earlier.remove_all()
    if last.exists():
        # Onto the CPU: RNG states must stay CPU ByteTensors, and load_state_dict moves the
        # weights and optimizer state to wherever the model is.
        training.load_resume_state(torch.load(last, map_location="cpu", weights_only=True))
    # last.pt is written at most every resume_min_seconds: best files may be newer than it.
    files.forget_after(training.start_epoch - 1)
    # Intermediate values continue without gaps: replay the epochs already trained.
    for rec in training.history:
        trial.report(rec[env.config.study.metric], int(rec["epoch"]))
    trial.set_user_attr(attrs.RESUMED_FROM, {"trial": source, "epoch": training.start_epoch})
    env.log(f"resumed from trial {source} at epoch {training.start_epoch}")


def _stored_files(trial: optuna.Trial, number: int, mirror: TrialMirror) -> TrialMirror | None:
    """Trial ``number``'s files in the store ``mirror`` writes to, if it recorded a key."""
    storage = storage_of(trial.study)
    earlier = storage.get_trial(
        storage.get_trial_id_from_study_id_trial_number(study_id(trial.study), number))
    return TrialMirror.of(mirror.store, earlier)


def train_and_test(
    config: StudyConfig,
    params: TrialParams,
    dataset: Dataset,
    device: torch.device,
    seed: int,
    in_memory: bool = True,
) -> dict[str, float]:
    """Train one configuration without Optuna (best epoch restored) and score the test split.

    Used by the report to confirm a ranking with fresh seeds.
    """
    trainer = Trainer(config, params, dataset, device, seed=seed, in_memory=in_memory)
    best_state = None
    try:
        for epoch in range(config.train.max_epochs):
            record = trainer.run_epoch(epoch)
            value = record[trainer.monitor]
            if trainer.tracker.update(value, epoch):
                best_state = snapshot(trainer.model.state_dict())
            trainer.step_scheduler(value)
            if trainer.tracker.should_stop:
                break
    finally:
        trainer.close()
    if best_state is not None:
        trainer.model.load_state_dict(best_state)
    test = DeviceBatches(dataset, "test", device, in_memory=in_memory,
                         num_workers=config.data.num_workers)
    try:
        scores = trainer.evaluate(test)
    finally:
        test.close()
    return {metrics.named("test", k): v for k, v in scores.items()}
