"""One run of a study, step by step: check, prepare, open, heal, supervise, settle, report.

Everything that can be wrong with the study file is checked before the results folder is
touched. A rerun of the same command continues the same study: stale trials of a run that
died are failed and resumed, and the study goes on to its ``n_trials`` total. Ctrl-C and
SIGTERM are handled from the workers' start to the end of the report.

:func:`run_config` is the engine under both entry points: ``hpsearch.run_study`` (the Python
API, which raises for a stopped or failed run) and ``python -m hpsearch.run`` (which exits
with :attr:`RunOutcome.exit_code`). Use ``hpsearch.run_study``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from hpsearch import attrs, data, exploration
from hpsearch.checkpoint.artifacts import open_artifact_store, publish_study_best
from hpsearch.checkpoint.study_best import reconcile_best
from hpsearch.config import StudyConfig, task_problem
from hpsearch.errors import EXIT_FAILED, EXIT_OK, ConfigError, HpsearchError, Interrupted
from hpsearch.files import atomic_torch_save, clean_stale_temporaries
from hpsearch.pruning import build_study_pruner
from hpsearch.report import build_report
from hpsearch.results import ResultsLayout, save_config_copy
from hpsearch.run.progress import Printer, snapshot, summary
from hpsearch.run.signals import StopSignals
from hpsearch.sampling import build_study_sampler
from hpsearch.space import to_optuna_names
from hpsearch.storage.backends import open_storage, storage_url
from hpsearch.storage.liveness import recover_stale
from hpsearch.storage.study_lock import study_lock
from hpsearch.workers.slots import Slot, plan_slots, start_method
from hpsearch.workers.supervisor import Supervisor

Event = Callable[[str], None]


@dataclass
class RunOutcome:
    """How a run ended, already told to the user through the printer."""

    exit_code: int
    """0, 1 (the run stopped on failures, or the report failed), 130/143 (a stop signal)."""
    results_dir: Path
    study: optuna.Study | None = None
    failure: str | None = None
    """Why the exit code is 1, in one line."""
    signal: int | None = None
    """The stop signal (SIGINT, SIGTERM) that interrupted the run."""
    report: dict[str, Path] | None = None
    """The report files this run wrote."""


def run_config(
    config: StudyConfig,
    results_root: str | Path = "results",
    source: str = "",
    printer: Printer | None = None,
    handle_signals: bool = True,
    command: str | None = None,
) -> RunOutcome:
    """Run (or continue) a study until ``n_trials`` trials are counted, then report.

    Args:
        config: The validated study.
        results_root: Outputs go to ``results_root/<study name>/``.
        source: The study file's path, for messages.
        printer: Where progress goes (default: stdout).
        handle_signals: Install the Ctrl-C / SIGTERM handlers (main thread only).
        command: How to resume, repeated in the resume hint (default: the CLI command).

    Returns:
        The outcome; a stopped or failed run is an exit code here, not an exception.

    Raises:
        ConfigError: The study is inconsistent with its data, its devices, or a stored study.
    """
    # hpsearch prints its own progress; Optuna's INFO lines (a study created, trials told by
    # forked workers) would drown it. Restored after, for a notebook's own setting.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return _run(config, results_root, source, printer or Printer(config.study.metric),
                    handle_signals, command)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _run(config: StudyConfig, results_root: str | Path, source: str, printer: Printer,
         handle_signals: bool, command: str | None) -> RunOutcome:
    """The run, connected to its Dask cluster when ``resources.scheduler`` names one."""
    cluster = connect_cluster(config, source)
    try:
        return _steps(config, results_root, source, printer, handle_signals, command, cluster)
    finally:
        if cluster is not None:
            cluster.close()


def _steps(config: StudyConfig, results_root: str | Path, source: str, printer: Printer,
           handle_signals: bool, command: str | None, cluster: Any) -> RunOutcome:
    """The run's steps, in order."""
    slots = check_strategy(config, source, cluster)
    layout = ResultsLayout.of(config, results_root)
    dataset = load_dataset(config, source, layout)
    log = prepare_folder(config, layout, dataset)

    def event(text: str) -> None:
        log.info(text)
        printer.message(text)

    url = storage_url(config, layout)
    study = open_run_study(config, url, source)
    log.info("run started: %s, storage %s", source or config.study.name, url)
    heal(study, layout, config, event)

    deadline = time.time() + config.study.timeout if config.study.timeout else None
    sup = make_supervisor(config, layout, url, slots, cluster, deadline=deadline,
                          on_event=event, dataset=dataset,
                          prior_trials=len(study.get_trials(deepcopy=False)))
    if config.logging.tensorboard:
        event(f"tensorboard: tensorboard --logdir {layout.trials}")
    event(workers_line(slots, sup.start_method, config.resources.scheduler))
    stop = StopSignals(on_first=sup.request_stop, on_second=sup.kill_all, enabled=handle_signals)
    with stop:
        try:
            supervise(sup, study, config, layout, printer, event, stop)
        finally:
            sup.shutdown()
        settle(study, layout, config)
        printer.show(snapshot(study, config, []))
        result = outcome(sup, layout, stop, event)
        stopped_in_training = stop.stopping
        if result.exit_code == EXIT_OK and config.report.enabled:
            result = write_report(config, study, layout, slots, stop, event)
    event(summary(study, config, layout))
    if stopped_in_training:
        resume = command or f"python -m hpsearch.run {source or '<study file>'}"
        event("interrupted: every finished trial and checkpoint is kept; running trials "
              f"resume from their last epoch. Resume with: {resume}")
    log.info("run ended with exit code %s", result.exit_code)
    result.study = study
    return result


