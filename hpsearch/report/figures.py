"""Report data -> plotly figures; drawing only.

Every function here takes data computed by :mod:`hpsearch.report.compute` and returns a
``plotly.graph_objects.Figure``; none of them reads a study. :func:`draw_figures` draws the
report's figures in page order, as :class:`FigureSection` entries that carry a note instead of a
figure when there is nothing to draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from hpsearch.report.data import (
    ArchitectureEffort,
    Importances,
    IntermediateCurve,
    LearningCurve,
    OptimizationHistory,
    ParallelCoordinates,
    ReportData,
    Timeline,
    ValuePoints,
)

__all__ = [
    "FigureSection",
    "architecture_colors",
    "draw_figures",
    "plot_importances",
    "plot_intermediate_values",
    "plot_learning_curves",
    "plot_optimization_history",
    "plot_parallel_coordinates",
    "plot_search_effort",
    "plot_timeline",
    "plot_values_by_architecture",
]

_TEMPLATE = "plotly_white"
_MARGIN = {"l": 60, "r": 30, "t": 40, "b": 50}
_STATE_PATTERN = {"COMPLETE": "", "PRUNED": "/", "FAIL": "x", "RUNNING": ".", "WAITING": "."}


class FigureSection(NamedTuple):
    """One figure of the report, with its heading; ``figure`` is None when skipped."""

    key: str
    """Stable identifier, used for the page anchor and the figure's div id."""
    title: str
    description: str
    figure: go.Figure | None
    note: str | None
    """Why the figure is missing, or a caveat about it."""


def architecture_colors(architectures: Sequence[str]) -> dict[str, str]:
    """One color per architecture, the same in every figure."""
    palette = qualitative.Plotly + qualitative.D3
    return {name: palette[i % len(palette)] for i, name in enumerate(architectures)}


def draw_figures(data: ReportData) -> list[FigureSection]:
    """Draw every figure of the report, in page order.

    Args:
        data: Report data from :func:`hpsearch.report.compute.compute_report`.

    Returns:
        One section per figure; a section whose figure cannot be drawn carries a note instead.
    """
    colors = architecture_colors(data.architecture_names)
    has_complete = data.counts.complete > 0
    no_complete = None if has_complete else "No complete trials yet."
    sections = [
        FigureSection(
            "values",
            f"Validation {data.metric} of every trial, by architecture",
            "Each point is one complete trial; boxes show the quartiles.",
            plot_values_by_architecture(data.value_points, data.metric, colors)
            if has_complete
            else None,
            no_complete,
        ),
        _effort_section(data, colors),
        _learning_curves_section(data, colors),
        FigureSection(
            "history",
            "Optimization history",
            f"{data.metric} of each complete trial in trial order, and the best so far.",
            plot_optimization_history(data.history, data.metric, colors) if has_complete else None,
            no_complete,
        ),
        FigureSection(
            "intermediate",
            "Intermediate values",
            f"{data.metric} reported per epoch by every trial; pruned trials dotted, their last "
            "report marked ×.",
            plot_intermediate_values(data.intermediate, data.metric, colors)
            if data.intermediate
            else None,
            None if data.intermediate else "No trial has reported an intermediate value.",
        ),
        _importances_section(data),
        _parallel_section(data),
        FigureSection(
            "timeline",
            "Timeline of trials per worker and device",
            "One row per worker and device, labelled with its busy share of the study's "
            "wall time; gaps are idle time.",
            plot_timeline(data.timeline, colors) if data.timeline.bars else None,
            None if data.timeline.bars else "No trial has started.",
        ),
    ]
    return sections


def _effort_section(data: ReportData, colors: Mapping[str, str]) -> FigureSection:
    drawn = [e for e in data.effort if e.times]
    under = data.exploration.under_explored
    note = None
    if under:
        note = "Under-explored: " + ", ".join(under) + "."
    return FigureSection(
        "effort",
        "Search effort per architecture",
        "Trials and epochs each architecture has had, cumulative, by the time each trial "
        "finished (a running trial counts at the report time); a starved architecture stays "
        "flat.",
        plot_search_effort(drawn, colors) if drawn else None,
        note if drawn else "No trial has finished yet.",
    )


def _learning_curves_section(data: ReportData, colors: Mapping[str, str]) -> FigureSection:
    curves = [c for c in data.learning_curves if c.epochs]
    missing = [c.architecture for c in data.learning_curves if not c.epochs]
    note = None
    if not data.learning_curves:
        note = "No trial has finished with a value yet."
    elif missing:
        note = "No per-epoch history recorded for: " + ", ".join(missing) + "."
    return FigureSection(
        "learning-curves",
        "Learning curves of each architecture's representative",
        f"Train (solid) and validation (dashed) loss, and validation {data.metric}, per epoch; "
        "the star marks the best epoch.",
        plot_learning_curves(curves, data.metric, colors) if curves else None,
        note,
    )


