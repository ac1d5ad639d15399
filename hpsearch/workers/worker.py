"""Inside a worker process: claim trials from the study and run them until the budget is used.

A worker loads the study with its own sampler and pruner (``load_study`` restores neither),
beats a heartbeat for its running trial, exits if its parent dies, and records how each trial
ended: COMPLETE (offered as the study best), PRUNED, or FAIL with its reason.

Out of GPU memory is an ordinary failure: the worker frees what the trial held and claims the
next one. Any other CUDA error leaves the process's CUDA context unusable, so after recording
the trial the worker ends and asks its parent for a fresh process on the slot.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import json
import os
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import optuna
import torch
from optuna.trial import TrialState

from hpsearch import data as data_mod
from hpsearch.checkpoint.artifacts import (
    open_artifact_store,
    publish_study_best,
    publish_trial_checkpoint,
    retire_trial_checkpoint,
)
from hpsearch.checkpoint.retention import Retention, discard_resume_state
from hpsearch.checkpoint.study_best import offer_best
from hpsearch.config import StudyConfig
from hpsearch.errors import Interrupted
from hpsearch.files import atomic_write_json
from hpsearch.objective import run_objective_trial
from hpsearch.optuna_private import ArtifactStore, frozen, tell
from hpsearch.pruning import build_study_pruner
from hpsearch.results import ResultsLayout
from hpsearch.sampling import build_study_sampler
from hpsearch.space import sample
from hpsearch.storage.backends import open_storage
from hpsearch.storage.liveness import HOST, record_storage_heartbeat, write_heartbeat
from hpsearch.storage.study_lock import StudyLock, study_lock
from hpsearch.storage.trials import TrialIndex, fail_trial
from hpsearch.train import NonFiniteError, TrialEnv, run_trial
from hpsearch.workers.slots import Slot

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass(frozen=True)
class WorkerSpec:
    config: StudyConfig
    results_dir: str
    storage: str
    slot: Slot
    generation: int
    parent_pid: int
    run_started: float
    deadline: float | None
    prior_trials: int = 0
    """Trials the study had when this run started: part of the sampler seed, so a rerun (or
    another node) never replays an earlier run's sequence, while a fresh study stays
    reproducible from its seed."""
    slots_on_device: int = 1
    """Workers of this run sharing this slot's device (its budget for device-resident data;
    the CUDA cache is emptied between trials when several share a GPU)."""


REPLACE = "replace"
"""The first item of a worker's outcome when it ended to be replaced by a fresh process."""


def cuda_context_broken(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it came from) leaves the CUDA context unusable.

    Every CUDA error but running out of memory is sticky (a device-side assert, an illegal
    memory access, a launch failure): each later CUDA call in the process fails. Torch raises
    them as ``torch.AcceleratorError`` or as a RuntimeError saying ``CUDA error: ...``.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.cuda.OutOfMemoryError):
            return False
        accelerator_error = getattr(torch, "AcceleratorError", None)
        if accelerator_error is not None and isinstance(current, accelerator_error):
            return "out of memory" not in str(current)
        if isinstance(current, RuntimeError) and "CUDA error" in str(current):
            return "CUDA error: out of memory" not in str(current)
        current = current.__cause__ or current.__context__
    return False


