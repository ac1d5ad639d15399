"""Device slots, long-lived worker processes, and the parent that supervises them.

One long-lived worker process per device slot, each pinned explicitly to its device (a
process-wide CUDA_VISIBLE_DEVICES would leak into everything the process runs). CPU workers of
one torch thread are forked from the parent: they start in milliseconds and share its imports
and its in-memory dataset. Others (GPU slots, several threads) start as fresh interpreters
through loky, because CUDA and OpenMP state do not survive a fork. A worker loads the study
with its own sampler and pruner and claims trials until the study's budget is used.

The parent watches them: a worker that dies (SIGKILL, segfault, OOM-kill) is noticed within a
second, its trial is failed and queued to resume from its ``last.pt``, and a replacement worker
starts on the same slot. On Ctrl-C / SIGTERM the workers finish nothing new, leave their resume
state, queue their trials, and exit.
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch
from joblib.externals.loky.backend.context import get_context as loky_context
from optuna.trial import TrialState

from hpsearch import data as data_mod
from hpsearch.artifacts import (
    open_artifact_store,
    publish_study_best,
    publish_trial_checkpoint,
    retire_trial_checkpoint,
)
from hpsearch.checkpoint import atomic_write_json, file_lock
from hpsearch.config import ResourcesSection, StudyConfig
from hpsearch.keeper import Retention, discard_resume_state, offer_best
from hpsearch.space import sample
from hpsearch.storage import (
    HOST,
    TrialIndex,
    fail_trial,
    frozen,
    heartbeat_path,
    open_storage,
    write_heartbeat,
)
from hpsearch.strategy import build_pruner, build_sampler
from hpsearch.train import Interrupted, NonFiniteError, TrialEnv, run_trial, trial_dir

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from optuna.artifacts._protocol import ArtifactStore

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass(frozen=True)
class Slot:
    index: int
    device: str
    threads: int


def visible_devices(devices: Any) -> list[str]:
    if devices == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if devices == "cpu":
        return ["cpu"]
    return list(devices)


def plan_slots(res: ResourcesSection, cores: int | None = None) -> list[Slot]:
    """Device slots: ``trials_per_device`` per GPU; on CPU one per core (or ``workers``)."""
    cores = cores or os.cpu_count() or 1
    devices = visible_devices(res.devices)
    if devices == ["cpu"]:
        n = cores if res.workers == "auto" else int(res.workers)
        n = max(1, n)
        slot_devices = ["cpu"] * n
    else:
        slot_devices = [d for d in devices for _ in range(res.trials_per_device)]
        if res.workers != "auto":
            slot_devices = slot_devices[: int(res.workers)] or slot_devices[:1]
    threads = (
        max(1, cores // len(slot_devices)) if res.torch_threads == "auto" else res.torch_threads
    )
    return [Slot(i, d, threads) for i, d in enumerate(slot_devices)]


def fork_safe(slots: list[Slot]) -> bool:
    """Whether forked workers are safe: CPU only, one torch thread each.

    A child forked after the parent ran CUDA cannot use CUDA, and one forked after the parent
    ran multi-threaded OpenMP hangs in its first parallel region; one thread never enters one.
    """
    return ("fork" in mp.get_all_start_methods()
            and all(s.device == "cpu" and s.threads == 1 for s in slots))


def start_method(res: ResourcesSection, slots: list[Slot]) -> str:
    """``fork`` or ``spawn``; raises ValueError when ``fork`` is asked for but unsafe."""
    if res.start_method == "fork" and not fork_safe(slots):
        raise ValueError("fork needs CPU workers of one torch thread each (CUDA and OpenMP "
                         "state do not survive a fork); use spawn or auto")
    if res.start_method == "auto":
        return "fork" if fork_safe(slots) else "spawn"
    return res.start_method


@dataclass(frozen=True)
class RunPaths:
    """Where one study keeps its run-time files."""

    results_dir: Path

    @property
    def control(self) -> Path:
        return self.results_dir / ".hpsearch"

    @property
    def stop_file(self) -> Path:
        return self.control / "stop"

    @property
    def abort_file(self) -> Path:
        return self.control / "abort"

    def status_file(self, slot: int) -> Path:
        return self.control / "workers" / f"slot-{slot}.json"

    @property
    def data_cache(self) -> Path:
        return self.results_dir / "data"


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


# ---------------------------------------------------------------- inside a worker process


class _Heartbeat(threading.Thread):
    """Refreshes the running trial's heartbeat and exits the process if the parent dies."""

    def __init__(self, spec: WorkerSpec, storage: optuna.storages.BaseStorage) -> None:
        super().__init__(daemon=True, name="hpsearch-heartbeat")
        self.spec, self.storage = spec, storage
        self.trial: optuna.Trial | None = None
        self.rdb = isinstance(storage, optuna.storages.RDBStorage)

    def beat(self) -> None:
        trial = self.trial
        if trial is None:
            return
        write_heartbeat(Path(self.spec.results_dir), trial.number)
        if self.rdb:
            self.storage.record_heartbeat(trial._trial_id)

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

    def __init__(self, paths: RunPaths, deadline: float | None) -> None:
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
    first_failures_checked: bool = False


