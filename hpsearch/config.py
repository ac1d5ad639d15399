"""Typed study configuration: the study file, validated, with errors that name the YAML key.

The schema *is* the documentation: every field has a default (where one makes sense) and a
docstring. ``load_config(path)`` is the only entry point; it raises :class:`ConfigError`, whose
message names the file, the key path and the problem.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from hpsearch import datasets, losses, metrics, models, samplers
from hpsearch.errors import ConfigError
from hpsearch.user_code import check_reference

SAMPLERS = tuple(samplers.SAMPLERS)
PRUNERS = tuple(samplers.PRUNERS)
DATASETS = datasets.DATASETS
ARCHITECTURES = tuple(models.ARCHITECTURES)
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("plateau", "cosine", "onecycle", "step", "none")
PRECISIONS = ("32", "bf16", "16")
LOSS_PARAM_PREFIX = "loss."
"""Searchable ``train.loss`` arguments are the Optuna parameters ``loss.<argument>``."""
# Train keys that may hold a search distribution instead of a literal.
SEARCHABLE_TRAIN_KEYS = ("lr", "weight_decay", "batch_size", "optimizer", "momentum")
OBJECTIVE_IGNORES = ("lr_scheduler", "metrics", "loss", "precision", "grad_clip_norm",
                     "accumulate_grad_batches", "compile", "step")
"""``train`` keys of the built-in loop, which a study with an ``objective`` may not set."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ---------------------------------------------------------------- search distributions


class FloatDist(_Strict):
    """A float search range: ``{type: float, low, high, log: false, step: null}``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _check(self) -> FloatDist:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is greater than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("step cannot be used with log: true")
        if self.step is not None and self.step <= 0:
            raise ValueError("step must be > 0")
        return self


class IntDist(_Strict):
    """An integer search range: ``{type: int, low, high, log: false, step: 1}``."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1

    @model_validator(mode="after")
    def _check(self) -> IntDist:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is greater than high ({self.high})")
        if self.log and self.low < 1:
            raise ValueError(f"log scale needs low >= 1 (got {self.low})")
        if self.step < 1:
            raise ValueError("step must be >= 1")
        if self.log and self.step != 1:
            raise ValueError("step cannot be used with log: true")
        return self


Scalar = bool | int | float | str | None


class CategoricalDist(_Strict):
    """A choice among literals: ``{type: categorical, choices: [...]}``."""

    type: Literal["categorical"]
    choices: list[Scalar]

    @field_validator("choices")
    @classmethod
    def _non_empty(cls, v: list[Scalar]) -> list[Scalar]:
        if not v:
            raise ValueError("choices must not be empty")
        if len(set(map(repr, v))) != len(v):
            raise ValueError("choices must be distinct")
        return v


Distribution = Annotated[FloatDist | IntDist | CategoricalDist, Field(discriminator="type")]


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and "type" in value


# ---------------------------------------------------------------- sections


class SamplerConfig(BaseModel):
    """``study.sampler``: an Optuna sampler by name; every other key is passed to it."""

    model_config = ConfigDict(extra="allow")
    name: Literal[SAMPLERS] = "tpe"  # type: ignore[valid-type]
    seed: int | None = None


class PrunerConfig(BaseModel):
    """``study.pruner``: an Optuna pruner by name; every other key is passed to it."""

    model_config = ConfigDict(extra="allow")
    name: Literal[PRUNERS] = "median"  # type: ignore[valid-type]
    wrapped: PrunerConfig | None = None
    """For ``patient``: the pruner it wraps."""


