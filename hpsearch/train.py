"""One trial: train, validate, report, prune, stop early, checkpoint the best epoch, resume.

The loop sees Optuna through three things only: ``trial.report``, ``trial.should_prune`` and
``TrialPruned``. Everything else is the practice of "save the best model on validation
performance": a tracker decides what "better" means (NaN and inf never are), the best epoch is
checkpointed when it improves, ReduceLROnPlateau and early stopping read the same monitored
value, a ``last.pt`` resume state is written every epoch, and the best weights are restored at
the end. The trial's value is the monitored metric of its best epoch, the epoch of its
checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from torch import nn

import hpsearch
from hpsearch.checkpoint import (
    FORMAT_VERSION,
    LAST,
    MANIFEST,
    BackgroundWriter,
    TrialFiles,
    atomic_torch_save,
    is_better,
    load_checkpoint,
    snapshot,
)
from hpsearch.config import StudyConfig
from hpsearch.data import Dataset, DeviceBatches
from hpsearch.models import build_model, count_parameters
from hpsearch.space import TrialParams
from hpsearch.storage import frozen

EVAL_BATCH = 4096


class NonFiniteError(RuntimeError):
    """The loss or the monitored metric became NaN or inf."""


class Interrupted(Exception):
    """The run was asked to stop (Ctrl-C / SIGTERM); the trial's resume state is on disk."""


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

    def update(self, value: float, epoch: int) -> bool:
        if is_better(value, self.best, self.mode, self.min_delta if self.best is not None else 0):
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


# ---------------------------------------------------------------- losses and metrics


def _loss_fn(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return nn.functional.cross_entropy if task == "classification" else nn.functional.mse_loss


@torch.no_grad()
def evaluate(model: nn.Module, batches: DeviceBatches, task: str) -> dict[str, float]:
    """Mean loss and the task's metrics over a whole split (model in eval mode)."""
    was_training = model.training
    model.eval()
    loss_fn = _loss_fn(task)
    totals: dict[str, torch.Tensor] = {}
    n = 0
    for xb, yb in batches.iterate(EVAL_BATCH):
        out = model(xb)
        k = len(yb)
        parts = {"loss": loss_fn(out, yb, reduction="sum")}
        if task == "classification":
            parts["acc"] = (out.argmax(1) == yb).sum()
        else:
            parts["mse"] = ((out - yb) ** 2).mean(dim=tuple(range(1, out.dim()))).sum()
            parts["mae"] = (out - yb).abs().mean(dim=tuple(range(1, out.dim()))).sum()
        for name, v in parts.items():
            totals[name] = totals.get(name, 0) + v.double()
        n += k
    model.train(was_training)
    # One host sync for all metrics.
    values = torch.stack(list(totals.values())).cpu().tolist()
    return {name: v / max(n, 1) for name, v in zip(totals, values)}


# ---------------------------------------------------------------- the trainer


def _build_optimizer(model: nn.Module, train: dict[str, Any]) -> torch.optim.Optimizer:
    name, lr, wd = train["optimizer"], float(train["lr"]), float(train["weight_decay"])
    if name == "sgd":
        momentum = float(train["momentum"])
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd, momentum=momentum)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=lr, weight_decay=wd)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "shuffle": gen.get_state(),
    }


def _set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((state["python_version"], tuple(state["python"]), None))
    gen.set_state(state["shuffle"])