def _claim(study: optuna.Study, cfg: StudyConfig, paths: RunPaths, spec: WorkerSpec,
           stop: _StopCheck, claims: _Claims) -> optuna.Trial | None:
    """Ask for the next trial unless the budget is used, the run stops, or it is failing."""
    with file_lock(paths.control / "claim.lock"):
        if not stop.may_start():
            return None
        if isinstance(study._storage, optuna.storages.RDBStorage):
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        index = claims.index
        index.update(trials)
        # Only unfinished trials can be WAITING, and those all come after index.settled.
        waiting = any(t.state == TrialState.WAITING for t in trials[index.settled:])
        if not waiting and index.counted(trials) >= cfg.study.n_trials:
            return None
        if not claims.first_failures_checked:
            settled, abort = _first_failures(cfg, paths, spec, index)
            if abort:
                return None
            claims.first_failures_checked = settled
        with warnings.catch_warnings():
            # Optuna warns that RDB heartbeats are meant for optimize(); ours beat them by hand.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            return study.ask()


def _first_failures(cfg: StudyConfig, paths: RunPaths, spec: WorkerSpec,
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


def worker_process(spec: WorkerSpec, outcome: Connection,
                   dataset: data_mod.Dataset | None = None) -> None:
    """Entry point of a worker process: run, then send the parent how it ended.

    The parent decides what Ctrl-C or a SIGTERM to the process group means; a worker only
    stops at the parent's request (or is killed outright). It starts with both ignored (and,
    when forked, blocked), see ``_stop_signals_held``.
    """
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        result: tuple[Any, ...] = ("done", worker_main(spec, dataset))
    except BaseException as err:  # reported to the parent, which records it for the slot
        result = ("error", f"{type(err).__name__}: {err}", traceback.format_exc())
    with contextlib.suppress(OSError):
        outcome.send(result)
        outcome.close()


def worker_main(spec: WorkerSpec, dataset: data_mod.Dataset | None = None) -> dict[str, Any]:
    """Body of one long-lived worker process. Returns a small summary.

    ``dataset``: the parent's copy (forked workers share it); otherwise loaded from the cache.
    """
    cfg, paths = spec.config, RunPaths(Path(spec.results_dir))
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
        sampler=build_sampler(cfg.study.sampler, seed_offset=1000 * spec.slot.index
                              + 100_000 * spec.generation + 1),
        pruner=build_pruner(cfg.study.pruner),
    )
    if dataset is None:
        dataset = data_mod.load(cfg.data, paths.data_cache)
    in_memory = (
        data_mod.fits_in_memory(dataset, device) if cfg.data.in_memory == "auto"
        else bool(cfg.data.in_memory) and dataset.splits is not None
    )
    if in_memory:
        dataset = data_mod.to_device(dataset, device)
    worker_name = f"{HOST}:{os.getpid()}"
    store = open_artifact_store(cfg, paths.results_dir)
    stop = _StopCheck(paths, spec.deadline)
    status_path = paths.status_file(spec.slot.index)

    def status(**fields: Any) -> None:
        atomic_write_json(
            status_path,
            {"slot": spec.slot.index, "device": spec.slot.device, "pid": os.getpid(),
             "time": time.time(), **fields},
            durable=False,
        )

    claims, retention = _Claims(TrialIndex()), Retention(cfg)
    done = 0
    status(state="idle", trial=None)
    while True:
        trial = _claim(study, cfg, paths, spec, stop, claims)
        if trial is None:
            break
        heartbeat.trial = trial
        heartbeat.beat()
        status(state="training", trial=trial.number, epoch=None, value=None)
        log = _TrialLog(trial_dir(paths.results_dir, trial.number) / "train.log")
        env = TrialEnv(
            config=cfg,
            dataset=dataset,
            device=device,
            results_dir=paths.results_dir,
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
        )
        try:
            _run_one(study, trial, env, log, retention, store)
        except Interrupted:
            break
        finally:
            heartbeat.trial = None
            heartbeat_path(paths.results_dir, trial.number).unlink(missing_ok=True)
            log.close()
            status(state="idle", trial=None)
        done += 1
    status(state="done", trial=None)
    return {"slot": spec.slot.index, "trials": done, "pid": os.getpid()}