class StudySection(_Strict):
    name: str
    """Study name; outputs go to ``<results-dir>/<name>/``."""
    metric: str = "val_loss"
    """Monitored metric: ``val_<name>`` of a metric in ``train.metrics`` (or ``train_loss``)."""
    direction: Literal["minimize", "maximize"] | None = None
    """Default: from the metric where it is obvious (loss, mse, mae: minimize; acc, f1, auroc,
    precision, recall, r2: maximize); a user metric needs it given."""
    n_trials: int = Field(20, ge=1)
    """Total for the study: rerunning continues to this total."""
    timeout: float | None = Field(None, gt=0)
    """Stop starting new trials after this many seconds of this run."""
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    storage: str | None = None
    """Optuna storage URL; default ``<results-dir>/<name>/journal.log``."""
    enqueue: list[dict[str, Scalar]] = []
    """Parameter sets evaluated first (once per study)."""
    min_trials_per_architecture: int = Field(4, ge=0)
    """Trials each architecture gets before the sampler allocates freely (taken round-robin
    by the first trials)."""
    min_trials_to_prune: int = Field(2, ge=1)
    """Finished trials (complete or pruned) of its own an architecture needs before its
    trials can be pruned (with ``prune_within_architecture``)."""
    prune_within_architecture: bool = True
    """Prune a trial only by comparison with trials of its own architecture."""
    sample_within_architecture: bool = True
    """TPE: sample the architecture over the whole study, then the trial's other parameters
    from trials of its own architecture only."""
    max_retries: int = Field(2, ge=0)
    """How often a trial whose worker died is resumed before it is left FAIL."""
    max_initial_failures: int = Field(5, ge=1)
    """Stop the study if this many first finished trials all failed."""
    heartbeat_interval: float = Field(2.0, gt=0)
    """Seconds between a running trial's heartbeats."""
    grace_period: float = Field(20.0, gt=0)
    """A RUNNING trial whose heartbeat is older than this is stale (its worker is gone)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or v in (".", "..") or v.strip() != v:
            raise ValueError("must be a non-empty name without '/' or surrounding spaces")
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not v.startswith(metrics.SPLIT_PREFIXES):
            raise ValueError(f"{v!r} is not a metric: use val_loss, val_acc or another val_* name")
        return v


class DataSection(_Strict):
    name: str = "mnist1d"
    """Built-in dataset (mnist1d, digits, synthetic_regression) or "package.module:function"."""
    args: dict[str, Any] = {}
    """Passed to the dataset generator / factory."""
    val_fraction: float = Field(0.2, gt=0, lt=1)
    """Validation part of the training split."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Held-out test part, for datasets that have no test split of their own."""
    split_seed: int = 0
    """Seed of the train/validation(/test) split."""
    in_memory: bool | Literal["auto"] = "auto"
    """Keep the dataset on the worker's device and batch by slicing (auto: when it fits)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per split when the data streams (not in memory)."""

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if ":" in v:
            check_reference(v)
        elif v not in DATASETS:
            raise ValueError(_unknown(v, DATASETS, "dataset"))
        return v


class SchedulerConfig(_Strict):
    """``{name: plateau}``: ReduceLROnPlateau on the monitored metric, once per epoch."""

    name: Literal["plateau"] = "plateau"
    patience: int = Field(5, ge=0)
    factor: float = Field(0.5, gt=0, lt=1)
    min_lr: float = Field(0.0, ge=0)


class CosineSchedulerConfig(_Strict):
    """``{name: cosine}``: linear warmup from 0 over ``warmup_epochs``, then cosine decay to
    ``min_lr`` at ``train.max_epochs``; stepped after every optimizer step."""

    name: Literal["cosine"]
    warmup_epochs: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)


class OneCycleSchedulerConfig(_Strict):
    """``{name: onecycle}``: torch's OneCycleLR over ``train.max_epochs``, stepped after every
    optimizer step; it peaks at ``max_lr`` (default: the trial's ``train.lr``)."""

    name: Literal["onecycle"]
    max_lr: float | None = Field(None, gt=0)
    pct_start: float = Field(0.3, gt=0, lt=1)
    div_factor: float = Field(25.0, gt=0)
    final_div_factor: float = Field(1e4, gt=0)


class StepSchedulerConfig(_Strict):
    """``{name: step}``: the learning rate times ``gamma`` every ``step_size`` epochs."""

    name: Literal["step"]
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)


Scheduler = Annotated[
    SchedulerConfig | CosineSchedulerConfig | OneCycleSchedulerConfig | StepSchedulerConfig,
    Field(discriminator="name"),
]


