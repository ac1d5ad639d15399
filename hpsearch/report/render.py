"""Report data -> ``report.html``, ``report.md``, ``architectures.csv`` and ``trials.csv``.

Everything here reads a :class:`~hpsearch.report.data.ReportData` and nothing else: the tables
are built once as display strings (:func:`architecture_table`, :func:`seed_table`) and shared by
the HTML and Markdown renderings; the figures come from :mod:`hpsearch.report.figures`.
:func:`write_report` renders all four files in memory, then writes each atomically with
:func:`hpsearch.files.atomic_write_text` (so they get the umask's permissions, like any file a
team shares) under the names :data:`hpsearch.results.REPORT_FILES` gives them.
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import optuna
import plotly.io as pio
from plotly.offline import get_plotlyjs

from hpsearch.files import TMP_PREFIX, atomic_write_text, write_error
from hpsearch.report.data import (
    DASH,
    GAP_RULE,
    UNDER_EXPLORED,
    UNKNOWN_ARCHITECTURE,
    ArchitectureSummary,
    ReportData,
    Winner,
    fmt_best_value,
    fmt_ci,
    fmt_num,
)
from hpsearch.report.figures import FigureSection, draw_figures
from hpsearch.results import REPORT_FILES, ResultsLayout

__all__ = [
    "Table",
    "architecture_table",
    "architectures_csv",
    "render_html",
    "render_markdown",
    "render_report",
    "seed_table",
    "trials_csv",
    "write_report",
]

# ---------------------------------------------------------------------------------------------
# Report data -> tables and text
# ---------------------------------------------------------------------------------------------


LEADER = "leader"
"""Row state of the best explored architecture."""


class Table(NamedTuple):
    """A table of display strings, shared by the HTML and Markdown renderings."""

    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    row_states: tuple[str, ...] = ()
    """Per row: :data:`LEADER`, :data:`~hpsearch.report.data.UNDER_EXPLORED` or ``""``; the
    HTML styles the row by it (Markdown reads the ``explored`` column instead)."""
    text_columns: tuple[int, ...] = ()
    """Columns of prose, which the HTML wraps and aligns left."""


def _fmt_int(value: int | None) -> str:
    return DASH if value is None else f"{value:,}"


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt_param(v)}" for k, v in sorted(params.items())) or DASH


def _fmt_param(value: object) -> str:
    if isinstance(value, float):
        return fmt_num(value)
    return str(value)


def _row_state(a: ArchitectureSummary) -> str:
    if a.rank == 1:
        return LEADER
    return "" if a.explored or a.architecture == UNKNOWN_ARCHITECTURE else UNDER_EXPLORED


def _explored_text(a: ArchitectureSummary) -> str:
    if a.explored:
        return "yes"
    label = "not ranked" if a.architecture == UNKNOWN_ARCHITECTURE else UNDER_EXPLORED
    return f"{label}: {a.exploration_note}"


def architecture_table(data: ReportData) -> Table:
    """The per-architecture table as display strings: explored architectures by rank, then
    the under-explored ones, each row with its search effort."""
    show_running = data.counts.running > 0
    headers = ["architecture", "rank", "explored", "trials", "complete", "pruned", "failed"]
    headers += ["running"] if show_running else []
    headers += [
        "epochs trained",
        f"best {data.metric}",
        "best epoch",
        f"top-{data.top_n} median",
        f"top-{data.top_n} IQR",
        f"{data.test_metric_name} (best ckpt)",
        "params",
        "time to best",
        "train time (all trials)",
    ]
    rows = []
    for a in data.architectures:
        counts = [str(a.counts.complete), str(a.counts.pruned), str(a.counts.failed)]
        counts += [str(a.counts.running)] if show_running else []
        n_top = len(a.top_values)
        median = fmt_num(a.top_median)
        if 0 < n_top < data.top_n:
            median += f" (n={n_top})"
        iqr = DASH if a.top_q1 is None else f"{fmt_num(a.top_q1)}–{fmt_num(a.top_q3)}"
        rows.append(
            (
                a.architecture,
                DASH if a.rank is None else str(a.rank),
                _explored_text(a),
                str(a.n_trials),
                *counts,
                _fmt_int(a.total_epochs),
                fmt_best_value(a),
                DASH if a.best_epoch is None else str(a.best_epoch),
                median,
                iqr,
                fmt_num(a.test_metric),
                _fmt_int(a.n_params),
                _fmt_seconds(a.time_to_best),
                _fmt_seconds(a.total_train_seconds),
            )
        )
    states = tuple(_row_state(a) for a in data.architectures)
    return Table(tuple(headers), tuple(rows), states, (headers.index("explored"),))


def seed_table(data: ReportData) -> Table:
    """Seed-retrain confirmation: mean ± 95% CI of the test metric per architecture."""
    headers = (
        "architecture",
        "seeds",
        f"{data.test_metric_name} mean ± 95% CI [low, high]",
        "retrain values",
        f"best {data.metric} config",
    )
    rows = []
    states = []
    for a in data.architectures:
        if a.best_trial is None:
            continue
        states.append(_row_state(a))
        seeds = a.seeds
        count = str(seeds.n)
        if seeds.n != len(seeds.values):
            count += f" of {len(seeds.values)}"
        rows.append(
            (
                a.architecture,
                count,
                fmt_ci(seeds),
                ", ".join(fmt_num(v) for v in seeds.values) or DASH,
                _fmt_params(a.best_params),
            )
        )
    return Table(headers, tuple(rows), tuple(states), (len(headers) - 1,))


def _method_notes(data: ReportData) -> list[str]:
    within = data.exploration.prune_within_architecture
    gate = data.exploration.min_trials_to_prune
    pruning = {
        True: "on: a trial is pruned only by comparison with trials of its own architecture"
        + (f", once that architecture has {gate} finished trials "
           "(study.min_trials_to_prune)" if gate is not None else ""),
        False: "off: a trial is pruned by comparison with trials of every architecture, so a "
        "slow starter can be cut against faster ones",
        None: "unknown (not given to the report)",
    }[within]
    sampling = {
        True: "on: the architecture is sampled over the whole study, the rest of a trial "
        "from trials of its own architecture only",
        False: "off: every parameter is sampled from the trials of every architecture",
        None: "unknown (not given to the report)",
    }[data.exploration.sample_within_architecture]
    min_trials = data.exploration.min_trials
    return [
        "Representative: each architecture is described by its trial with the best "
        f"best-epoch validation {data.metric}, pruned trials included (a pruned trial's value "
        "is its best before it was stopped, marked \"pruned at epoch E\" with the last epoch "
        "it trained), ties to the earlier trial. Its checkpoint gives the test score, its "
        "configuration the seed retrains.",
        f"Under-explored: an architecture with fewer than {max(min_trials, 1)} finished "
        "(complete or pruned) trials, or whose representative was pruned while still "
        "improving (its best epoch was the last it trained), is labelled under-explored with "
        "the reason, left unranked and out of the verdict; the verdict says how many trials "
        "to add and the command that adds them.",
        f"Minimum trials per architecture (study.min_trials_per_architecture): {min_trials}.",
        f"Pruning within architecture (study.prune_within_architecture): {pruning}.",
        f"Sampling within architecture (study.sample_within_architecture, TPE): {sampling}.",
        f"Explored architectures are ranked by their representative's validation "
        f"{data.metric} ({data.direction}); the test split never influences the ranking.",
        "Winner: the study's best complete trial, the model best/ holds; a pruned trial "
        "leaves no final model, so the best explored architecture can differ (the verdict "
        "says so).",
        "Search effort: trials of every state, epochs trained summed over them; best epoch is "
        "the epoch of the representative's best value.",
        f"Top-{data.top_n} median and IQR: over each architecture's {data.top_n} best complete "
        "trials (fewer if it has fewer); IQR is the 25th–75th percentile, linear interpolation.",
        f"{data.test_metric_name} (best ckpt): the test split evaluated once on each "
        "architecture's representative checkpoint, for this report only.",
        "Seed retrains: each architecture's representative configuration trained again with "
        "fresh seeds; mean ± half-width of the 95% Student-t confidence interval (t quantile "
        "with n−1 degrees of freedom × sample std / √n). With a single seed the interval is "
        "n/a; non-finite results are listed but left out.",
        f"Gap vs noise: the gap between the two best explored architectures counts as larger "
        f"than the noise when {GAP_RULE}. This rule is conservative: overlapping intervals do "
        "not prove the architectures equal. Where either one's best checkpoint scored better "
        "on the test split than its retrains' interval, the verdict says that its "
        "configuration did not reproduce with fresh seeds; where most of the leader's "
        "retrains scored worse than every retrain of the runner-up (seeds that split into "
        "good and failed runs give an interval too wide to exclude anything), it says that "
        "the lead did not hold.",
        "Time to best: cumulative training seconds at the end of the representative's best "
        "epoch. Train time sums every trial of the architecture, pruned and failed included.",
    ]


def _verdict_markdown(data: ReportData) -> list[str]:
    lines = [f"**Verdict ({data.gap.verdict}):** {data.verdict.text}", ""]
    exploration = data.exploration
    if exploration.advice is not None and exploration.command is not None:
        lines += [f"**More trials needed:** {exploration.advice}", "",
                  "```sh", exploration.command, "```", ""]
    return lines


def render_markdown(data: ReportData) -> str:
    """The report's tables and verdict as Markdown, for terminals and git."""
    lines = [f"# hpsearch report: {data.study_name}", "", _summary_line(data), ""]
    lines += ["## Winner", ""]
    winner = data.winner
    if winner is None:
        lines += ["No complete trials yet, so there is no winner.", ""]
    else:
        lines += [
            f"- **{winner.architecture}**, trial {winner.trial_number}: best {data.metric} "
            f"{fmt_num(winner.value)} at epoch "
            f"{DASH if winner.best_epoch is None else winner.best_epoch}",
            f"- {data.test_metric_name} of its best checkpoint: {_winner_test_text(winner)}",
            f"- seed retrains ({data.test_metric_name}, 95% CI): {_winner_seeds_text(winner)}",
            f"- params: {_fmt_params(winner.params)}",
            f"- checkpoint: {_checkpoint_text(winner)}",
            f"- load it: `{winner.load_call}`",
            "",
        ]
    lines += ["## Architectures", "", *_markdown_table(architecture_table(data)), ""]
    lines += ["## Confirmation with seeds", ""]
    seeds = seed_table(data)
    lines += [*_markdown_table(seeds), ""] if seeds.rows else []
    lines += _verdict_markdown(data)
    lines += ["## How these numbers are computed", ""]
    lines += [f"- {note}" for note in _method_notes(data)]
    lines += ["", f"Figures are in `{REPORT_FILES['html']}`; every trial is in "
              f"`{REPORT_FILES['trials_csv']}`.", ""]
    return "\n".join(lines)