def _importances_section(data: ReportData) -> FigureSection:
    drawn = [imp for imp in data.importances if imp.items]
    notes = [f"{imp.scope}: {imp.note}" for imp in data.importances if imp.note]
    return FigureSection(
        "importances",
        "Parameter importances, overall and per architecture",
        "PED-ANOVA importances (Optuna's default evaluator) of reaching the top 10% of "
        "complete trials; each panel sums to 1.",
        plot_importances(drawn) if drawn else None,
        " ".join(notes) or None,
    )


def _parallel_section(data: ReportData) -> FigureSection:
    drawn = [pc for pc in data.parallel if pc.values]
    notes = [f"{pc.scope}: {pc.note}." for pc in data.parallel if pc.note]
    return FigureSection(
        "parallel",
        "Parallel coordinates",
        f"Each line is one complete trial, colored by {data.metric}; pick the architecture in "
        "the menu. Drag along an axis to filter.",
        plot_parallel_coordinates(drawn, data.metric, maximize=data.maximize) if drawn else None,
        " ".join(notes) or None,
    )


def plot_values_by_architecture(
    points: Sequence[ValuePoints], metric: str, colors: Mapping[str, str]
) -> go.Figure:
    """Box plot with every trial shown as a point, one box per architecture."""
    fig = go.Figure()
    for p in points:
        if not p.values:
            continue
        fig.add_trace(
            go.Box(
                y=list(p.values),
                name=p.architecture,
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker={"color": colors.get(p.architecture), "size": 7, "opacity": 0.75},
                line={"color": colors.get(p.architecture)},
                customdata=list(p.trial_numbers),
                hovertemplate=f"trial %{{customdata}}<br>{metric} %{{y:.4g}}<extra></extra>",
            )
        )
    fig.update_layout(
        template=_TEMPLATE, height=420, margin=_MARGIN, showlegend=False, yaxis_title=metric
    )
    return fig


def plot_search_effort(
    efforts: Sequence[ArchitectureEffort], colors: Mapping[str, str]
) -> go.Figure:
    """Cumulative trials (left) and epochs (right) over time, one step line per
    architecture."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("trials", "epochs trained"),
                        horizontal_spacing=0.1)
    for e in efforts:
        color = colors.get(e.architecture)
        times = [t.isoformat() for t in e.times]
        custom = [[n, state.lower()] for n, state in zip(e.trial_numbers, e.states)]
        for col, values, what in ((1, e.trials, "trials"), (2, e.epochs, "epochs")):
            fig.add_trace(
                go.Scatter(
                    x=times, y=list(values), mode="lines+markers", name=e.architecture,
                    legendgroup=e.architecture, showlegend=col == 1,
                    line={"color": color, "shape": "hv"}, marker={"size": 5},
                    customdata=custom,
                    hovertemplate=f"{e.architecture}<br>%{{x}}<br>{what} %{{y}}<br>after trial "
                    "%{customdata[0]} (%{customdata[1]})<extra></extra>",
                ),
                row=1, col=col,
            )
    fig.update_xaxes(type="date")
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(template=_TEMPLATE, height=420, margin=_MARGIN, legend_title="architecture")
    return fig


def plot_learning_curves(
    curves: Sequence[LearningCurve], metric: str, colors: Mapping[str, str]
) -> go.Figure:
    """Loss (train and val) and the validation metric per epoch, one color per architecture."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", metric), horizontal_spacing=0.1)
    for c in curves:
        color = colors.get(c.architecture)
        label = f"{c.architecture} (trial {c.trial_number})"
        epochs = list(c.epochs)
        for values, dash, part in ((c.train_loss, "solid", "train"), (c.val_loss, "dash", "val")):
            fig.add_trace(
                go.Scatter(
                    x=epochs, y=_plotly_values(values), mode="lines", name=label,
                    legendgroup=c.architecture, showlegend=part == "train",
                    line={"color": color, "dash": dash},
                    hovertemplate=f"{label}<br>epoch %{{x}}<br>{part} loss %{{y:.4g}}"
                    "<extra></extra>",
                ),
                row=1, col=1,
            )
        fig.add_trace(
            go.Scatter(
                x=epochs, y=_plotly_values(c.metric), mode="lines+markers", name=label,
                legendgroup=c.architecture, showlegend=False,
                line={"color": color}, marker={"size": 4},
                hovertemplate=f"{label}<br>epoch %{{x}}<br>{metric} %{{y:.4g}}<extra></extra>",
            ),
            row=1, col=2,
        )
        if c.best_epoch is not None and c.best_epoch in c.epochs:
            i = c.epochs.index(c.best_epoch)
            fig.add_trace(
                go.Scatter(
                    x=[c.best_epoch], y=_plotly_values([c.metric[i]]), mode="markers",
                    legendgroup=c.architecture, showlegend=False, name=f"{label} best",
                    marker={"symbol": "star", "size": 14, "color": color,
                            "line": {"color": "black", "width": 1}},
                    hovertemplate=f"{label}<br>best epoch %{{x}}<br>{metric} %{{y:.4g}}"
                    "<extra></extra>",
                ),
                row=1, col=2,
            )
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(template=_TEMPLATE, height=440, margin=_MARGIN,
                      legend_title="representative")
    return fig


