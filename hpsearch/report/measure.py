"""The report's measurements: test-split scores of each architecture's best checkpoint, and
seed retrains of each architecture's best configuration.

This is the only place the test split is used, and nothing here feeds back into selection.
Retrains run in parallel, one per device slot of the run (joblib processes pinned to the
slot's device, torch threads split as for the workers); results arrive as they finish, and a
Ctrl-C in the main thread stops them at once (joblib kills its workers and the interrupt
propagates).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import optuna
import torch
from joblib import Parallel, delayed
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


def _retrain(config: StudyConfig, architecture: str, params: dict[str, Any], seed: int,
             slot: Slot, cache_dir: str) -> _Retrain:
    torch.set_num_threads(slot.threads)
    dataset = data_mod.load(config.data, Path(cache_dir))
    scores = train_and_test(config, from_params(params, config), dataset,
                            torch.device(slot.device), seed)
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
    """Start the retrains; each result is yielded as it finishes, in no particular order."""
    parallel = Parallel(n_jobs=min(len(slots), len(jobs)), backend="loky",
                        return_as="generator_unordered")
    return parallel(
        delayed(_retrain)(config, arch, dict(bests[arch].params), seed, slots[k % len(slots)],
                          str(cache_dir))
        for k, (arch, seed) in enumerate(jobs)
    )


def _stop(results: Generator[_Retrain, None, None]) -> None:
    """Stop the retrains still running (a no-op once every result was read)."""
    with warnings.catch_warnings():
        # joblib warns that cancelled retrains went "unused": cancelling them is the point.
        warnings.simplefilter("ignore", UserWarning)
        results.close()