def _summary_line(data: ReportData) -> str:
    c = data.counts
    running = f", {c.running} running" if c.running else ""
    return (
        f"{data.metric} ({data.direction}) · {c.total} trials: {c.complete} complete, "
        f"{c.pruned} pruned, {c.failed} failed{running} · generated "
        f"{data.generated_at:%Y-%m-%d %H:%M:%S}"
    )


def _winner_test_text(winner: Winner) -> str:
    if winner.representative:
        return fmt_num(winner.test_metric)
    return f"not measured (the report measures {winner.architecture}'s representative)"


def _winner_seeds_text(winner: Winner) -> str:
    if winner.representative:
        return fmt_ci(winner.seeds)
    return f"not run (the report retrains {winner.architecture}'s representative)"


def _checkpoint_text(winner: Winner) -> str:
    if winner.checkpoint is None:
        return "not kept (never saved, or deleted)"
    if winner.checkpoint_path is not None:
        return winner.checkpoint_path
    return f"{winner.checkpoint} (relative to the results folder)"


def _markdown_table(table: Table) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in table.headers) + " |"]
    # Left-align the name column, right-align the numbers.
    lines.append("|:--|" + "--:|" * (len(table.headers) - 1))
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    return lines


def _csv_text(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue()


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def architectures_csv(data: ReportData) -> str:
    """``architectures.csv``: one row per architecture, column ``architecture`` first."""
    m, t = data.metric, data.test_metric_name
    headers = [
        "architecture", "rank", "explored", "exploration_note", "trials", "complete", "pruned",
        "failed", "running", "total_epochs", "best_trial", f"best_{m}", "best_from_pruned",
        "pruned_at_epoch", "best_epoch", "top_n", f"top_median_{m}", f"top_q1_{m}",
        f"top_q3_{m}", t, "seed_n", f"seed_mean_{t}", f"seed_ci95_low_{t}",
        f"seed_ci95_high_{t}", "seed_values", "n_params", "time_to_best_s", "total_train_s",
        "checkpoint", "best_params",
    ]
    rows = [
        [
            a.architecture, a.rank, a.explored, a.exploration_note, a.n_trials,
            a.counts.complete, a.counts.pruned, a.counts.failed, a.counts.running,
            a.total_epochs, a.best_trial, a.best_value, a.from_pruned, a.pruned_at_epoch,
            a.best_epoch, len(a.top_values), a.top_median, a.top_q1, a.top_q3, a.test_metric,
            a.seeds.n, a.seeds.mean, a.seeds.ci_low, a.seeds.ci_high,
            " ".join(repr(v) for v in a.seeds.values), a.n_params, a.time_to_best,
            a.total_train_seconds, a.checkpoint,
            json.dumps(a.best_params, sort_keys=True, default=str) if a.best_params else None,
        ]
        for a in data.architectures
    ]
    return _csv_text(headers, rows)


def trials_csv(data: ReportData) -> str:
    """``trials.csv``: one row per trial, each searched parameter as a ``param_<name>`` column."""
    headers = [
        "number", "architecture", "state", data.metric, "best_epoch", "n_params",
        "train_seconds", "time_to_best_s", "device", "worker", "datetime_start",
        "datetime_complete", "duration_s", "checkpoint", "fail_reason",
        *(f"param_{p}" for p in data.param_names),
    ]
    rows = []
    for t in data.trials:
        duration = None
        if t.datetime_start is not None and t.datetime_complete is not None:
            duration = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append(
            [
                t.number, t.architecture, t.state, t.value, t.best_epoch, t.n_params,
                t.train_seconds, t.time_to_best, t.device, t.worker, _iso(t.datetime_start),
                _iso(t.datetime_complete), duration, t.checkpoint, t.fail_reason,
                *(t.params.get(p) for p in data.param_names),
            ]
        )
    return _csv_text(headers, rows)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
  background:#f5f7fa;color:#1f2933;line-height:1.45}
main{max-width:1240px;margin:0 auto;padding:24px 28px 60px}
h1{margin:0 0 4px;font-size:28px} h2{margin:32px 0 10px;font-size:21px}
h3{margin:0 0 4px;font-size:17px}
.sub{color:#52606d;margin:0 0 18px}
nav a{margin-right:14px;color:#1c64b4;text-decoration:none;font-size:14px}
.card{background:#fff;border-radius:8px;padding:16px 20px;margin:14px 0;
  box-shadow:0 1px 3px rgba(15,23,42,.08)}
.winner{border-left:6px solid #2f9e44}
.winner.none{border-left-color:#adb5bd}
.winner h2{margin-top:0}
.winner dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:8px 0}
.winner dt{color:#52606d} .winner dd{margin:0}
table{border-collapse:collapse;font-size:14px;background:#fff;width:100%}
th,td{padding:6px 10px;border-bottom:1px solid #e4e7eb;text-align:right;white-space:nowrap}
th{background:#eef2f6;font-weight:600;white-space:normal;vertical-align:bottom}
th:first-child,td:first-child{text-align:left}
td.wrap{white-space:normal;text-align:left;min-width:180px}
th.wrap{text-align:left}
tr.leader td{font-weight:600;background:#f1f9f2}
tr.under-explored td{background:#fff8e6;color:#7c5e10}
tr.under-explored td:first-child{box-shadow:inset 4px 0 0 #f0a202}
.badge{display:inline-block;margin-left:8px;padding:1px 7px;border-radius:10px;
  font-size:11px;font-weight:600;letter-spacing:.02em;vertical-align:1px}
.badge.under-explored{background:#f0a202;color:#fff}
.verdict .advice{margin:8px 0 0}
.scroll{overflow-x:auto}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
pre{background:#1f2933;color:#e4e7eb;padding:10px 14px;border-radius:6px;overflow-x:auto}
.verdict{padding:10px 14px;border-radius:6px;margin:12px 0;background:#eef2f6}
.verdict p{margin:0}
.verdict.separated{background:#e6f4ea} .verdict.reversed{background:#fdecea}
.verdict.within-noise{background:#fff4e0}
.note{color:#52606d;font-size:14px}
ul.notes{color:#3e4c59;font-size:14px;padding-left:20px}
.figure .plot{width:100%}
"""


def render_html(data: ReportData, sections: Sequence[FigureSection]) -> str:
    """The whole report as one HTML page that works offline.

    plotly.js is inlined once in the page head; each figure is a div plus a short script, and
    no resource is fetched from the network.

    Args:
        data: The report data.
        sections: Figures drawn by :func:`hpsearch.report.figures.draw_figures`.

    Returns:
        The page.
    """
    esc = html.escape
    title = f"hpsearch report: {data.study_name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body><main>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">{esc(_summary_line(data))}</p>',
        '<nav><a href="#winner">Winner</a><a href="#architectures">Architectures</a>'
        '<a href="#seeds">Seeds</a><a href="#method">Method</a><a href="#figures">Figures</a>'
        + "".join(f'<a href="{esc(name)}">{esc(name)}</a>' for kind, name in REPORT_FILES.items()
                  if kind != "html")
        + "</nav>",
        _winner_html(data),
        '<h2 id="architectures">Architectures</h2>',
        _html_table(architecture_table(data)),
        '<h2 id="seeds">Confirmation with seeds</h2>',
    ]
    seeds = seed_table(data)
    if seeds.rows:
        parts.append(_html_table(seeds))
    parts.append(_verdict_html(data))
    parts += ['<h2 id="method">How these numbers are computed</h2>', '<ul class="notes">']
    parts += [f"<li>{esc(note)}</li>" for note in _method_notes(data)]
    parts += ["</ul>", '<h2 id="figures">Figures</h2>']
    parts += [_figure_html(section) for section in sections]
    parts += ["</main></body></html>", ""]
    return "\n".join(parts)


def _winner_html(data: ReportData) -> str:
    esc = html.escape
    winner = data.winner
    if winner is None:
        return (
            '<section id="winner" class="card winner none"><h2>No winner yet</h2>'
            f'<p class="note">The study has no complete trial.</p>{_verdict_html(data)}'
            "</section>"
        )
    items = [
        ("trial", f"#{winner.trial_number}"),
        (
            f"best {data.metric}",
            f"{fmt_num(winner.value)} at epoch "
            f"{DASH if winner.best_epoch is None else winner.best_epoch}",
        ),
        (f"{data.test_metric_name} (best checkpoint)", _winner_test_text(winner)),
        (f"{data.test_metric_name}, seed retrains (95% CI)", _winner_seeds_text(winner)),
        ("params", _fmt_params(winner.params)),
        ("checkpoint", _checkpoint_text(winner)),
    ]
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items)
    return (
        f'<section id="winner" class="card winner"><h2>Winner: {esc(winner.architecture)}</h2>'
        f"<dl>{rows}</dl>"
        f"<pre><code>import hpsearch\nmodel = {esc(winner.load_call)}</code></pre>"
        f"{_verdict_html(data)}</section>"
    )


def _verdict_html(data: ReportData) -> str:
    esc = html.escape
    gap = data.gap
    css = gap.verdict.replace(" ", "-").replace("/", "")
    parts = [
        f'<div class="verdict {css}"><p><strong>Verdict ({esc(gap.verdict)}):</strong> '
        f"{esc(data.verdict.text)}</p>"
    ]
    exploration = data.exploration
    if exploration.advice is not None and exploration.command is not None:
        parts.append(
            f'<p class="advice"><strong>More trials needed:</strong> '
            f"{esc(exploration.advice)}</p><pre><code>{esc(exploration.command)}</code></pre>"
        )
    parts.append("</div>")
    return "".join(parts)


def _html_table(table: Table) -> str:
    esc = html.escape
    wrap = ' class="wrap"'  # prose columns: wrapped and aligned left, header included
    head = "".join(f"<th{wrap if j in table.text_columns else ''}>{esc(h)}</th>"
                   for j, h in enumerate(table.headers))
    body = []
    for i, row in enumerate(table.rows):
        state = table.row_states[i] if i < len(table.row_states) else ""
        cells = []
        for j, cell in enumerate(row):
            text = esc(cell)
            if j == 0 and state == UNDER_EXPLORED:
                text += f'<span class="badge {UNDER_EXPLORED}">{UNDER_EXPLORED}</span>'
            cells.append(f"<td{wrap if j in table.text_columns else ''}>{text}</td>")
        css = f' class="{state}"' if state else ""
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _figure_html(section: FigureSection) -> str:
    esc = html.escape
    parts = [
        f'<section class="card figure" id="section-{esc(section.key)}">',
        f"<h3>{esc(section.title)}</h3>",
        f'<p class="note">{esc(section.description)}</p>',
    ]
    if section.note:
        parts.append(f'<p class="note"><em>{esc(section.note)}</em></p>')
    if section.figure is not None:
        height = section.figure.layout.height or 450
        div = pio.to_html(
            section.figure,
            full_html=False,
            include_plotlyjs=False,
            div_id=f"fig-{section.key}",
            default_height=f"{height}px",
            default_width="100%",
            config={"displaylogo": False, "responsive": True},
        )
        parts.append(f'<div class="plot" data-figure="{esc(section.key)}">{div}</div>')
    parts.append("</section>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_report(
    data: ReportData, study: optuna.Study, results: ResultsLayout | str | Path
) -> dict[str, Path]:
    """Draw the figures and write the four report files into the study's results folder.

    Everything is rendered in memory first; each file is then written atomically, so a reader
    never sees half a file (a failed write leaves that file as it was).

    Args:
        data: Report data from :func:`hpsearch.report.compute.compute_report`.
        study: The study ``data`` was computed from; checked by name so that a report is never
            written with another study's data.
        results: The study's results folder (or its layout), created if missing.

    Returns:
        ``{"html", "markdown", "architectures_csv", "trials_csv"}`` -> path written.

    Raises:
        ValueError: If ``data`` was computed from another study.
        FileWriteError: If the folder or a file cannot be written; its message and
            ``filename`` name the path.
    """
    if study.study_name != data.study_name:
        raise ValueError(
            f"report data is for study {data.study_name!r}, not {study.study_name!r}"
        )
    layout = ResultsLayout.at(results)
    contents = render_report(data)
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(layout.root, err) from err
    _remove_stale_temporaries(layout)
    written = {}
    for kind, text in contents.items():
        path = layout.report_file(kind)
        atomic_write_text(path, text)
        written[kind] = path
    return written


def render_report(data: ReportData) -> dict[str, str]:
    """Every report file's text, keyed as :data:`hpsearch.results.REPORT_FILES`."""
    contents = {
        "html": render_html(data, draw_figures(data)),
        "markdown": render_markdown(data),
        "architectures_csv": architectures_csv(data),
        "trials_csv": trials_csv(data),
    }
    assert contents.keys() == REPORT_FILES.keys()
    return contents


def _remove_stale_temporaries(layout: ResultsLayout) -> None:
    # A crash between write and replace leaves a temporary behind; only those a report file's
    # write would leave (same folder, same suffix) are removed.
    suffixes = {Path(name).suffix for name in REPORT_FILES.values()}
    for stale in layout.root.glob(f"{TMP_PREFIX}*"):
        if stale.suffix in suffixes and stale.is_file():
            with contextlib.suppress(OSError):
                stale.unlink()