# ---------------------------------------------------------------- before anything is written


def connect_cluster(config: StudyConfig, source: str) -> Any:
    """The Dask client of ``resources.scheduler`` (None on one machine), before any work."""
    if config.resources.scheduler is None:
        return None
    # Imported only here: a run on one machine neither needs Dask nor pays for importing it.
    from hpsearch.workers import dask_cluster

    return dask_cluster.connect(config.resources.scheduler, source)


def make_supervisor(config: StudyConfig, layout: ResultsLayout, url: str, slots: list[Slot],
                    cluster: Any, **options: Any) -> Supervisor:
    """The local supervisor, or its Dask counterpart for a run on a cluster."""
    if cluster is None:
        return Supervisor(config, layout, url, slots, **options)
    from hpsearch.workers import dask_cluster

    return dask_cluster.DaskSupervisor(config, layout, url, slots, client=cluster, **options)


def workers_line(slots: list[Slot], started: str, scheduler: str | None) -> str:
    """The line that says where the workers run."""
    def threads(s: Slot) -> str:
        return f"{s.threads} thread{'s' * (s.threads > 1)}"

    if scheduler is None:
        return f"{len(slots)} worker(s), {started}ed: " + ", ".join(
            f"{s.device} ({threads(s)})" for s in slots)
    hosts = len({s.address for s in slots})
    return (f"{len(slots)} worker(s) on {hosts} Dask worker(s) of {scheduler}: "
            + ", ".join(f"{s.device} ({threads(s)}) on {s.address}" for s in slots))


def check_strategy(config: StudyConfig, source: str, cluster: Any = None) -> list[Slot]:
    """Build the sampler and pruner once, and plan the slots (on the Dask ``cluster``'s
    workers when given), so bad arguments fail before any work. Returns the slots."""
    for key, build in (("study.sampler", lambda: build_study_sampler(config)),
                       ("study.pruner", lambda: build_study_pruner(config))):
        try:
            build()
        except Exception as err:  # whatever Optuna raises for bad arguments is the user's
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(source, key, f"{type(err).__name__}: {first}") from None
    if cluster is not None:
        from hpsearch.workers import dask_cluster

        slots = dask_cluster.plan_cluster_slots(cluster, config.resources)
    else:
        slots = plan_slots(config.resources)
        check_devices(slots, source)
        try:
            start_method(config.resources, slots)
        except ValueError as err:
            raise ConfigError(source, "resources.start_method", str(err)) from None
    cpus = sorted({s.device for s in slots if not s.device.startswith("cuda")})
    if config.train.precision == "16" and cpus:
        raise ConfigError(source, "train.precision", f"16 (float16 with a GradScaler) needs "
                          f"CUDA devices; {', '.join(cpus)} would train it: use bf16 on the CPU")
    return slots


