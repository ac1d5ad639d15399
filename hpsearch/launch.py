"""One run of a study: prepare, start the workers, supervise them, summarise.

Everything that can be wrong with the study file is checked before the results folder is
touched. A rerun of the same command continues the same study: stale trials of a run that
died are failed and resumed, and the study goes on to its ``n_trials`` total.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import optuna

from hpsearch import data as data_mod
from hpsearch.artifacts import open_artifact_store, publish_study_best
from hpsearch.checkpoint import atomic_torch_save, clean_stale_temporaries
from hpsearch.config import TASK_METRICS, ConfigError, StudyConfig
from hpsearch.keeper import reconcile_best
from hpsearch.progress import Printer, snapshot, summary
from hpsearch.storage import open_storage, recover_stale, save_config_copy, storage_url
from hpsearch.strategy import build_pruner, build_sampler
from hpsearch.workers import RunPaths, Slot, Supervisor, plan_slots, start_method

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class RunResult:
    exit_code: int
    results_dir: Path
    study: optuna.Study | None = None


def check_strategy(config: StudyConfig, source: str) -> None:
    """Build the sampler and pruner once so bad arguments fail before any work."""
    for key, build in (("study.sampler", lambda: build_sampler(config.study.sampler)),
                       ("study.pruner", lambda: build_pruner(config.study.pruner))):
        try:
            build()
        except Exception as err:  # whatever Optuna raises for bad arguments is the user's
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(source, key, f"{type(err).__name__}: {first}") from None


def _run_logger(results_dir: Path) -> logging.Logger:
    log = logging.getLogger(f"hpsearch.run.{results_dir}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    handler = logging.FileHandler(results_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return log


def _write_report(config: StudyConfig, study: optuna.Study, results_dir: Path,
                  slots: list[Slot], event: Callable[[str], None]) -> int:
    from hpsearch.confirm import make_report

    if config.report.seeds:
        event(f"report: retraining each architecture's best with {config.report.seeds} seeds")
    try:
        paths = make_report(config, study, results_dir, slots)
    except OSError as err:
        event(f"error: the report could not be written: {err}")
        return EXIT_FAILED
    event(f"report: {paths['html']}")
    return EXIT_OK


def run_study(
    config: StudyConfig,
    results_root: str | Path = "results",
    source: str = "",
    printer: Printer | None = None,
    handle_signals: bool = True,
) -> RunResult:
    """Run (or continue) a study until ``n_trials`` trials are counted.

    Args:
        config: The validated study.
        results_root: Outputs go to ``results_root/<study name>/``.
        source: The study file's path, for messages.
        printer: Where progress goes (default: stdout).
        handle_signals: Install the Ctrl-C / SIGTERM handlers (main thread only).

    Raises:
        ConfigError: The study is inconsistent with its data, or with a stored study.
    """
    check_strategy(config, source)
    slots = plan_slots(config.resources)
    try:
        start_method(config.resources, slots)
    except ValueError as err:
        raise ConfigError(source, "resources.start_method", str(err)) from None
    results_dir = Path(results_root) / config.study.name
    paths = RunPaths(results_dir)
    cache = data_mod.cache_path(config.data, paths.data_cache)
    cached = cache.exists()
    # Built (or read) before the results folder is touched: a bad dataset changes nothing.
    try:
        dataset = data_mod.load(config.data, paths.data_cache)
    except Exception as err:
        raise ConfigError(source, "data", f"cannot build the dataset: {err}") from None
    task_metrics = TASK_METRICS[dataset.task]
    for key, name in (("study.metric", config.study.metric),
                      ("checkpoint.monitor", config.checkpoint.monitor)):
        if name not in task_metrics:
            raise ConfigError(source, key, f"{name!r} is not computed for this "
                              f"{dataset.task} dataset; available: {', '.join(task_metrics)}")

    results_dir.mkdir(parents=True, exist_ok=True)
    removed = clean_stale_temporaries(results_dir)
    paths.control.mkdir(exist_ok=True)
    paths.stop_file.unlink(missing_ok=True)
    paths.abort_file.unlink(missing_ok=True)
    log = _run_logger(results_dir)
    printer = printer or Printer(config.study.metric)

    def event(text: str) -> None:
        log.info(text)
        printer.message(text)

    if removed:
        event(f"removed {removed} temporary file(s) left by an earlier crash")
    if not cached and dataset.splits is not None:
        # Generated once per study; workers read this file instead of regenerating.
        atomic_torch_save(data_mod.to_payload(dataset), cache)
    save_config_copy(config, results_dir)
    url = storage_url(config, results_dir)
    storage = open_storage(url, config)
    study = optuna.create_study(
        study_name=config.study.name,
        storage=storage,
        direction=config.study.direction,
        sampler=build_sampler(config.study.sampler),
        pruner=build_pruner(config.study.pruner),
        load_if_exists=True,
    )
    if study.direction.name.lower() != config.study.direction:
        raise ConfigError(source, "study.direction", f"the stored study {config.study.name!r} "
                          f"is {study.direction.name.lower()}; it cannot change")
    if not study.user_attrs.get("hpsearch_enqueued"):
        for params in config.study.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
        study.set_user_attr("hpsearch_enqueued", True)
        study.set_user_attr("metric", config.study.metric)
        study.set_user_attr("results_dir", str(results_dir))
    log.info("run started: %s, storage %s", source or config.study.name, url)

    for failed, queued in recover_stale(study, results_dir, config):
        event(f"trial {failed} was left RUNNING by a run that died; "
              + (f"trial {queued} resumes it" if queued is not None else "no retries left"))
    reconcile_best(study, results_dir, config)

    deadline = time.time() + config.study.timeout if config.study.timeout else None
    sup = Supervisor(config, results_dir, url, slots, deadline=deadline, on_event=event,
                     dataset=dataset)
    event(f"{len(slots)} worker(s), {sup.start_method}ed: "
          + ", ".join(f"{s.device} ({s.threads} thread{'s' * (s.threads > 1)})" for s in slots))

    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if received:
            # Second signal: exit at once; stale trials are resumed by the next run.
            sup.kill_all()
            os._exit(EXIT_SIGNAL.get(signal.Signals(signum), 130))
        received.append(signum)
        sup.request_stop()

    previous = {}
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    exit_code = EXIT_OK
    try:
        sup.start()
        last_recover = time.monotonic()
        announced = False
        while sup.poll(stopping=bool(received)):
            if received and not announced:
                announced = True
                event("stopping: workers save their resume state and exit "
                      "(press Ctrl-C again to exit at once)")
                if not sup.wait_stopped(timeout=15.0):
                    event("workers did not stop in time and were killed")
                break
            printer.show(snapshot(study, config, sup.statuses()))
            if time.monotonic() - last_recover > max(2.0, config.study.grace_period / 2):
                last_recover = time.monotonic()
                sup.kill_silent(config.study.grace_period)
                for failed, queued in recover_stale(study, results_dir, config,
                                                    live_pids=sup.worker_pids()):
                    event(f"trial {failed} went stale; trial {queued} resumes it")
            sup.wait(0.5)
    finally:
        sup.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    reconcile_best(study, results_dir, config)
    # Heals a crash between a new best and its publication as the study artifact.
    store = open_artifact_store(config, results_dir)
    if store is not None and (results_dir / "best").exists():
        publish_study_best(store, study, results_dir)
    printer.show(snapshot(study, config, []))
    if received:
        exit_code = EXIT_SIGNAL.get(signal.Signals(received[0]), 130)
        event(summary(study, config, results_dir))
        event(f"interrupted: every finished trial and checkpoint is kept; running trials "
              f"resume from their last epoch. Resume with: python -m hpsearch.run "
              f"{source or '<study file>'}")
        return RunResult(exit_code, results_dir, study)
    if paths.abort_file.exists():
        event("study stopped: " + json.loads(paths.abort_file.read_text())["message"])
        exit_code = EXIT_FAILED
    errors = [st.error for st in sup.states if st.error]
    if errors and len(errors) == len(sup.states):
        exit_code = EXIT_FAILED
    if config.report.enabled and exit_code == EXIT_OK:
        exit_code = _write_report(config, study, results_dir, slots, event)
    event(summary(study, config, results_dir))
    log.info("run ended with exit code %s", exit_code)
    return RunResult(exit_code, results_dir, study)