class LossConfig(_Strict):
    """``train.loss``: a built-in loss or ``"package.module:function"``, and its arguments
    (literals or search distributions; the class weights as lists)."""

    name: str
    arguments: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict):
            raise ValueError("must be a loss name or {name: ..., <argument>: ...}")
        data = dict(data)
        name = data.pop("name", None)
        if not isinstance(name, str):
            raise _KeyError("name", "required: a built-in loss or \"package.module:function\"")
        if "arguments" in data and isinstance(data["arguments"], dict) and len(data) == 1:
            data = dict(data["arguments"])  # the shape model_dump writes
        if losses.is_user_loss(name):
            try:
                check_reference(name)
            except ValueError as err:
                raise _KeyError("name", str(err)) from None
        elif name not in losses.LOSSES:
            raise _KeyError("name", _unknown(name, tuple(losses.LOSSES), "loss")
                            + ' (or "package.module:function")')
        parsed = {}
        for key, value in data.items():
            if not isinstance(key, str):
                raise _KeyError(str(key), "argument names must be strings")
            if not losses.is_user_loss(name) and key not in losses.LOSSES[name].arguments:
                valid = losses.LOSSES[name].arguments
                raise _KeyError(key, _unknown(key, valid, f"argument of {name}")
                                if valid else f"unknown key: {name} takes no arguments")
            if isinstance(value, list) and not _is_distribution(value):
                parsed[key] = value
            else:
                parsed[key] = _parse_value(value, key)
            for literal in _literals(parsed[key]):
                try:
                    losses.check_argument(name, key, literal)
                except ValueError as err:
                    raise _KeyError(key, str(err)) from None
        return {"name": name, "arguments": parsed}

    @model_serializer(mode="plain")
    def _study_shape(self) -> dict[str, Any]:
        return {"name": self.name, **{
            k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
            for k, v in self.arguments.items()}}

    def searched(self) -> dict[str, Any]:
        """The arguments that are search distributions."""
        return {k: v for k, v in self.arguments.items()
                if isinstance(v, (FloatDist, IntDist, CategoricalDist))}


class LoggingSection(_Strict):
    tensorboard: bool = False
    """Write each trial's per-epoch scalars under ``trials/<n>/tensorboard/``."""


class EarlyStoppingConfig(_Strict):
    patience: int = Field(10, ge=1)
    """Epochs without improvement before the trial stops."""
    min_delta: float = Field(0.0, ge=0)
    """An improvement smaller than this does not count."""