@dataclass
class Trainer:
    """Model, optimizer, scheduler, tracker and history of one training run."""

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
        cfg = self.config
        self.model = build_model(
            self.params.architecture,
            self.params.model,
            self.dataset.input_shape,
            self.dataset.output_size,
            cfg.model.architecture[self.params.architecture].factory,
        )
        if cfg.model.init_from:
            load_initial_weights(self.model, cfg.model.init_from)
        self.model.to(self.device)
        self.optimizer = _build_optimizer(self.model, self.params.train)
        self.monitor, self.mode = cfg.checkpoint.monitor or cfg.study.metric, cfg.checkpoint.mode
        sched = cfg.train.lr_scheduler
        self.scheduler = None
        if sched is not None and sched.name == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer,
                mode=self.mode,
                patience=sched.patience,
                factor=sched.factor,
                min_lr=sched.min_lr,
            )
        es = cfg.train.early_stopping
        self.tracker = Tracker(
            self.mode, es.min_delta if es else 0.0, es.patience if es else None
        )
        self.generator = torch.Generator().manual_seed(self.seed)
        self.train_batches = DeviceBatches(self.dataset, "train", self.device, self.in_memory)
        self.val_batches = DeviceBatches(self.dataset, "val", self.device, self.in_memory)
        self.loss_fn = _loss_fn(self.dataset.task)
        self.batch_size = int(self.params.train["batch_size"])
        self.start_epoch = 0

    def train_epoch(self) -> float:
        model, opt, loss_fn = self.model, self.optimizer, self.loss_fn
        model.train()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        n = 0
        last_check = time.monotonic()
        for xb, yb in self.train_batches.iterate(self.batch_size, self.generator):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(yb)
            n += len(yb)
            # A stop request is honoured within about a second, even in a long epoch.
            if time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                if self.should_stop():
                    raise Interrupted()
        return float(total.item()) / max(n, 1)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch and validate; append and return the epoch's record."""
        t0 = time.perf_counter()
        train_loss = self.train_epoch()
        val = evaluate(self.model, self.val_batches, self.dataset.task)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            **{f"val_{k}": v for k, v in val.items()},
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": round(self.seconds, 4),
        }
        self.history.append(record)
        return record

    def step_scheduler(self, value: float) -> None:
        if self.scheduler is not None and math.isfinite(value):
            self.scheduler.step(value)

    def model_meta(self) -> dict[str, Any]:
        """JSON-safe metadata that rebuilds the model without the study file."""
        return {
            "architecture": self.params.architecture,
            "factory": self.config.model.architecture[self.params.architecture].factory,
            "params": dict(self.params.model),
            "input_shape": list(self.dataset.input_shape),
            "output_size": self.dataset.output_size,
            "task": self.dataset.task,
        }

    def resume_state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict() if self.scheduler else None,
            "tracker": self.tracker.state_dict(),
            "history": list(self.history),
            "seconds": self.seconds,
            "rng": _rng_state(self.generator),
        }

    def load_resume_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model_state_dict"])
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        if self.scheduler is not None and state["scheduler_state_dict"] is not None:
            self.scheduler.load_state_dict(state["scheduler_state_dict"])
        self.tracker.load_state_dict(state["tracker"])
        self.history = list(state["history"])
        self.seconds = float(state["seconds"])
        _set_rng_state(state["rng"], self.generator)
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
    results_dir: Path
    worker: str
    in_memory: bool = True
    should_stop: Callable[[], bool] = lambda: False
    on_epoch: Callable[[int, int, dict[str, float]], None] = lambda trial, epoch, rec: None
    log: Callable[[str], None] = print
    on_checkpoint_kept: Callable[[optuna.Trial, Path], None] | None = None


def trial_dir(results_dir: Path, number: int) -> Path:
    return results_dir / "trials" / str(number)


def checkpoint_name(config: StudyConfig, epoch: int, value: float, trial: int) -> str:
    monitor = config.checkpoint.monitor or config.study.metric
    return config.checkpoint.filename.format(
        epoch=epoch, monitor=monitor, value=value, trial=trial
    )


def resume_chain(trial: optuna.Trial) -> list[int]:
    """The failed trials this one retries, oldest first (Optuna's ``retry_history``).

    Read from the stored FrozenTrial: in Optuna 5 a live Trial exposes no system attrs.
    """
    return [int(n) for n in frozen(trial).system_attrs.get("retry_history", [])]


