"""The report's measurements: test-split scores of each architecture's best checkpoint, and
seed retrains of each architecture's best configuration.

This is the only place the test split is used, and nothing here feeds back into selection.
Retrains run in parallel, one per device slot of the run: each device has its own pool of
processes, each pinned to that device (and to the slot's torch threads) for its whole life, so
no process ever builds a CUDA context on a second GPU. Results arrive as they finish, and a
Ctrl-C in the main thread stops them at once (the pools' processes are killed and the
interrupt propagates). On a Dask cluster (``resources.scheduler``) each retrain runs in a
fresh process on the Dask worker of the slot it was dealt, killed the same way on a stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import traceback
from collections import Counter, deque
from collections.abc import Callable, Generator, Mapping
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, NamedTuple

import optuna
import torch
from joblib.externals.loky.backend.context import get_context as loky_context
from optuna.trial import FrozenTrial

from hpsearch import data as data_mod
from hpsearch import objective, ranking
from hpsearch.checkpoint.loading import load_model
from hpsearch.checkpoint.shared import kept_checkpoint
from hpsearch.config import StudyConfig
from hpsearch.data import DeviceBatches
from hpsearch.evaluation import study_evaluator
from hpsearch.metrics import base_of, on_split
from hpsearch.results import ResultsLayout
from hpsearch.space import from_params
from hpsearch.train import train_and_test
from hpsearch.workers.slots import Slot
from hpsearch.workers.supervisor import stop_signals_held
from hpsearch.workers.worker import ignore_stop_signals

SEED_BASE = 1_000_000  # far from trial seeds (train.seed + trial number)

Progress = Callable[[str], None]


class Measurements(NamedTuple):
    """What :func:`measure` found, keyed by architecture (the inputs of ``compute_report``)."""

    test_metric_name: str
    test_metrics: dict[str, float]
    """Test metric of each architecture's best checkpoint (those still on disk), with the
    study's metric and loss."""
    seed_metrics: dict[str, list[float]]
    """Test metric of each retrain of each architecture's best configuration, by seed."""


def measure(
    config: StudyConfig,
    study: optuna.Study,
    layout: ResultsLayout,
    slots: list[Slot],
    on_progress: Progress | None = None,
) -> Measurements:
    """Score each architecture's best checkpoint on the test split and retrain its
    configuration with ``config.report.seeds`` fresh seeds.

    Args:
        config: The study's config (metric, data, ``report.seeds``).
        study: The stored study.
        layout: The study's results folder (checkpoints, data cache).
        slots: Device slots to spread the retrains over.
        on_progress: Called with one line of text before the retrains and as each finishes.
    """
    bests = ranking.architecture_bests(study.get_trials(deepcopy=False), config.minimize)
    dataset = data_mod.load(config.data, layout.data_cache)
    return Measurements(
        test_metric_name=on_split(config.study.metric, "test"),
        test_metrics=score_checkpoints(layout, bests, dataset, config),
        seed_metrics=seed_retrains(config, bests, slots, layout.data_cache, on_progress),
    )


def score_checkpoints(
    layout: ResultsLayout, bests: Mapping[str, FrozenTrial], dataset: data_mod.Dataset,
    config: StudyConfig,
) -> dict[str, float]:
    """Test metric of each architecture's best checkpoint (those still kept: on this node's
    disk, or fetched from a shared store), with the study's metric and loss."""
    test = DeviceBatches(dataset, "test", torch.device("cpu"), in_memory=True)
    scores = {}
    for arch, trial in bests.items():
        path = kept_checkpoint(config, trial, layout)
        if path is None:
            continue
        params = from_params(trial.params, config)
        if config.objective:
            # Only the user's objective knows its metrics: it scores the loaded checkpoint.
            scores[arch] = objective.score_checkpoint(
                config, path, params, dataset, torch.device("cpu"),
            )[on_split(config.study.metric, "test")]
            continue
        model = load_model(path, map_location="cpu")
        evaluator = study_evaluator(config, dataset.task, params.loss)
        scores[arch] = evaluator(model, test)[base_of(config.study.metric)]
    return scores