class TrainSection(_Strict):
    max_epochs: int = Field(20, ge=1)
    optimizer: Any = "adam"
    """adam, adamw or sgd (may be searched)."""
    lr: Any = 1e-3
    weight_decay: Any = 0.0
    momentum: Any = 0.9
    """SGD momentum."""
    batch_size: Any = 128
    lr_scheduler: Scheduler | None = SchedulerConfig()
    """plateau (default), cosine, onecycle, step, none (or null)."""
    early_stopping: EarlyStoppingConfig | None = EarlyStoppingConfig()
    metrics: list[str] | None = None
    """Metrics computed on every split: built-in names or "package.module:function";
    default: the task's (classification: acc; regression: mse, mae). The loss always is."""
    loss: LossConfig | None = None
    """Default: cross_entropy (classification), mse (regression)."""
    precision: Literal["32", "bf16", "16"] = "32"
    """Training precision: 32, bf16 (autocast; CPU too) or 16 (autocast + GradScaler; CUDA)."""
    grad_clip_norm: float | None = Field(None, gt=0)
    """Clip the gradients' total norm to this (null: no clipping)."""
    accumulate_grad_batches: int = Field(1, ge=1)
    """Optimizer step every this many batches (and at the end of every epoch)."""
    compile: bool = False
    """Train and evaluate through ``torch.compile(model)``."""
    step: str | None = None
    """"package.module:function" called as step(model, batch) for every training and
    validation batch, of any structure; returns the mean loss (a 0-dim tensor) or a dict with
    outputs, targets and optionally loss (see hpsearch.step). Default: the built-in
    ``train.loss(model(inputs), targets)`` on (inputs, targets) batches."""
    seed: int = 0
    """Base seed; each trial trains with seed + trial number."""
    on_nonfinite: Literal["fail", "prune"] = "fail"
    """A NaN/inf loss or metric ends the trial as FAIL (or PRUNED)."""

    @model_validator(mode="before")
    @classmethod
    def _searchables(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)  # never change the caller's mapping
        for key in SEARCHABLE_TRAIN_KEYS:
            if key in data:
                data[key] = _parse_value(data[key], key)
        sched = data.get("lr_scheduler")
        if isinstance(sched, dict):
            name = sched.get("name", "plateau")
            if name not in SCHEDULERS:
                raise _KeyError("lr_scheduler.name", _unknown(str(name), SCHEDULERS, "scheduler"))
            data["lr_scheduler"] = None if name == "none" else {**sched, "name": name}
        if isinstance(data.get("precision"), int) and not isinstance(data["precision"], bool):
            data["precision"] = str(data["precision"])
        return data

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must name at least one metric (or leave it out for the task's)")
        seen: dict[str, str] = {}
        for i, entry in enumerate(v):
            try:
                name = metrics.check_entry(entry, None)
                if metrics.is_user_metric(entry):
                    check_reference(entry)
            except ValueError as err:
                raise _KeyError(str(i), str(err)) from None
            if name in seen:
                raise _KeyError(str(i), f"{entry!r} computes {name!r}, as {seen[name]!r} does")
            seen[name] = entry
        return v

    @field_validator("step")
    @classmethod
    def _step(cls, v: str | None) -> str | None:
        if v is not None:
            check_reference(v)
        return v

    @model_validator(mode="after")
    def _check_literals(self) -> TrainSection:
        checks = {
            "lr": lambda v: isinstance(v, (int, float)) and v > 0,
            "weight_decay": lambda v: isinstance(v, (int, float)) and v >= 0,
            "momentum": lambda v: isinstance(v, (int, float)) and 0 <= v < 1,
            "batch_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
            "optimizer": lambda v: v in OPTIMIZERS,
        }
        for key, ok in checks.items():
            value = getattr(self, key)
            values = value.choices if isinstance(value, CategoricalDist) else [value]
            if isinstance(value, (FloatDist, IntDist)):
                values = [value.low, value.high]
                if key == "batch_size" and not isinstance(value, IntDist):
                    raise _KeyError(key, "a searched batch_size must be type: int")
                if key == "optimizer":
                    raise _KeyError(key, "a searched optimizer must be type: categorical")
            for v in values:
                if not ok(v):
                    hint = f" (valid: {', '.join(OPTIMIZERS)})" if key == "optimizer" else ""
                    raise _KeyError(key, f"invalid value {v!r}{hint}")
        return self


class CheckpointSection(_Strict):
    monitor: str | None = None
    """Metric to monitor; default: study.metric."""
    mode: Literal["min", "max"] | None = None
    """default: from study.direction."""
    save: Literal["best", "best_and_every_n", "last", "none"] = "best"
    every_n_epochs: int = Field(5, ge=1)
    """With save: best_and_every_n, also keep every n-th epoch."""
    keep_top_k: int = Field(1, ge=1)
    """Best-epoch checkpoints kept per trial."""
    keep_top_k_trials: int = Field(5, ge=1)
    """Trials whose checkpoints are kept (plus each architecture's best)."""
    filename: str = "epoch{epoch:03d}-{monitor}{value:.4f}.pt"
    resume_every_n_epochs: int = Field(1, ge=1)
    """How often the resume state (last.pt) is written."""
    resume_min_seconds: float = Field(10.0, ge=0)
    """...and at most once per this many seconds of the trial (0: at every due epoch). A crash
    retrains at most this much; a stop request always writes it."""

    @field_validator("filename")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            name = v.format(epoch=1, monitor="val_loss", value=0.5, trial=3)
        except Exception as err:  # any str.format failure is a bad template
            raise ValueError(
                f"bad template ({err}); use {{epoch}}, {{monitor}}, {{value}}, {{trial}}"
            ) from None
        if "/" in name or not name.endswith(".pt") or name == "last.pt":
            raise ValueError("must give a plain file name ending in .pt (not last.pt)")
        return v


SCHEDULER_SCHEMES = ("tcp", "tls", "ucx", "ws", "wss")
"""Address schemes of a Dask scheduler (``resources.scheduler``)."""


class ResourcesSection(_Strict):
    devices: Literal["auto", "cpu"] | list[str] = "auto"
    """auto: every visible CUDA GPU, else the CPU; or a list like [cuda:0, cuda:1]."""
    trials_per_device: int = Field(1, ge=1)
    workers: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    """auto: one per device slot on GPU; one per core on CPU."""
    torch_threads: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    """auto: the cores split evenly between the workers."""
    start_method: Literal["auto", "fork", "spawn"] = "auto"
    """How worker processes start. fork: in milliseconds, sharing the parent's imports and
    data; only for CPU workers of one torch thread (OpenMP and CUDA are not fork-safe).
    spawn: a fresh interpreter each. auto: fork where allowed, else spawn."""
    scheduler: str | None = None
    """A Dask scheduler's address (tcp://host:8786): the workers run on the cluster's Dask
    workers, one per device slot of each. None: on this machine."""

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: Any) -> Any:
        # Checked here, so a typo stops before any work instead of after a connect timeout.
        if v is None:
            return v
        scheme, sep, rest = str(v).partition("://")
        host, colon, port = rest.rpartition(":")
        if not (sep and scheme in SCHEDULER_SCHEMES and host and colon and port.isdigit()
                and 0 < int(port) < 65536):
            raise ValueError(f"{v!r} is not a Dask scheduler address: use "
                             f"{'|'.join(SCHEDULER_SCHEMES)}://host:port, e.g. "
                             "tcp://127.0.0.1:8786")
        return v

    @model_validator(mode="after")
    def _cluster_devices(self) -> ResourcesSection:
        if self.scheduler is not None and isinstance(self.devices, list):
            raise ValueError("devices: with a scheduler, use auto or cpu (each Dask worker's "
                             "GPUs come from its own resources, not from a list here)")
        return self

    @field_validator("workers", "torch_threads", mode="before")
    @classmethod
    def _count(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"{v!r} is not allowed: use a whole number ≥ 1, or auto")

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("must list at least one device")
            for d in v:
                if not (d == "cpu" or (d.startswith("cuda:") and d[5:].isdigit())):
                    raise ValueError(f"{d!r} is not a device: use cpu or cuda:N")
        return v