def plot_optimization_history(
    history: OptimizationHistory, metric: str, colors: Mapping[str, str]
) -> go.Figure:
    """Each complete trial's value in trial order, colored by architecture, and the best so far."""
    fig = go.Figure()
    for arch in dict.fromkeys(history.architectures):
        idx = [i for i, a in enumerate(history.architectures) if a == arch]
        fig.add_trace(
            go.Scatter(
                x=[history.trial_numbers[i] for i in idx],
                y=[history.values[i] for i in idx],
                mode="markers",
                name=arch,
                marker={"color": colors.get(arch), "size": 8, "opacity": 0.8},
                hovertemplate=f"{arch}<br>trial %{{x}}<br>{metric} %{{y:.4g}}<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=list(history.trial_numbers),
            y=list(history.best_so_far),
            mode="lines",
            line={"shape": "hv", "color": "#222", "width": 2},
            name="best so far",
        )
    )
    fig.update_layout(
        template=_TEMPLATE, height=420, margin=_MARGIN, xaxis_title="trial", yaxis_title=metric
    )
    return fig


def plot_intermediate_values(
    curves: Sequence[IntermediateCurve], metric: str, colors: Mapping[str, str]
) -> go.Figure:
    """Per-epoch reports of every trial; pruned trials dotted and their last report marked ×.

    Trials of one architecture and state share a trace (separated by gaps) so that a study of
    hundreds of trials stays quick to render.
    """
    fig = go.Figure()
    groups: dict[tuple[str, str], list[IntermediateCurve]] = {}
    for c in curves:
        state = "PRUNED" if c.state == "PRUNED" else "other"
        groups.setdefault((c.architecture, state), []).append(c)
    for (arch, state), members in groups.items():
        xs: list[float | None] = []
        ys: list[float | None] = []
        numbers: list[int | None] = []
        for c in members:
            xs += [*c.steps, None]
            ys += [*_plotly_values(c.values), None]
            numbers += [c.trial_number] * len(c.steps) + [None]
        pruned = state == "PRUNED"
        fig.add_trace(
            go.Scatter(
                x=xs, y=ys, mode="lines", customdata=numbers, connectgaps=False,
                name=f"{arch} ({'pruned' if pruned else 'not pruned'})",
                legendgroup=arch,
                line={"color": colors.get(arch), "width": 1, "dash": "dot" if pruned else "solid"},
                opacity=0.6 if pruned else 0.9,
                hovertemplate=f"{arch}<br>trial %{{customdata}}<br>epoch %{{x}}<br>"
                f"{metric} %{{y:.4g}}<extra></extra>",
            )
        )
        if pruned:
            fig.add_trace(
                go.Scatter(
                    x=[c.steps[-1] for c in members],
                    y=_plotly_values([c.values[-1] for c in members]),
                    customdata=[c.trial_number for c in members],
                    mode="markers", name=f"{arch} pruned here", legendgroup=arch,
                    marker={"symbol": "x", "size": 8, "color": colors.get(arch)},
                    hovertemplate=f"{arch}<br>trial %{{customdata}} pruned after epoch %{{x}}"
                    "<extra></extra>",
                )
            )
    fig.update_layout(
        template=_TEMPLATE, height=440, margin=_MARGIN, xaxis_title="epoch", yaxis_title=metric
    )
    return fig


def plot_importances(importances: Sequence[Importances]) -> go.Figure:
    """One horizontal bar panel per scope (overall first), most important parameter on top."""
    gap_px = 70
    heights = [30 + 26 * len(imp.items) for imp in importances]
    plot_px = sum(heights) + gap_px * (len(importances) - 1)
    fig = make_subplots(
        rows=len(importances),
        cols=1,
        row_heights=heights,
        subplot_titles=[f"{imp.scope} ({imp.n_trials} trials)" for imp in importances],
        vertical_spacing=gap_px / plot_px,
    )
    for row, imp in enumerate(importances, start=1):
        names = [name for name, _ in reversed(imp.items)]
        values = [value for _, value in reversed(imp.items)]
        fig.add_trace(
            go.Bar(
                x=values, y=names, orientation="h", showlegend=False, marker_color="#4c78a8",
                text=[f"{v:.2f}" for v in values], textposition="outside",
                hovertemplate="%{y}: %{x:.3f}<extra></extra>",
            ),
            row=row, col=1,
        )
        fig.update_xaxes(range=[0, 1.1], row=row, col=1)
    margin = {"l": 110, "r": 30, "t": 40, "b": 40}
    fig.update_layout(template=_TEMPLATE, height=plot_px + 80, margin=margin)
    return fig