def release_memory(device: torch.device) -> None:
    """Free what the last trial left: reference cycles, then the CUDA caching allocator's
    unused blocks (so the other workers on the GPU can have them)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sampler_seed_offset(spec: WorkerSpec) -> int:
    """Distinct per slot, per restart of the slot, and per run of the study."""
    return 1 + 1000 * spec.slot.index + 100_000 * spec.generation + 10_000_019 * spec.prior_trials


class _Heartbeat(threading.Thread):
    """Refreshes the running trial's heartbeats (this node's file and the storage's) and exits
    the process if the parent dies."""

    def __init__(self, spec: WorkerSpec, storage: optuna.storages.BaseStorage) -> None:
        super().__init__(daemon=True, name="hpsearch-heartbeat")
        self.spec, self.storage = spec, storage
        self.trial: optuna.Trial | None = None

    def beat(self) -> None:
        trial = self.trial
        if trial is None:
            return
        write_heartbeat(ResultsLayout(Path(self.spec.results_dir)), trial.number)
        record_storage_heartbeat(self.storage, trial)

    def run(self) -> None:
        last = 0.0
        while True:
            if os.getppid() != self.spec.parent_pid:
                # Orphaned: the trial stays RUNNING and the next run resumes it.
                os._exit(3)
            if time.monotonic() - last >= self.spec.config.study.heartbeat_interval:
                last = time.monotonic()
                try:
                    self.beat()
                except Exception:  # a missed beat only makes the trial look stale sooner
                    pass
            time.sleep(0.25)


class _TrialLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", buffering=1)

    def __call__(self, line: str) -> None:
        self.f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def close(self) -> None:
        self.f.close()


class _StopCheck:
    """Cheap enough to call every second from the training loop."""

    def __init__(self, paths: ResultsLayout, deadline: float | None) -> None:
        self.paths, self.deadline = paths, deadline

    def __call__(self) -> bool:
        return self.paths.stop_file.exists()

    def may_start(self) -> bool:
        past = self.deadline is not None and time.time() >= self.deadline
        return not (past or self() or self.paths.abort_file.exists())


@dataclass
class _Claims:
    """A worker's view of the budget, kept up to date incrementally."""

    index: TrialIndex
    lock: StudyLock
    """The study lock, shared with every node on the storage (``storage/study_lock.py``)."""
    first_failures_checked: bool = False


class _NoTrial(enum.Enum):
    DONE = "done"
    """The budget is used by finished trials, or the run stops, or it is failing."""
    WAIT = "wait"
    """The budget is used, but by running trials: one may be another node's that died, and
    its retry needs a worker."""


CLAIM_POLL_S = 1.0


def _claim(study: optuna.Study, cfg: StudyConfig, paths: ResultsLayout, spec: WorkerSpec,
           stop: _StopCheck, claims: _Claims, heartbeat: _Heartbeat) -> optuna.Trial | None:
    """The next trial to train, or None when the worker is done."""
    while True:
        got = _try_claim(study, cfg, paths, spec, stop, claims, heartbeat)
        if got is _NoTrial.DONE:
            return None
        if got is not _NoTrial.WAIT:
            return got
        time.sleep(CLAIM_POLL_S)


def _try_claim(study: optuna.Study, cfg: StudyConfig, paths: ResultsLayout, spec: WorkerSpec,
               stop: _StopCheck, claims: _Claims, heartbeat: _Heartbeat
               ) -> optuna.Trial | _NoTrial:
    """Ask for the next trial unless the budget is used, the run stops, or it is failing.

    Under the study lock, so that every node's claims together start exactly ``n_trials``:
    count, ask, and beat the new trial's first heartbeat (no other node sees it RUNNING
    without one).
    """
    with claims.lock():
        if not stop.may_start():
            return _NoTrial.DONE
        trials = study.get_trials(deepcopy=False)
        index = claims.index
        index.update(trials)
        # Only unfinished trials can be WAITING, and those all come after index.settled.
        waiting = sum(t.state == TrialState.WAITING for t in trials[index.settled:])
        # A queued trial (a retry, a planned architecture) is counted already; it may start
        # as long as the trials that started leave it room.
        if index.counted(trials) - waiting >= cfg.study.n_trials:
            # A trial of this run (its heartbeat file is in this results folder) needs no
            # waiting worker: if its worker dies, the parent starts a replacement for the
            # retry. Waiting is for another node's trial, and would cost the end of every
            # run up to a poll interval.
            others = any(t.state == TrialState.RUNNING and not paths.heartbeat(t.number).exists()
                         for t in trials[index.settled:])
            return _NoTrial.WAIT if others else _NoTrial.DONE
        if not claims.first_failures_checked:
            settled, abort = _first_failures(cfg, paths, spec, index)
            if abort:
                return _NoTrial.DONE
            claims.first_failures_checked = settled
        with warnings.catch_warnings():
            # Optuna warns that RDB heartbeats are meant for optimize(); ours beat them by hand.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        heartbeat.trial = trial
        with contextlib.suppress(Exception):  # a missed beat is retried at the next interval
            heartbeat.beat()
        return trial