class ReportSection(_Strict):
    enabled: bool = True
    """Write the report when the run ends."""
    seeds: int = Field(3, ge=0)
    """Retrain each architecture's best configuration with this many fresh seeds."""
    top_n: int = Field(5, ge=1)
    """Top trials per architecture summarised by median and spread."""


class ArtifactsSection(_Strict):
    store: Literal["filesystem", "boto3", "none"] = "filesystem"
    """Where checkpoints are published as Optuna artifacts."""
    path: str | None = None
    """filesystem: folder of the store (default <results>/<name>/artifacts)."""
    bucket: str | None = None
    """boto3: bucket name."""
    endpoint_url: str | None = None
    """boto3: S3-compatible endpoint."""
    shared: bool | None = None
    """Every node reaches the store: each trial's files (kept checkpoints, manifest, resume
    state) are mirrored there as they are written, so a trial resumes on another node, and
    the study best is recorded in the storage. Default: yes for boto3 and for a filesystem
    store with its own ``path``; no for the default store inside the results folder."""

    @model_validator(mode="after")
    def _bucket(self) -> ArtifactsSection:
        if self.store == "boto3" and not self.bucket:
            raise ValueError("bucket: required when store is boto3")
        if self.shared and self.store == "none":
            raise ValueError("shared: needs a store (filesystem or boto3), not none")
        return self

    @property
    def shares_trials(self) -> bool:
        """Whether trials' files are mirrored to the store (``shared``, or its default)."""
        if self.shared is not None:
            return self.shared
        return self.store == "boto3" or (self.store == "filesystem" and self.path is not None)


class ArchitectureSpec(BaseModel):
    """One entry of ``model.architecture``: its (conditional) parameter space."""

    params: dict[str, Any]
    factory: str | None = None