def plot_parallel_coordinates(
    scopes: Sequence[ParallelCoordinates], metric: str, *, maximize: bool
) -> go.Figure:
    """Parallel coordinates of parameters and value, one scope shown at a time.

    All scopes live in one figure behind a menu: each parcoords figure holds WebGL contexts,
    and a browser drops the oldest beyond about sixteen, which would blank plots on a page
    with many architectures.
    """
    fig = go.Figure()
    for i, pc in enumerate(scopes):
        fig.add_trace(_parcoords(pc, metric, maximize=maximize, visible=i == 0))
    if len(scopes) > 1:
        buttons = [
            {
                "label": pc.scope,
                "method": "restyle",
                "args": [{"visible": [j == i for j in range(len(scopes))]}],
            }
            for i, pc in enumerate(scopes)
        ]
        menu = {"buttons": buttons, "direction": "down", "x": 0, "xanchor": "left"}
        fig.update_layout(updatemenus=[{**menu, "y": 1.32, "yanchor": "top"}])
    margin = {"l": 80, "r": 40, "t": 110, "b": 40}
    fig.update_layout(template=_TEMPLATE, height=500, margin=margin)
    return fig


def _parcoords(
    pc: ParallelCoordinates, metric: str, *, maximize: bool, visible: bool
) -> go.Parcoords:
    dimensions = []
    for axis in pc.axes:
        dim: dict[str, object] = {"label": axis.label, "values": _plotly_values(axis.values)}
        if axis.tick_values is not None and axis.tick_labels is not None:
            dim["tickvals"] = list(axis.tick_values)
            dim["ticktext"] = list(axis.tick_labels)
            # Pad the range so a single category does not collapse the axis.
            dim["range"] = [-0.5, max(len(axis.tick_values) - 0.5, 0.5)]
        dimensions.append(dim)
    dimensions.append({"label": metric, "values": list(pc.values)})
    return go.Parcoords(
        name=pc.scope,
        visible=visible,
        dimensions=dimensions,
        line={
            "color": list(pc.values),
            "colorscale": "Viridis",
            # The better end of the scale is bright whatever the direction.
            "reversescale": not maximize,
            "showscale": True,
            # Clear of the value axis' tick labels, which sit right of the last axis.
            "colorbar": {"title": {"text": metric}, "x": 1.06},
        },
    )


def plot_timeline(timeline: Timeline, colors: Mapping[str, str]) -> go.Figure:
    """Gantt chart of trials, one row per (worker, device); pattern marks the trial's state."""
    fig = go.Figure()
    labels = {
        lane.name: lane.name
        + ("" if lane.utilization is None else f" ({lane.utilization:.0%} busy)")
        for lane in timeline.lanes
    }
    groups: dict[tuple[str, str], list] = {}
    for bar in timeline.bars:
        groups.setdefault((bar.architecture, bar.state), []).append(bar)
    for (arch, state), bars in sorted(groups.items()):
        fig.add_trace(
            go.Bar(
                # Horizontal bars on a date axis: base is the start, x the length in ms.
                base=[b.start.isoformat() for b in bars],
                x=[(b.end - b.start).total_seconds() * 1000 for b in bars],
                y=[labels[b.lane] for b in bars],
                orientation="h", name=f"{arch} ({state.lower()})", legendgroup=arch,
                marker={"color": colors.get(arch), "line": {"color": "white", "width": 1},
                        "pattern": {"shape": _STATE_PATTERN.get(state, "")}},
                customdata=[[b.trial_number, b.start.strftime("%H:%M:%S"),
                             b.end.strftime("%H:%M:%S")] for b in bars],
                hovertemplate=f"trial %{{customdata[0]}} · {arch} · {state.lower()}<br>"
                "%{customdata[1]} – %{customdata[2]}<extra></extra>",
            )
        )
    fig.update_layout(
        template=_TEMPLATE,
        height=max(320, 200 + 40 * len(timeline.lanes)),
        margin={"l": 220, "r": 30, "t": 30, "b": 120},
        barmode="overlay",
        legend={"orientation": "h", "y": -0.25, "yanchor": "top"},
        xaxis={"type": "date"},
        yaxis={"categoryorder": "array", "categoryarray": [labels[n] for n in sorted(labels)]},
    )
    return fig


def _plotly_values(values: Sequence[float]) -> list[float | None]:
    # None, not NaN: plotly draws a gap for both, but None keeps the JSON standard.
    return [None if not math.isfinite(v) else v for v in values]