class _Retrain(NamedTuple):
    architecture: str
    seed: int
    value: float


def _pin(device: str, threads: int) -> None:
    """Set up a retrain process once: its device and torch threads, for every job it runs."""
    torch.set_num_threads(threads)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))


def _retrain(config: StudyConfig, architecture: str, params: dict[str, Any], seed: int,
             device: str, slots_on_device: int, cache_dir: str) -> _Retrain:
    dataset = data_mod.load(config.data, Path(cache_dir))
    on = torch.device(device)
    in_memory = data_mod.keep_in_memory(dataset, config.data.in_memory, on, slots_on_device)
    retrain = objective.train_and_test if config.objective else train_and_test
    scores = retrain(config, from_params(params, config), dataset, on, seed, in_memory=in_memory)
    return _Retrain(architecture, seed, float(scores[on_split(config.study.metric, "test")]))


def seed_retrains(
    config: StudyConfig,
    bests: Mapping[str, FrozenTrial],
    slots: list[Slot],
    cache_dir: Path,
    on_progress: Progress | None = None,
) -> dict[str, list[float]]:
    """Retrain each best configuration with ``report.seeds`` fresh seeds, in parallel.

    Args:
        config: The study's config.
        bests: Each architecture's best trial (whose parameters are retrained).
        slots: Device slots: as many retrains run at once, each on the device of the slot
            it was dealt (round robin).
        cache_dir: The study's data cache.
        on_progress: Called before the retrains start and as each one finishes.

    Returns:
        Architecture -> test metric of each retrain, in seed order.

    Raises:
        KeyboardInterrupt, Interrupted: Propagated as soon as they reach the main thread;
            the retrains still running are stopped first.
    """
    n = config.report.seeds
    if n == 0 or not bests:
        return {arch: [] for arch in bests}
    jobs = [(arch, SEED_BASE + i) for arch in bests for i in range(n)]
    report = on_progress or (lambda _text: None)
    report(f"report: retraining each architecture's best with {n} seeds on "
           f"{min(len(slots), len(jobs))} slots")
    out: dict[str, dict[int, float]] = {arch: {} for arch in bests}
    # Slots on a Dask cluster retrain there, each on its own Dask worker.
    start = _cluster_retrains if any(s.address for s in slots) else _start_retrains
    results = start(config, bests, jobs, slots, cache_dir)
    try:
        for done, result in enumerate(results, start=1):
            out[result.architecture][result.seed] = result.value
            report(f"report: seed retrain {done}/{len(jobs)} done "
                   f"({result.architecture}, seed {result.seed})")
    finally:
        _stop(results)
    return {arch: [values[seed] for seed in sorted(values)] for arch, values in out.items()}


def _start_retrains(config: StudyConfig, bests: Mapping[str, FrozenTrial],
                    jobs: list[tuple[str, int]], slots: list[Slot],
                    cache_dir: Path) -> Generator[_Retrain, None, None]:
    """Start the retrains; each result is yielded as it finishes, in no particular order.

    One process per slot (at most one per job), pinned to the slot's device once and fed one
    job at a time over its own pipe, so a process only ever touches its device. Closing the
    generator kills the processes still running (a stop abandons their work).
    """
    on_device = {s.device: sum(o.device == s.device for o in slots) for s in slots}
    pending = deque(jobs)
    ctx = loky_context("loky")  # fresh interpreters: CUDA does not survive a fork
    procs: list[tuple[BaseProcess, Connection]] = []
    busy: dict[Connection, tuple[str, int]] = {}

    def hand(conn: Connection) -> None:
        arch, seed = job = pending.popleft()
        conn.send((config, arch, dict(bests[arch].params), seed, str(cache_dir)))
        busy[conn] = job

    try:
        for slot in slots[: len(jobs)]:
            here, there = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_retrain_process, name=f"hpsearch-retrain-{slot.index}",
                               args=(there, slot.device, slot.threads, on_device[slot.device]))
            # The parent decides what Ctrl-C means (it kills them): none dies of it half
            # started. Recorded first: a Ctrl-C held over the start is raised as it ends.
            procs.append((proc, here))
            with stop_signals_held():
                proc.start()
            there.close()
            hand(here)
        while busy:
            for conn in mp_wait(list(busy)):
                arch, seed = busy.pop(conn)  # type: ignore[index]
                try:
                    outcome = conn.recv()  # type: ignore[union-attr]
                except EOFError:
                    raise RuntimeError(f"the seed retrain of {arch} (seed {seed}) died") from None
                if outcome[0] == "error":
                    raise RuntimeError(f"the seed retrain of {arch} (seed {seed}) failed: "
                                       f"{outcome[1]}\n{outcome[2]}")
                if pending:
                    hand(conn)  # type: ignore[arg-type]
                yield outcome[1]
    finally:
        for proc, conn in procs:
            conn.close()  # an idle process reads the end of its pipe and returns
            if proc.pid is None:
                continue  # never started
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            proc.join()