class ModelSection(_Strict):
    architecture: dict[str, ArchitectureSpec]
    """Architecture name -> its own parameter sub-space; `factory:` for a user model."""
    init_from: str | None = None
    """A checkpoint file or results folder whose weights initialise every trial."""

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        archs = data.get("architecture")
        if isinstance(archs, list) and all(isinstance(a, str) for a in archs):
            archs = {a: {} for a in archs}
        if not isinstance(archs, dict):
            return data
        parsed = {}
        for name, body in archs.items():
            body = {} if body is None else body
            if not isinstance(body, dict):
                raise _KeyError(f"architecture.{name}", "must be a mapping of parameters")
            body = dict(body)
            factory = body.pop("factory", None)
            if factory is None and name not in ARCHITECTURES:
                raise _KeyError(
                    f"architecture.{name}",
                    _unknown(str(name), ARCHITECTURES, "architecture")
                    + ' (or give `factory: "package.module:function"`)',
                )
            if factory is not None:
                if not isinstance(factory, str):
                    raise _KeyError(f"architecture.{name}.factory", "must be a string")
                try:
                    check_reference(factory)
                except ValueError as err:
                    raise _KeyError(f"architecture.{name}.factory", str(err)) from None
            params = {}
            for key, value in body.items():
                if key == "architecture":
                    raise _KeyError(f"architecture.{name}.{key}", "is a reserved name")
                if key in SEARCHABLE_TRAIN_KEYS:
                    raise _KeyError(
                        f"architecture.{name}.{key}",
                        "clashes with the train key of that name; rename it",
                    )
                try:
                    params[key] = _parse_value(value, key)
                except _KeyError as err:
                    raise _KeyError(f"architecture.{name}.{err.key}", err.problem) from None
            parsed[name] = {"params": params, "factory": factory}
        return {**data, "architecture": parsed}

    @field_validator("architecture")
    @classmethod
    def _non_empty(cls, v: dict[str, ArchitectureSpec]) -> dict[str, ArchitectureSpec]:
        if not v:
            raise ValueError("must name at least one architecture")
        return v


class StudyConfig(_Strict):
    """A whole study file."""

    study: StudySection
    data: DataSection = DataSection()
    model: ModelSection
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    resources: ResourcesSection = ResourcesSection()
    report: ReportSection = ReportSection()
    artifacts: ArtifactsSection = ArtifactsSection()
    logging: LoggingSection = LoggingSection()
    callbacks: list[str] = []
    """``"package.module:function"``: each called as fn(event) after every epoch and when a
    trial ends (see hpsearch.callbacks.TrialEvent)."""

    @field_validator("callbacks")
    @classmethod
    def _callbacks(cls, v: list[str]) -> list[str]:
        for i, ref in enumerate(v):
            try:
                check_reference(ref)
            except ValueError as err:
                raise _KeyError(str(i), str(err)) from None
        return v

    objective: str | None = None
    """``"package.module:function"``: the user's own training loop, called as fn(ctx) for each
    trial instead of the built-in one (see hpsearch.objective); null: the built-in loop."""

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str | None) -> str | None:
        if v is not None:
            check_reference(v)
        return v

    @model_validator(mode="after")
    def _objective_owns_training(self) -> StudyConfig:
        # Keys of the built-in loop: set next to an objective, they would silently do nothing.
        # Compared with the defaults, not the keys given: a saved copy of the study has all.
        if self.objective is not None:
            fields = TrainSection.model_fields
            for key in OBJECTIVE_IGNORES:
                if key in fields and getattr(self.train, key) != fields[key].get_default(
                        call_default_factory=True):
                    raise _KeyError(f"train.{key}", "has no effect with `objective:` (the "
                                    "objective trains the model its own way); remove it")
        return self

    @model_validator(mode="after")
    def _defaults_and_enqueue(self) -> StudyConfig:
        task = datasets.TASKS.get(self.data.name)
        if task is not None:
            problem = task_problem(self, task)
            if problem is not None:
                raise _KeyError(problem[0], problem[1] + f" ({self.data.name} is {task})")
        if self.study.direction is None:
            direction = metrics.direction_of(self.study.metric)
            if direction is None:
                raise _KeyError("study.direction", f"required for the user metric "
                                f"{self.study.metric!r}: minimize or maximize")
            self.study.direction = direction
        if self.model.init_from is not None:
            src = Path(self.model.init_from)
            if not (src.is_file() or (src / "best" / "model.pt").exists()):
                raise _KeyError("model.init_from", f"{src} is neither a checkpoint file nor a "
                                "results folder with best/model.pt")
        if self.checkpoint.monitor is None:
            self.checkpoint.monitor = self.study.metric
        if self.checkpoint.mode is None:
            direction = (self.study.direction if self.checkpoint.monitor == self.study.metric
                         else metrics.direction_of(self.checkpoint.monitor))
            if direction is None:
                raise _KeyError("checkpoint.mode", f"required for the user metric "
                                f"{self.checkpoint.monitor!r}: min or max")
            self.checkpoint.mode = "max" if direction == "maximize" else "min"
        for i, params in enumerate(self.study.enqueue):
            arch = params.get("architecture")
            if arch is None and len(self.model.architecture) == 1:
                arch = next(iter(self.model.architecture))
            if arch not in self.model.architecture:
                raise _KeyError(
                    f"study.enqueue.{i}.architecture",
                    _unknown(str(arch), tuple(self.model.architecture), "architecture"),
                )
            allowed = set(self.model.architecture[arch].params) | set(SEARCHABLE_TRAIN_KEYS)
            allowed |= set(loss_param_names(self))
            allowed.add("architecture")
            for key in params:
                if key not in allowed:
                    raise _KeyError(
                        f"study.enqueue.{i}.{key}",
                        _unknown(key, tuple(sorted(allowed)), f"parameter of {arch}"),
                    )
        return self

    @property
    def minimize(self) -> bool:
        return self.study.direction == "minimize"

    @property
    def monitor(self) -> str:
        """The metric checkpoints and early stopping follow (``checkpoint.monitor``, by
        default the study metric)."""
        return self.checkpoint.monitor or self.study.metric

    def as_study_dict(self) -> dict[str, Any]:
        """JSON-safe, in the study file's own shape: ``parse_config`` reads it back."""
        raw = self.model_dump(mode="json")
        for name, spec in self.model.architecture.items():
            body = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
                    for k, v in spec.params.items()}
            if spec.factory:
                body["factory"] = spec.factory
            raw["model"]["architecture"][name] = body
        return raw