def _run_one(study: optuna.Study, trial: optuna.Trial, env: TrialEnv,
             log: Callable[[str], None], retention: Retention,
             store: ArtifactStore | None = None) -> None:
    """Run one claimed trial and record how it ended; only Interrupted escapes."""
    cfg, results_dir = env.config, env.results_dir
    trial.set_user_attr("worker", env.worker)
    trial.set_user_attr("device", str(env.device))
    log(f"trial {trial.number} on {env.device} by {env.worker}")
    try:
        params = sample(trial, cfg)
        log(f"params {json.dumps(params.flat())}")
        value = run_trial(trial, params, env)
    except optuna.TrialPruned as err:
        log(f"PRUNED: {err}")
        study.tell(trial, state=TrialState.PRUNED)
        discard_resume_state(results_dir, trial.number)
    except Interrupted:
        log("interrupted: resume state kept; the trial resumes on the next run")
        fail_trial(study, frozen(trial), "interrupted (Ctrl-C / SIGTERM); resumes on rerun",
                   retry=True, count_retry=False, max_retries=cfg.study.max_retries)
        raise
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        if isinstance(err, NonFiniteError):
            reason = str(err)
        log(f"FAIL: {reason}\n{traceback.format_exc()}")
        trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
        fail_trial(study, frozen(trial), reason, retry=False)
        discard_resume_state(results_dir, trial.number)
        if isinstance(err, torch.cuda.OutOfMemoryError):
            gc.collect()
            torch.cuda.empty_cache()
    else:
        study.tell(trial, value)
        log(f"COMPLETE: value={value}")
        if offer_best(results_dir, frozen(trial), cfg):
            log("new study best")
            if store is not None:
                publish_study_best(store, study, results_dir)
    deleted = retention.apply(study, results_dir, trial.number)
    if store is not None:
        for number in deleted:
            retire_trial_checkpoint(store, study, retention.index.finished[number])


# ---------------------------------------------------------------- the supervising parent


@dataclass
class _SlotState:
    slot: Slot
    process: BaseProcess | None = None
    outcome: Connection | None = None
    generation: int = 0
    deaths: int = 0
    finished: bool = False
    error: str | None = None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Start a worker that ignores Ctrl-C and SIGTERM from its first instruction.

    The terminal sends Ctrl-C to the whole process group, and a worker still importing torch
    would die of it with a traceback. An ignored disposition survives fork and exec (and a
    Python started with SIGINT ignored installs no KeyboardInterrupt handler). The parent
    blocks them meanwhile: Linux keeps a blocked signal pending even while it is ignored, so
    one that arrives during the start reaches the parent's handler afterwards.
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    handlers = {}
    try:
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
        yield
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    if code:
        return f"exited with status {code}"
    return "exited without reporting how its work ended"