def _cluster_retrains(config: StudyConfig, bests: Mapping[str, FrozenTrial],
                      jobs: list[tuple[str, int]], slots: list[Slot],
                      cache_dir: Path) -> Generator[_Retrain, None, None]:
    """The retrains on the Dask workers of ``slots``, one fresh process per retrain; results
    as they finish. Closing the generator kills the ones still running."""
    from hpsearch.workers import dask_cluster  # only a run on a cluster imports Dask

    assert config.resources.scheduler is not None
    # Slots that share a device share it only on their own Dask worker.
    sharing = Counter((s.address, s.device) for s in slots)
    # The cache path is the parent's: a Dask worker on another host builds the data itself.
    work = [(config, arch, dict(bests[arch].params), seed, str(cache_dir), sharing)
            for arch, seed in jobs]
    results = dask_cluster.run_jobs(config.resources.scheduler, slots, _retrain_job, work)
    try:
        for (_, arch, _, seed, _, _), outcome in results:
            if outcome[0] != "ok":
                raise RuntimeError(f"the seed retrain of {arch} (seed {seed}) "
                                   f"{'failed' if outcome[0] == 'error' else 'died'}: "
                                   + "\n".join(str(x) for x in outcome[1:]))
            yield outcome[1]
    finally:
        results.close()


def _retrain_job(config: StudyConfig, arch: str, params: dict[str, Any], seed: int,
                 cache_dir: str, sharing: Counter[tuple[str | None, str]], slot: Slot,
                 conn: Connection) -> None:
    """One retrain in a fresh process on a Dask worker: pin the slot, train, send the result."""
    try:
        _pin(slot.device, slot.threads)
        outcome: tuple[Any, ...] = ("ok", _retrain(config, arch, params, seed, slot.device,
                                                   sharing[(slot.address, slot.device)],
                                                   cache_dir))
    except Exception as err:  # reported to the parent, which raises it
        outcome = ("error", f"{type(err).__name__}: {err}", traceback.format_exc())
    conn.send(outcome)


def _retrain_process(conn: Connection, device: str, threads: int, slots_on_device: int) -> None:
    """A retrain process: pin the device once, then run the jobs it is handed until the pipe
    closes."""
    ignore_stop_signals()
    _pin(device, threads)
    while True:
        try:
            config, arch, params, seed, cache_dir = conn.recv()
        except EOFError:
            return
        try:
            outcome: tuple[Any, ...] = ("ok", _retrain(config, arch, params, seed, device,
                                                       slots_on_device, cache_dir))
        except Exception as err:  # reported to the parent, which raises it
            outcome = ("error", f"{type(err).__name__}: {err}", traceback.format_exc())
        conn.send(outcome)


def _stop(results: Generator[_Retrain, None, None]) -> None:
    """Stop the retrains still running (a no-op once every result was read)."""
    results.close()