def loss_param_names(config: StudyConfig) -> dict[str, str]:
    """Optuna name (``loss.label_smoothing``) -> ``train.loss`` argument, of each searched
    loss argument."""
    loss = config.train.loss
    return {} if loss is None else {LOSS_PARAM_PREFIX + k: k for k in loss.searched()}


def task_problem(config: StudyConfig, task: str) -> tuple[str, str] | None:
    """(key, problem) of the first setting the task cannot use, or None.

    Checked when the study is read for a built-in dataset, and at the start of a run for the
    user's data (whose task is known only then).
    """
    if config.objective is not None:
        return None  # the objective computes and names its own metrics
    for i, entry in enumerate(config.train.metrics or ()):
        try:
            metrics.check_entry(entry, task)
        except ValueError as err:
            return f"train.metrics.{i}", str(err)
    loss = config.train.loss
    if loss is not None and not losses.is_user_loss(loss.name) \
            and task not in losses.LOSSES[loss.name].tasks:
        return "train.loss.name", f"{loss.name!r} is not a {task} loss"
    available = metrics.monitorable(task, config.train.metrics)
    for key, name in (("study.metric", config.study.metric),
                      ("checkpoint.monitor", config.checkpoint.monitor)):
        if name is not None and name not in available:
            return key, f"{name!r} is not computed; available: {', '.join(available)}"
    return None


# ---------------------------------------------------------------- helpers


def _literals(value: Any) -> list[Any]:
    """The values a literal or a distribution can take that can be checked up front."""
    if isinstance(value, (FloatDist, IntDist)):
        return [value.low, value.high]
    if isinstance(value, CategoricalDist):
        return list(value.choices)
    return [value]


class _KeyError(ValueError):
    """Raised inside validators to name a key path below the validated field."""

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


def _parse_value(value: Any, key: str) -> Any:
    if _is_distribution(value):
        kind = value.get("type")
        models = {"float": FloatDist, "int": IntDist, "categorical": CategoricalDist}
        model = models.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise _KeyError(
                f"{key}.type", _unknown(str(kind), ("float", "int", "categorical"), "type")
            )
        try:
            return model.model_validate(value)
        except ValidationError as err:
            sub, problem = _first_error(err, value)
            raise _KeyError(f"{key}.{sub}" if sub else key, problem) from None
    if isinstance(value, dict):
        raise _KeyError(key, "a search distribution needs `type: float|int|categorical`")
    if isinstance(value, list):
        raise _KeyError(key, "use {type: categorical, choices: [...]} to search over a list")
    return value


def _unknown(value: str, valid: tuple[str, ...], what: str) -> str:
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {value!r}{hint} (valid: {', '.join(valid)})"


