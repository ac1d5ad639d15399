"""The report's measurements: test-split scores of each architecture's best checkpoint, and
seed retrains of each architecture's best configuration.

This is the only place the test split is used, and nothing here feeds back into selection.
Retrains run in parallel, one per device slot of the run: each device has its own pool of
processes, each pinned to that device (and to the slot's torch threads) for its whole life, so
no process ever builds a CUDA context on a second GPU. Results arrive as they finish, and a
Ctrl-C in the main thread stops them at once (the pools' processes are killed and the
interrupt propagates).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any, NamedTuple

import optuna
import torch
from joblib.externals.loky import ProcessPoolExecutor
from optuna.trial import FrozenTrial

from hpsearch import attrs, ranking
from hpsearch import data as data_mod
from hpsearch.checkpoint.loading import load_model
from hpsearch.config import StudyConfig
from hpsearch.data import DeviceBatches
from hpsearch.metrics import base_of, on_split
from hpsearch.results import ResultsLayout
from hpsearch.space import from_params
from hpsearch.train import evaluate, train_and_test
from hpsearch.workers.slots import Slot
from hpsearch.workers.supervisor import stop_signals_held

SEED_BASE = 1_000_000  # far from trial seeds (train.seed + trial number)

Progress = Callable[[str], None]


class Measurements(NamedTuple):
    """What :func:`measure` found, keyed by architecture (the inputs of ``compute_report``)."""

    test_metric_name: str
    test_metrics: dict[str, float]
    """Test metric of each architecture's best checkpoint (those still on disk)."""
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
        test_metrics=score_checkpoints(layout, bests, dataset, config.study.metric),
        seed_metrics=seed_retrains(config, bests, slots, layout.data_cache, on_progress),
    )


def score_checkpoints(
    layout: ResultsLayout, bests: Mapping[str, FrozenTrial], dataset: data_mod.Dataset,
    metric: str,
) -> dict[str, float]:
    """Test metric of each architecture's best checkpoint (those still on disk)."""
    test = DeviceBatches(dataset, "test", torch.device("cpu"), in_memory=True)
    scores = {}
    for arch, trial in bests.items():
        relative = trial.user_attrs.get(attrs.CHECKPOINT)
        if not relative or not (layout.root / relative).exists():
            continue
        model = load_model(layout.root / relative, map_location="cpu")
        scores[arch] = evaluate(model, test, dataset.task)[base_of(metric)]
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
    scores = train_and_test(config, from_params(params, config), dataset, on, seed,
                            in_memory=in_memory)
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
    results = _start_retrains(config, bests, jobs, slots, cache_dir)
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

    Jobs are dealt to the slots round robin; each goes to the pool of its slot's device, whose
    processes run only that device's jobs. Closing the generator kills the pools.
    """
    on_device = {s.device: sum(o.device == s.device for o in slots) for s in slots}
    threads = {s.device: s.threads for s in slots}
    queues: dict[str, deque[tuple[str, int]]] = {}
    for k, job in enumerate(jobs):
        queues.setdefault(slots[k % len(slots)].device, deque()).append(job)
    pools: dict[str, ProcessPoolExecutor] = {}
    running: dict[Future[_Retrain], str] = {}

    def submit_next(device: str) -> None:
        arch, seed = queues[device].popleft()
        # A submit may start the pool's processes. The parent decides what Ctrl-C means (it
        # kills them): they start with it ignored, so none dies of it half started.
        with stop_signals_held():
            future = pools[device].submit(_retrain, config, arch, dict(bests[arch].params),
                                          seed, device, on_device[device], str(cache_dir))
        running[future] = device

    try:
        for device, queue in queues.items():
            workers = min(on_device[device], len(queue))
            pools[device] = ProcessPoolExecutor(max_workers=workers, initializer=_pin,
                                                initargs=(device, threads[device]))
            # One job waiting per pool, no more than its call queue holds (see _handed_over).
            for _ in range(min(len(queue), workers + 1)):
                submit_next(device)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                device = running.pop(future)
                if queues[device]:
                    submit_next(device)
                yield future.result()
    finally:
        _handed_over(running)
        for pool in pools.values():
            pool.shutdown(wait=True, kill_workers=True)


def _handed_over(futures: Iterable[Future[Any]], timeout: float = 1.0) -> None:
    """Wait (briefly) until each job has reached its pool's call queue (is running or done).

    loky's shutdown that kills the workers fails in its manager thread on a job submitted
    but not yet handed over; with no more jobs in flight than that queue holds, they all are
    within milliseconds.
    """
    end = time.monotonic() + timeout
    while any(not (f.running() or f.done()) for f in futures) and time.monotonic() < end:
        time.sleep(0.01)


def _stop(results: Generator[_Retrain, None, None]) -> None:
    """Stop the retrains still running (a no-op once every result was read)."""
    results.close()