def run_trial(trial: optuna.Trial, params: TrialParams, env: TrialEnv) -> float:
    """Train one trial end to end and return its best-epoch monitored value.

    Raises:
        optuna.TrialPruned: The pruner stopped it (or a non-finite metric under
            ``on_nonfinite: prune``).
        NonFiniteError: The loss or the monitored metric became NaN or inf.
        Interrupted: The run is stopping; ``last.pt`` holds the state to resume from.
    """
    cfg, number = env.config, trial.number
    folder = trial_dir(env.results_dir, number)
    folder.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        cfg,
        params,
        env.dataset,
        env.device,
        seed=cfg.train.seed + number,
        in_memory=env.in_memory,
        should_stop=env.should_stop,
    )
    metric, monitor, mode = cfg.study.metric, trainer.monitor, trainer.mode
    files = TrialFiles(folder, monitor, mode, cfg.checkpoint.keep_top_k)
    save = cfg.checkpoint.save
    trial.set_user_attr("architecture", params.architecture)
    trial.set_user_attr("n_params", count_parameters(trainer.model))

    chain = resume_chain(trial)
    if chain:
        _resume(trial, trainer, files, chain, env)

    base = {
        "format_version": FORMAT_VERSION,
        "hpsearch_version": hpsearch.__version__,
        "model": trainer.model_meta(),
        "params": params.flat(),
        "monitor": monitor,
        "mode": mode,
        "metric": metric,
        "trial": number,
        "study": cfg.study.name,
        "config": cfg.as_study_dict(),
    }
    writer = BackgroundWriter()
    best_state: dict[str, torch.Tensor] | None = None
    # Short epochs would spend more on last.pt than on training: it is written at most every
    # resume_min_seconds, so a crash retrains at most that much.
    last_resume_write = time.monotonic()
    try:
        for epoch in range(trainer.start_epoch, cfg.train.max_epochs):
            record = trainer.run_epoch(epoch)
            value = record.get(monitor)
            if value is None:
                raise KeyError(
                    f"monitored metric {monitor!r} is not computed; available: "
                    f"{sorted(k for k in record if k not in ('epoch', 'lr', 'seconds'))}"
                )
            env.log(
                f"epoch {epoch}: "
                + " ".join(f"{k}={v:.5g}" for k, v in record.items() if k != "epoch")
            )
            if not (math.isfinite(record["train_loss"]) and math.isfinite(value)):
                reason = (f"non-finite value at epoch {epoch}: "
                          f"train_loss={record['train_loss']}, {monitor}={value}")
                if cfg.train.on_nonfinite == "prune":
                    trial.set_user_attr("prune_reason", reason)
                    raise optuna.TrialPruned(reason)
                raise NonFiniteError(reason)
            trial.report(record[metric], epoch)
            improved = trainer.tracker.update(value, epoch)
            meta = {**base, "epoch": epoch, "value": value, "metrics": record}
            due = _files_due(cfg, epoch, value, number, improved)
            stopping = env.should_stop()
            resume_due = stopping or (
                (epoch + 1) % cfg.checkpoint.resume_every_n_epochs == 0
                and time.monotonic() - last_resume_write >= cfg.checkpoint.resume_min_seconds
            )
            # One CPU copy of the weights per epoch serves every file written for it.
            weights = None
            if improved or due or resume_due:
                weights = snapshot(trainer.model.state_dict())
            if improved:
                best_state = weights
            jobs: list[Callable[[], None]] = []
            for kind, name in due:
                obj = {**meta, "history": list(trainer.history), "model_state_dict": weights}
                jobs.append(partial(files.save, name, obj, kind, epoch, value))
            trainer.step_scheduler(value)
            if resume_due:
                rest = {k: v for k, v in trainer.resume_state(epoch).items()
                        if k != "model_state_dict"}
                state = {**base, **snapshot(rest), "model_state_dict": weights}
                jobs.append(partial(atomic_torch_save, state, folder / LAST))
                last_resume_write = time.monotonic()
            if jobs:
                # Written off the training thread; the next submit waits for this one.
                writer.submit(partial(_run_all, jobs))
            env.on_epoch(number, epoch, record)
            if trial.should_prune():
                writer.flush()
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")
            if trainer.tracker.should_stop:
                env.log(f"early stopping at epoch {epoch}: no improvement in "
                        f"{trainer.tracker.bad_epochs} epochs")
                break
            if stopping:
                writer.flush()
                raise Interrupted()
        writer.flush()
    finally:
        writer.close()
        _record(trial, trainer, files, env)

    if trainer.tracker.best_epoch is None:
        raise NonFiniteError("no epoch produced a finite monitored value")
    # Restore the best weights: the model the trial ends with is the one it is ranked by.
    if save != "last" and best_state is not None:
        trainer.model.load_state_dict(best_state)
    kept = files.best()
    if kept is not None and env.on_checkpoint_kept is not None:
        env.on_checkpoint_kept(trial, folder / kept[0])
    (folder / LAST).unlink(missing_ok=True)
    if save == "last":
        return float(trainer.history[-1][metric])
    return float(trainer.history[trainer.tracker.best_epoch - trainer.history[0]["epoch"]][metric])


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