def _first_failures(cfg: StudyConfig, paths: ResultsLayout, spec: WorkerSpec,
                    index: TrialIndex) -> tuple[bool, bool]:
    """(settled, abort): whether the first ``max_initial_failures`` trials of this run have
    finished, and whether they all failed (then the abort file says why)."""
    k = cfg.study.max_initial_failures
    this_run = sorted(
        (t for t in index.finished.values()
         if t.number not in index.retried and t.datetime_start is not None
         and t.datetime_start.timestamp() >= spec.run_started),
        key=lambda t: t.number,
    )[:k]
    if len(this_run) < k:
        return False, False
    if not all(t.state == TrialState.FAIL for t in this_run):
        return True, False
    reasons = {str(t.user_attrs.get("fail_reason", "?"))[:200] for t in this_run}
    atomic_write_json(
        paths.abort_file,
        {"message": f"the first {k} trials of this run all failed; stopping instead of "
         f"burning the budget. Reasons: {sorted(reasons)}"},
    )
    return True, True


def ignore_stop_signals() -> None:
    """First step of a child the parent started under ``stop_signals_held``: ignore Ctrl-C
    and SIGTERM (dropping one that is pending), then unblock them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def worker_process(spec: WorkerSpec, outcome: Connection,
                   dataset: data_mod.Dataset | None = None) -> None:
    """Entry point of a worker process: run, then send the parent how it ended.

    The parent decides what Ctrl-C or a SIGTERM to the process group means; a worker only
    stops at the parent's request (or is killed outright).
    """
    ignore_stop_signals()
    try:
        summary = worker_main(spec, dataset)
        result: tuple[Any, ...] = (
            (REPLACE, summary["broken"], summary) if summary.get("broken") else ("done", summary)
        )
    except BaseException as err:  # reported to the parent, which records it for the slot
        result = ("error", f"{type(err).__name__}: {err}", traceback.format_exc())
    with contextlib.suppress(OSError):
        outcome.send(result)
        outcome.close()


def worker_main(spec: WorkerSpec, dataset: data_mod.Dataset | None = None) -> dict[str, Any]:
    """Body of one long-lived worker process. Returns a small summary; its ``broken`` says
    why the CUDA context is unusable when the worker ended to be replaced.

    ``dataset``: the parent's copy (forked workers share it); otherwise loaded from the cache.
    """
    cfg, paths = spec.config, ResultsLayout(Path(spec.results_dir))
    torch.set_num_threads(spec.slot.threads)
    device = torch.device(spec.slot.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    storage = open_storage(spec.storage, cfg)
    heartbeat = _Heartbeat(spec, storage)
    heartbeat.start()
    study = optuna.load_study(
        study_name=cfg.study.name,
        storage=storage,
        sampler=build_study_sampler(cfg, seed_offset=sampler_seed_offset(spec)),
        pruner=build_study_pruner(cfg),
    )
    if dataset is None:
        dataset = data_mod.load(cfg.data, paths.data_cache)
    in_memory = data_mod.keep_in_memory(dataset, cfg.data.in_memory, device,
                                        spec.slots_on_device)
    # Trials that share a GPU hand back what they cached, or the next one (another worker's)
    # may run out of memory that is only reserved.
    shared_gpu = device.type == "cuda" and (
        spec.slots_on_device > 1 or cfg.resources.trials_per_device > 1
    )
    if in_memory:
        dataset = data_mod.to_device(dataset, device)
    worker_name = f"{HOST}:{os.getpid()}"
    if spec.slot.address:  # a slot on a Dask cluster: name the Dask worker too
        worker_name += f" (dask worker {spec.slot.address})"
    store = open_artifact_store(cfg, paths)
    stop = _StopCheck(paths, spec.deadline)
    status_path = paths.status_file(spec.slot.index)

    def status(**fields: Any) -> None:
        atomic_write_json(
            status_path,
            {"slot": spec.slot.index, "device": spec.slot.device, "pid": os.getpid(),
             "time": time.time(), **fields},
            durable=False,
        )

    claims = _Claims(TrialIndex(), study_lock(study, spec.storage))
    retention = Retention(cfg, store)  # a shared store: deletes there too
    done = 0
    broken: str | None = None
    status(state="idle", trial=None)
    while True:
        trial = _claim(study, cfg, paths, spec, stop, claims, heartbeat)
        if trial is None:
            break
        status(state="training", trial=trial.number, epoch=None, value=None)
        log = _TrialLog(paths.train_log(trial.number))
        env = TrialEnv(
            config=cfg,
            dataset=dataset,
            device=device,
            layout=paths,
            worker=worker_name,
            in_memory=in_memory,
            should_stop=stop,
            on_epoch=lambda n, e, rec: status(
                state="training", trial=n, epoch=e, value=rec.get(cfg.study.metric)
            ),
            log=log,
            on_checkpoint_kept=(
                None if store is None else lambda t, p: publish_trial_checkpoint(store, t, p)
            ),
            store=store,  # a shared store: the trial's files are mirrored there
        )
        try:
            ended = _run_one(study, trial, env, log, retention, store)
        except Interrupted:
            break
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another node found this trial's heartbeat stale (this node went silent beyond
            # grace_period) and failed it; its retry trains it instead.
            log("ABANDONED: another node failed this trial as stale; its retry resumes it")
            ended = _Ended(exhausted=False)
        finally:
            heartbeat.trial = None
            paths.heartbeat(trial.number).unlink(missing_ok=True)
            log.close()
            status(state="idle", trial=None)
        done += 1
        if ended.broken_context is not None:
            broken = ended.broken_context
            break  # every later CUDA call of this process would fail too
        # After _run_one returned, no traceback holds the failed trial's model any more.
        if ended.out_of_memory or shared_gpu:
            release_memory(device)
        if ended.exhausted:
            break  # the sampler has no point left to propose (grid, brute force)
    status(state="done", trial=None)
    return {"slot": spec.slot.index, "trials": done, "pid": os.getpid(), "broken": broken}


class _Ended(NamedTuple):
    """How :func:`_run_one` left the worker."""

    exhausted: bool
    """The sampler's search space is exhausted (a grid fully visited)."""
    out_of_memory: bool = False
    """The trial ran out of device memory: free it before the next one."""
    broken_context: str | None = None
    """The CUDA error that left this process's CUDA context unusable."""


