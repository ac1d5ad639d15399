"""The report's measurements: test-split scores of each architecture's best checkpoint, and
seed retrains of each architecture's best configuration.

This is the only place the test split is used, and nothing here feeds back into selection.
Retrains run in parallel, one per device slot of the run (joblib processes pinned to the
slot's device, torch threads split as for the workers).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import torch
from joblib import Parallel, delayed
from optuna.trial import FrozenTrial, TrialState

from hpsearch import data as data_mod
from hpsearch.config import StudyConfig
from hpsearch.data import DeviceBatches
from hpsearch.loading import load_model
from hpsearch.space import from_params
from hpsearch.train import evaluate, train_and_test
from hpsearch.workers import Slot

SEED_BASE = 1_000_000  # far from trial seeds (train.seed + trial number)


def test_metric_name(metric: str) -> str:
    """``val_acc`` -> ``test_acc``; ``train_loss`` -> ``test_loss``."""
    return "test_" + metric.split("_", 1)[1]


def architecture_bests(study: optuna.Study, minimize: bool) -> dict[str, FrozenTrial]:
    """Each architecture's best COMPLETE trial, or its best PRUNED one when none completed."""
    def value(t: FrozenTrial) -> float | None:
        v = t.value if t.state == TrialState.COMPLETE else t.user_attrs.get("best_value")
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    best: dict[str, FrozenTrial] = {}
    for state in (TrialState.COMPLETE, TrialState.PRUNED):
        found: dict[str, FrozenTrial] = {}
        for t in study.get_trials(deepcopy=False, states=(state,)):
            arch, v = str(t.params.get("architecture")), value(t)
            if arch in best or v is None:
                continue
            cur = found.get(arch)
            if cur is None or (v < value(cur) if minimize else v > value(cur)):
                found[arch] = t
        best.update(found)
    return best


def score_checkpoints(
    results_dir: Path, bests: dict[str, FrozenTrial], dataset: data_mod.Dataset, metric: str
) -> dict[str, float]:
    """Test metric of each architecture's best checkpoint (those still on disk)."""
    test = DeviceBatches(dataset, "test", torch.device("cpu"), in_memory=True)
    key = test_metric_name(metric).removeprefix("test_")
    out = {}
    for arch, trial in bests.items():
        rel = trial.user_attrs.get("checkpoint")
        if not rel or not (results_dir / rel).exists():
            continue
        model = load_model(results_dir / rel, map_location="cpu")
        out[arch] = evaluate(model, test, dataset.task)[key]
    return out


def _retrain(config: StudyConfig, params: dict[str, Any], seed: int, device: str,
             threads: int, cache_dir: str) -> float:
    torch.set_num_threads(threads)
    dataset = data_mod.load(config.data, Path(cache_dir))
    scores = train_and_test(config, from_params(params, config), dataset, torch.device(device),
                            seed)
    return scores[test_metric_name(config.study.metric)]


def seed_retrains(
    config: StudyConfig, bests: dict[str, FrozenTrial], slots: list[Slot], cache_dir: Path
) -> dict[str, list[float]]:
    """Retrain each best configuration with ``report.seeds`` fresh seeds, in parallel."""
    n = config.report.seeds
    if n == 0 or not bests:
        return {arch: [] for arch in bests}
    jobs = [(arch, SEED_BASE + i) for arch in bests for i in range(n)]
    results = Parallel(n_jobs=len(slots), backend="loky")(
        delayed(_retrain)(
            config, bests[arch].params, seed, slots[k % len(slots)].device,
            slots[k % len(slots)].threads, str(cache_dir),
        )
        for k, (arch, seed) in enumerate(jobs)
    )
    out: dict[str, list[float]] = {arch: [] for arch in bests}
    for (arch, _), value in zip(jobs, results):
        out[arch].append(float(value))
    return out


def make_report(config: StudyConfig, study: optuna.Study, results_dir: Path,
                slots: list[Slot]) -> dict[str, Path]:
    """Measure, compute and write the report files into ``results_dir``."""
    from hpsearch.report import compute_report, write_report

    bests = architecture_bests(study, config.minimize)
    dataset = data_mod.load(config.data, results_dir / "data")
    tests = score_checkpoints(results_dir, bests, dataset, config.study.metric)
    seeds = seed_retrains(config, bests, slots, results_dir / "data")
    data = compute_report(
        study,
        metric=config.study.metric,
        test_metric_name=test_metric_name(config.study.metric),
        test_metrics=tests,
        seed_metrics=seeds,
        top_n=config.report.top_n,
        results_dir=results_dir,
    )
    return write_report(data, study, results_dir)