def _record(trial: optuna.Trial, trainer: Trainer, files: TrialFiles, env: TrialEnv) -> None:
    """User attrs of however the trial ended (pruned trials too: the report may use them)."""
    best_epoch = trainer.tracker.best_epoch
    kept = files.best()
    if kept is not None:
        path = files.folder / kept[0]
        trial.set_user_attr("checkpoint", str(path.relative_to(env.results_dir)))
        trial.set_user_attr("checkpoint_sha256", kept[1].sha256)
    attrs = {
        "best_epoch": best_epoch,
        "best_value": trainer.tracker.best,
        "train_seconds": round(trainer.seconds, 3),
        "history": trainer.history,
        "device": str(env.device),
        "worker": env.worker,
    }
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def _resume(
    trial: optuna.Trial, trainer: Trainer, files: TrialFiles, chain: list[int], env: TrialEnv
) -> None:
    """Continue from the failed trials in ``chain``: state, history and best checkpoints.

    The newest ``last.pt`` in the chain wins: a retry killed before it moved its
    predecessor's state leaves that state where it was.
    """
    source = chain[-1]
    for number in chain:
        src_dir = trial_dir(env.results_dir, number)
        if (src_dir / MANIFEST).exists():
            files.adopt(TrialFiles(src_dir, trainer.monitor, trainer.mode, files.keep_top_k))
        last = src_dir / LAST
        if last.exists():
            source = number
            # Moved, not deleted: if this trial dies before its first epoch ends, the next
            # retry still resumes from here.
            os.replace(last, files.folder / LAST)
    last = files.folder / LAST
    if last.exists():
        trainer.load_resume_state(torch.load(last, map_location=env.device, weights_only=True))
    # last.pt is written at most every resume_min_seconds: best files may be newer than it.
    files.forget_after(trainer.start_epoch - 1)
    # Intermediate values continue without gaps: replay the epochs already trained.
    for rec in trainer.history:
        trial.report(rec[env.config.study.metric], int(rec["epoch"]))
    trial.set_user_attr("resumed_from", {"trial": source, "epoch": trainer.start_epoch})
    env.log(f"resumed from trial {source} at epoch {trainer.start_epoch}")


def train_and_test(
    config: StudyConfig,
    params: TrialParams,
    dataset: Dataset,
    device: torch.device,
    seed: int,
) -> dict[str, float]:
    """Train one configuration without Optuna (best epoch restored) and score the test split.

    Used by the report to confirm a ranking with fresh seeds.
    """
    trainer = Trainer(config, params, dataset, device, seed=seed)
    best_state = None
    for epoch in range(config.train.max_epochs):
        record = trainer.run_epoch(epoch)
        value = record[trainer.monitor]
        if trainer.tracker.update(value, epoch):
            best_state = snapshot(trainer.model.state_dict())
        trainer.step_scheduler(value)
        if trainer.tracker.should_stop:
            break
    if best_state is not None:
        trainer.model.load_state_dict(best_state)
    test = DeviceBatches(dataset, "test", device, in_memory=True)
    return {f"test_{k}": v for k, v in evaluate(trainer.model, test, dataset.task).items()}