def _run_one(study: optuna.Study, trial: optuna.Trial, env: TrialEnv,
             log: Callable[[str], None], retention: Retention,
             store: ArtifactStore | None = None) -> _Ended:
    """Run one claimed trial and record how it ended; only Interrupted escapes.

    Returns:
        Whether the search space is exhausted, and whether the trial ran out of device
        memory or broke the CUDA context.
    """
    cfg, layout = env.config, env.layout
    oom, broken = False, None
    trial.set_user_attr("worker", env.worker)
    trial.set_user_attr("device", str(env.device))
    log(f"trial {trial.number} on {env.device} by {env.worker}")
    try:
        params = sample(trial, cfg)
        log(f"params {json.dumps(params.flat())}")
        # A study with an objective trains with the user's loop, book-kept the same way.
        value = (run_objective_trial if cfg.objective else run_trial)(trial, params, env)
    except optuna.TrialPruned as err:
        log(f"PRUNED: {err}")
        exhausted = tell(study, trial, state=TrialState.PRUNED)
        discard_resume_state(layout, trial.number)
    except Interrupted:
        log("interrupted: resume state kept; the trial resumes on the next run")
        fail_trial(study, frozen(trial), "interrupted (Ctrl-C / SIGTERM); resumes on rerun",
                   retry=True, count_retry=False, max_retries=cfg.study.max_retries)
        raise
    except Exception as err:
        # Memory is freed by the caller: here the traceback still holds the trial's frames.
        exhausted = False
        reason = f"{type(err).__name__}: {err}"
        if isinstance(err, NonFiniteError):
            reason = str(err)
        oom = isinstance(err, torch.cuda.OutOfMemoryError)
        # Its first line: torch appends advice on CUDA_LAUNCH_BLOCKING to the message.
        broken = (reason.splitlines() or [reason])[0] if cuda_context_broken(err) else None
        log(f"FAIL: {reason}\n{traceback.format_exc()}")
        trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
        fail_trial(study, frozen(trial), reason, retry=False)
        discard_resume_state(layout, trial.number)
        if broken is not None:
            log("the CUDA context is broken: this worker ends and a fresh one replaces it")
    else:
        exhausted = tell(study, trial, value)
        log(f"COMPLETE: value={value}")
        if offer_best(layout, frozen(trial), cfg):
            log("new study best")
            if store is not None:
                publish_study_best(store, study, layout, cfg)  # shared: decided in the storage
    deleted = retention.apply(study, layout, trial.number)
    if store is not None:
        for number in deleted:
            retire_trial_checkpoint(store, study, retention.index.finished[number])
    return _Ended(exhausted, oom, broken)
