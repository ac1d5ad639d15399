"""Measure, compute and write a study's report: the one call the run and the command line make."""

from __future__ import annotations

from pathlib import Path

import optuna

from hpsearch.config import StudyConfig
from hpsearch.report.compute import compute_report
from hpsearch.report.measure import Progress, measure
from hpsearch.report.render import write_report
from hpsearch.results import ResultsLayout
from hpsearch.sampling import within_architecture
from hpsearch.workers.slots import Slot


def build_report(
    config: StudyConfig,
    study: optuna.Study,
    layout: ResultsLayout,
    slots: list[Slot],
    on_progress: Progress | None = None,
) -> dict[str, Path]:
    """Write the report of ``study`` into its results folder.

    Scores each architecture's representative checkpoint on the test split, retrains its
    configuration with ``config.report.seeds`` fresh seeds over ``slots``, computes the report
    data and writes ``report.html``, ``report.md``, ``architectures.csv`` and ``trials.csv``.

    Args:
        config: The study's config.
        study: The stored study (read only; the report never changes it).
        layout: The study's results folder.
        slots: Device slots for the seed retrains.
        on_progress: Called with one line of text before the seed retrains and as each one
            finishes, e.g. ``report: seed retrain 3/12 done (gru, seed 1000001)``.

    Returns:
        ``{"html", "markdown", "architectures_csv", "trials_csv"}`` -> path written.

    Raises:
        FileWriteError: A report file could not be written; the message names it.
        KeyboardInterrupt, Interrupted: A Ctrl-C reached the main thread; the retrains still
            running were stopped and nothing was written after it.
    """
    measured = measure(config, study, layout, slots, on_progress)
    data = compute_report(
        study,
        metric=config.study.metric,
        test_metric_name=measured.test_metric_name,
        test_metrics=measured.test_metrics,
        seed_metrics=measured.seed_metrics,
        top_n=config.report.top_n,
        results_dir=layout.root,
        min_trials=config.study.min_trials_per_architecture,
        prune_within_architecture=config.study.prune_within_architecture,
        min_trials_to_prune=config.study.min_trials_to_prune,
        sample_within_architecture=within_architecture(config),
    )
    return write_report(data, study, layout)