def check_devices(slots: list[Slot], source: str) -> None:
    """Every CUDA device a slot names must exist here."""
    for device in sorted({s.device for s in slots}):
        if not device.startswith("cuda"):
            continue
        if not torch.cuda.is_available():
            why = ("this torch is not compiled with CUDA" if torch.version.cuda is None
                   else "torch.cuda sees no device")
            raise ConfigError(source, "resources.devices",
                              f"{device}: CUDA is not available ({why})")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(source, "resources.devices",
                              f"{device}: no such device; torch.cuda sees "
                              f"{torch.cuda.device_count()} (cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1})")


def load_dataset(config: StudyConfig, source: str, layout: ResultsLayout) -> data.Dataset:
    """Build (or read the cached) dataset and check the monitored metrics exist for it."""
    try:
        dataset = data.load(config.data, layout.data_cache)
    except Exception as err:
        raise ConfigError(source, "data", f"cannot build the dataset: {err}") from None
    problem = task_problem(config, dataset.task)
    if problem is not None:
        raise ConfigError(source, problem[0], f"{problem[1]} (this dataset is {dataset.task})")
    loss = config.train.loss
    for key in ("weight", "pos_weight"):
        value = loss.arguments.get(key) if loss is not None else None
        if isinstance(value, list) and len(value) != dataset.output_size:
            raise ConfigError(source, f"train.loss.{key}", f"has {len(value)} values; the "
                              f"model has {dataset.output_size} outputs (one per class)")
    return dataset


# ---------------------------------------------------------------- the results folder


def prepare_folder(config: StudyConfig, layout: ResultsLayout,
                   dataset: data.Dataset) -> logging.Logger:
    """Create the folder, clear what a crash or the last run left, write the data cache and
    the config copy. Returns the run's logger (``run.log``)."""
    cached = data.cache_path(config.data, layout.data_cache).exists()
    layout.root.mkdir(parents=True, exist_ok=True)
    removed = clean_stale_temporaries(layout.root)
    layout.control.mkdir(exist_ok=True)
    layout.stop_file.unlink(missing_ok=True)
    layout.abort_file.unlink(missing_ok=True)
    log = _run_logger(layout)
    if removed:
        log.info("removed %d temporary file(s) left by an earlier crash", removed)
    if not cached and dataset.splits is not None:
        # Generated once per study; workers read this file instead of regenerating.
        atomic_torch_save(data.to_payload(dataset),
                          data.cache_path(config.data, layout.data_cache))
    save_config_copy(config, layout)
    return log


