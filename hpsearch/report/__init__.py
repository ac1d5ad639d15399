"""The architecture comparison report: which architecture, with which settings, is best, and
by how much.

Built the way Optuna's visualizations are, compute then draw, with imports in one direction:

- :mod:`.data`: the report's data types (NamedTuples) and how numbers read as text;
- :mod:`.seeds`: seed-retrain statistics and the gap-vs-noise verdict;
- :mod:`.compute` (with :mod:`.figure_data`): study -> :class:`ReportData`, pure;
- :mod:`.figures`: report data -> plotly figures;
- :mod:`.render`: report data -> ``report.html``, ``report.md`` and two CSV files;
- :mod:`.measure`: the test-split scores and seed retrains the report needs;
- :mod:`.build`: :func:`build_report`, which measures, computes and writes.

``python -m hpsearch.report <study file | results folder>`` rebuilds a report at any time
(:mod:`.__main__`).
"""

from hpsearch.report.build import build_report
from hpsearch.report.compute import compute_report
from hpsearch.report.data import (
    DASH,
    GAP_RULE,
    MIN_TRIALS_FOR_IMPORTANCE,
    UNDER_EXPLORED,
    UNKNOWN_ARCHITECTURE,
    ArchitectureEffort,
    ArchitectureSummary,
    Exploration,
    GapVerdict,
    Importances,
    IntermediateCurve,
    LearningCurve,
    OptimizationHistory,
    ParallelAxis,
    ParallelCoordinates,
    ReportData,
    SeedSummary,
    StateCounts,
    Timeline,
    TimelineBar,
    TimelineLane,
    TrialRow,
    ValuePoints,
    Verdict,
    Winner,
    fmt_best_value,
    fmt_ci,
    fmt_num,
)
from hpsearch.report.figures import FigureSection, draw_figures
from hpsearch.report.measure import Measurements, measure
from hpsearch.report.render import render_report, write_report
from hpsearch.report.seeds import seed_summary, t_quantile_975

__all__ = [
    "DASH",
    "GAP_RULE",
    "MIN_TRIALS_FOR_IMPORTANCE",
    "UNDER_EXPLORED",
    "UNKNOWN_ARCHITECTURE",
    "ArchitectureEffort",
    "ArchitectureSummary",
    "Exploration",
    "FigureSection",
    "GapVerdict",
    "Importances",
    "IntermediateCurve",
    "LearningCurve",
    "Measurements",
    "OptimizationHistory",
    "ParallelAxis",
    "ParallelCoordinates",
    "ReportData",
    "SeedSummary",
    "StateCounts",
    "Timeline",
    "TimelineBar",
    "TimelineLane",
    "TrialRow",
    "ValuePoints",
    "Verdict",
    "Winner",
    "build_report",
    "compute_report",
    "draw_figures",
    "fmt_best_value",
    "fmt_ci",
    "fmt_num",
    "measure",
    "render_report",
    "seed_summary",
    "t_quantile_975",
    "write_report",
]