def _first_error(err: ValidationError, raw: Any = None) -> tuple[str, str]:
    """The first error as (key path as the user wrote it, problem)."""
    e = err.errors()[0]
    loc = list(e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    ctx_err = (e.get("ctx") or {}).get("error")
    # A validator's own key path is kept whole, also where the input lacks it (a default).
    below: list[str] = []
    if isinstance(ctx_err, _KeyError):
        below, msg = ctx_err.key.split("."), ctx_err.problem
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    if raw is None:
        parts = [str(p) for p in loc if str(p) not in ("float", "int", "categorical")]
        return ".".join(parts + below), msg
    parts, odd = _user_path(raw, loc, missing=e["type"] == "missing")
    parts += below
    if e["type"] == "invalid_key" and odd is None:
        # Pydantic locates a non-string key by position; find it in the mapping itself.
        node: Any = raw
        for part in parts:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, dict):
            odd = next(((k,) for k in node if not isinstance(k, str)), None)
    if odd is not None:
        parts = parts or [str(odd[0])]
        msg = (f"has a key {odd[0]!r} that is not a string; quote it (YAML reads yes/no/on/off "
               "and numbers as booleans and numbers)")
    return ".".join(parts), msg


def _user_path(
    raw: Any, loc: list[Any], missing: bool = False
) -> tuple[list[str], tuple[Any] | None]:
    """Keep the parts of a pydantic location that are keys or indices of the user's input.

    Pydantic adds union tags and validator names (``literal['auto','cpu']``, ``bool``) to
    locations; walking the input drops them. A key the input lacks is kept only at the end
    (a missing key). Returns the path, and ``(key,)`` for a non-string key met on the way.
    """
    out: list[str] = []
    node = raw
    for i, part in enumerate(loc):
        if isinstance(node, dict) and _has_key(node, part):
            key = next(k for k in node if k == part or str(k) == str(part))
            if not isinstance(key, str):
                return out, (key,)
            out.append(str(part))
            node = node[key]
        elif isinstance(node, list) and str(part).isdigit() and int(part) < len(node):
            out.append(str(part))
            node = node[int(part)]
        elif missing and i == len(loc) - 1 and isinstance(node, dict):
            out.append(str(part))
    return out, None


def _has_key(node: dict[Any, Any], part: Any) -> bool:
    try:
        if part in node:
            return True
    except TypeError:
        return False
    return any(str(k) == str(part) for k in node)


def _suggest_key(model: type[BaseModel], loc: list[str]) -> str:
    """For an unknown key, find the nearest valid sibling name."""
    cls: Any = model
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return ""
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        cls = models[0] if models else None
        if cls is None:
            return ""
    if not hasattr(cls, "model_fields"):
        return ""
    valid = tuple(cls.model_fields)
    close = difflib.get_close_matches(loc[-1], valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (valid: {', '.join(valid)})"


def parse_config(raw: Any, source: str = "") -> StudyConfig:
    """Validate an already-parsed study mapping. Raises ConfigError."""
    if raw is None:
        raise ConfigError(source, "", "the study file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(source, "", f"must be a mapping of sections, not {type(raw).__name__}")
    try:
        return StudyConfig.model_validate(raw)
    except _KeyError as err:
        raise ConfigError(source, f"model.{err.key}", err.problem) from None
    except ValidationError as err:
        key, problem = _first_error(err, raw)
        e = err.errors()[0]
        if e["type"] == "extra_forbidden":
            problem = "unknown key" + _suggest_key(StudyConfig, key.split("."))
        elif e["type"] == "missing":
            problem = "required key is missing"
        elif e["type"] == "literal_error":
            got = e.get("input")
            expected = (e.get("ctx") or {}).get("expected", "")
            names = str(expected).replace(" or ", ",").split(",")
            valid = tuple(x.strip().strip("'") for x in names)
            problem = _unknown(str(got), tuple(v for v in valid if v), "value")
        return _raise(source, key, problem)
    except RecursionError:
        raise ConfigError(source, "", "the study is nested too deeply") from None


def _raise(source: str, key: str, problem: str) -> StudyConfig:
    raise ConfigError(source, key, problem)


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a study file.

    Args:
        path: A YAML study file.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: The file is missing, unreadable, not YAML, or not a valid study.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(source, "", f"cannot read the file: {err}") from None
    try:
        raw = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(source, "", "the YAML is nested too deeply") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(source, "", f"YAML syntax error{where}: {problem}") from None
    return parse_config(raw, source)