@dataclass
class Supervisor:
    """Starts one worker per slot, replaces dead ones, and stops them on request."""

    config: StudyConfig
    results_dir: Path
    storage: str
    slots: list[Slot]
    deadline: float | None = None
    on_event: Callable[[str], None] = print
    max_deaths_per_slot: int = 5
    run_started: float = field(default_factory=time.time)
    dataset: data_mod.Dataset | None = None
    """The parent's loaded dataset: forked workers share it instead of reading the cache."""
    states: list[_SlotState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.paths = RunPaths(self.results_dir)
        self.states = [_SlotState(s) for s in self.slots]
        self.start_method = start_method(self.config.resources, self.slots)

    def _spec(self, st: _SlotState) -> WorkerSpec:
        return WorkerSpec(
            config=self.config,
            results_dir=str(self.results_dir),
            storage=self.storage,
            slot=st.slot,
            generation=st.generation,
            parent_pid=os.getpid(),
            run_started=self.run_started,
            deadline=self.deadline,
        )

    def start(self) -> None:
        for st in self.states:
            self._launch(st)

    def _launch(self, st: _SlotState) -> None:
        self.paths.status_file(st.slot.index).unlink(missing_ok=True)
        forked = self.start_method == "fork"
        # loky's spawn does not re-run the caller's __main__ (a script without a main guard).
        ctx = mp.get_context("fork") if forked else loky_context("loky")
        receiver, sender = ctx.Pipe(duplex=False)
        shared = self.dataset if forked and self.dataset is not None and \
            self.dataset.splits is not None else None
        proc = ctx.Process(target=worker_process, args=(self._spec(st), sender, shared),
                           name=f"hpsearch-worker-{st.slot.index}")
        # A forked child would print the parent's unflushed output a second time.
        sys.stdout.flush()
        sys.stderr.flush()
        with _stop_signals_held():
            proc.start()
        sender.close()
        st.process, st.outcome = proc, receiver

    def worker_pids(self) -> set[int]:
        """Pids of workers whose end has not been handled yet, dead or alive: a trial of one
        that just died is the death path's to fail (with its reason), not the stale path's."""
        return {st.process.pid for st in self.states
                if st.process is not None and st.process.pid and not st.finished}

    def wait(self, timeout: float) -> None:
        """Sleep until a worker exits or ``timeout`` passes."""
        sentinels = [st.process.sentinel for st in self.states
                     if not st.finished and st.process is not None]
        if sentinels:
            mp.connection.wait(sentinels, timeout)
        else:
            time.sleep(timeout)

    def _result(self, st: _SlotState) -> tuple[Any, ...] | None:
        assert st.outcome is not None
        try:
            return st.outcome.recv() if st.outcome.poll() else None
        except (EOFError, OSError):
            return None
        finally:
            st.outcome.close()

    def poll(self, stopping: bool = False) -> bool:
        """Check every slot once; replace dead workers. Returns True while any is running."""
        running = False
        for st in self.states:
            if st.finished:
                continue
            if st.alive():
                running = True
                continue
            assert st.process is not None
            result = self._result(st)
            st.process.join()
            if result is not None and result[0] == "done":
                st.finished = True
            elif result is not None:
                st.finished, st.error = True, result[1]
                self.on_event(f"worker on slot {st.slot.index} stopped with an error: {st.error}")
            else:
                self._handle_death(st, _exit_reason(st.process.exitcode), restart=not stopping)
                running = running or not st.finished
        return running

    def _handle_death(self, st: _SlotState, reason: str, restart: bool) -> None:
        if not restart:
            # A worker killed during a stop (a second Ctrl-C, the stop timeout) is part of
            # the stop, not a crash.
            reason = "stopped with the run"
        status = self._read_status(st.slot.index)
        number = status.get("trial") if status else None
        if number is not None:
            storage = open_storage(self.storage, self.config)
            study = optuna.load_study(study_name=self.config.study.name, storage=storage)
            t = study.get_trials(deepcopy=False)[number]
            if t.state == TrialState.RUNNING:
                # A death during a stop is part of the stop: it uses up no retry.
                queued = fail_trial(
                    study, t, f"worker on {st.slot.device} {'died' if restart else 'stopped'}: "
                    f"{reason}",
                    retry=True, count_retry=restart,
                    max_retries=self.config.study.max_retries,
                )
                verb = "died" if restart else "stopped"
                self.on_event(
                    f"worker on slot {st.slot.index} ({st.slot.device}) {verb} during trial "
                    f"{number}; " + (f"trial {queued} resumes it" if queued is not None
                                     else "no retries left: left FAIL")
                )
        elif restart:
            self.on_event(f"worker on slot {st.slot.index} ({st.slot.device}) died: {reason}")
        st.deaths += 1
        if restart and st.deaths <= self.max_deaths_per_slot:
            st.generation += 1
            self._launch(st)
        else:
            st.finished = True
            if restart:
                st.error = f"slot {st.slot.index} died {st.deaths} times; not restarted"
                self.on_event(st.error)

    def _read_status(self, index: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.paths.status_file(index).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def statuses(self) -> list[dict[str, Any]]:
        return [self._read_status(st.slot.index) or {"slot": st.slot.index,
                "device": st.slot.device, "state": "starting"} for st in self.states]

    def kill_silent(self, grace: float) -> list[int]:
        """SIGKILL workers whose running trial's heartbeat is older than ``grace`` (hung or
        stopped processes); the death path then resumes their trials. Returns their pids."""
        killed = []
        for st in self.states:
            status = self._read_status(st.slot.index)
            if st.finished or not status or status.get("trial") is None:
                continue
            beat = heartbeat_path(self.results_dir, int(status["trial"]))
            try:
                age = time.time() - beat.stat().st_mtime
            except FileNotFoundError:
                continue
            # Only a live process of ours: a reaped one's pid may belong to someone else now.
            if age > grace and st.alive() and status.get("pid") == st.process.pid:
                self.on_event(f"worker {status['pid']} on slot {st.slot.index} sent no heartbeat "
                              f"for {age:.0f} s (hung?); killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(status["pid"]), signal.SIGKILL)
                killed.append(int(status["pid"]))
        return killed

    def request_stop(self) -> None:
        self.paths.control.mkdir(parents=True, exist_ok=True)
        self.paths.stop_file.touch()

    def kill_all(self) -> None:
        for st in self.states:
            if st.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(st.process.pid, signal.SIGKILL)

    def wait_stopped(self, timeout: float) -> bool:
        """After a stop request: wait for workers to save and exit; kill them at the timeout."""
        end = time.monotonic() + timeout
        while self.poll(stopping=True):
            if time.monotonic() >= end:
                self.kill_all()
                self.shutdown()
                return False
            self.wait(min(0.1, max(0.0, end - time.monotonic())))
        return True

    def shutdown(self) -> None:
        """Kill what still runs and reap every worker."""
        self.kill_all()
        for st in self.states:
            if st.process is not None:
                st.process.join(timeout=10)