def _run_logger(layout: ResultsLayout) -> logging.Logger:
    log = logging.getLogger(f"hpsearch.run.{layout.root}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    handler = logging.FileHandler(layout.run_log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return log


# ---------------------------------------------------------------- the study


def open_run_study(config: StudyConfig, url: str, source: str) -> optuna.Study:
    """Create or load the study; enqueue the study file's trials once per study."""
    study = optuna.create_study(
        study_name=config.study.name,
        storage=open_storage(url, config),
        direction=config.study.direction,
        sampler=build_study_sampler(config),
        pruner=build_study_pruner(config),
        load_if_exists=True,
    )
    if study.direction.name.lower() != config.study.direction:
        raise ConfigError(source, "study.direction", f"the stored study {config.study.name!r} "
                          f"is {study.direction.name.lower()}; it cannot change")
    # Under the study lock: nodes starting at once must not each queue the planned trials.
    with study_lock(study, url)():
        if not study.user_attrs.get(attrs.STUDY_ENQUEUED):
            for params in config.study.enqueue:
                study.enqueue_trial(to_optuna_names(params, config), skip_if_exists=True)
            study.set_user_attr(attrs.STUDY_ENQUEUED, True)
            study.set_user_attr(attrs.STUDY_METRIC, config.study.metric)
        exploration.enqueue_missing(study, config)
    return study


def heal(study: optuna.Study, layout: ResultsLayout, config: StudyConfig, event: Event) -> None:
    """Resume what a run that died left RUNNING, and repair the study best."""
    for failed, queued in recover_stale(study, layout, config):
        event(f"trial {failed} was left RUNNING by a run that died; "
              + (f"trial {queued} resumes it" if queued is not None else "no retries left"))
    reconcile_best(study, layout, config)


def supervise(sup: Supervisor, study: optuna.Study, config: StudyConfig, layout: ResultsLayout,
              printer: Printer, event: Event, stop: StopSignals) -> None:
    """Start the workers and watch them until the budget is used or the run is stopped."""
    sup.start()
    last_recover = time.monotonic()
    while sup.poll(stopping=stop.stopping):
        if stop.stopping:
            event("stopping: workers save their resume state and exit "
                  "(press Ctrl-C again to exit at once)")
            if not sup.wait_stopped(timeout=15.0):
                event("workers did not stop in time and were killed")
            return
        printer.show(snapshot(study, config, sup.statuses()))
        if time.monotonic() - last_recover > max(2.0, config.study.grace_period / 2):
            last_recover = time.monotonic()
            sup.kill_silent(config.study.grace_period)
            for failed, queued in recover_stale(study, layout, config,
                                                live_pids=sup.worker_pids()):
                event(f"trial {failed} went stale; trial {queued} resumes it")
        sup.wait(0.5)


# ---------------------------------------------------------------- after the workers


def settle(study: optuna.Study, layout: ResultsLayout, config: StudyConfig) -> None:
    """Repair the study best, and its publication as the study artifact, after a crash."""
    reconcile_best(study, layout, config)
    store = open_artifact_store(config, layout)
    if store is not None and layout.best.exists():
        publish_study_best(store, study, layout)


def outcome(sup: Supervisor, layout: ResultsLayout, stop: StopSignals,
            event: Event) -> RunOutcome:
    """The outcome the workers' ending deserves."""
    if stop.stopping:
        return RunOutcome(stop.exit_code, layout.root, signal=stop.received[0])
    if layout.abort_file.exists():
        failure = "study stopped: " + json.loads(layout.abort_file.read_text())["message"]
        event(failure)
        return RunOutcome(EXIT_FAILED, layout.root, failure=failure)
    errors = [st.error for st in sup.states if st.error]
    if errors and len(errors) == len(sup.states):
        return RunOutcome(EXIT_FAILED, layout.root,
                          failure=f"every worker failed; the first: {errors[0]}")
    return RunOutcome(EXIT_OK, layout.root)


def write_report(config: StudyConfig, study: optuna.Study, layout: ResultsLayout,
                 slots: list[Slot], stop: StopSignals, event: Event) -> RunOutcome:
    """Measure and write the report; a stop during it abandons the report, not the study."""
    try:
        with stop.raising():
            paths = build_report(config, study, layout, slots, on_progress=event)
    except Interrupted as err:
        event("interrupted during the report: the study and its checkpoints are complete and "
              "kept; the report was not written. Rebuild it with: "
              f"python -m hpsearch.report {layout.root}")
        return RunOutcome(stop.exit_code, layout.root, signal=err.signum)
    except HpsearchError as err:
        failure = f"the report could not be written: {err}"
        event(f"error: {failure}")
        return RunOutcome(EXIT_FAILED, layout.root, failure=failure)
    event(f"report: {paths['html']}")
    return RunOutcome(EXIT_OK, layout.root, report=paths)
