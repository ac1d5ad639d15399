"""report.html opened in headless Chromium: every figure renders, and no script fails."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
from browser import dump_dom, elements_with_class, file_url, render, requires_chromium
from optuna.trial import TrialState
from test_report import METRIC, add_trial, random_report_inputs, random_study

from hpsearch.report import compute_report, write_report

pytestmark = [pytest.mark.browser, requires_chromium]

# Git-ignored; CI can upload it to show what the report looked like.
ARTIFACTS = Path(__file__).parent / "artifacts"


def _write(study: optuna.Study, out_dir: Path) -> tuple[Path, set[str]]:
    inputs = random_report_inputs(study)
    data = compute_report(study, **inputs, results_dir=f"results/{study.study_name}")
    page = write_report(data, study, out_dir)["html"]
    keys = re.findall(r'data-figure="([^"]+)"', page.read_text(encoding="utf-8"))
    return page, {f"fig-{key}" for key in keys}


def _assert_rendered(dom: str, errors: list[str], figure_ids: set[str]) -> None:
    assert errors == []
    rendered = {el.get("id") for el in elements_with_class(dom, "js-plotly-plot")}
    assert rendered == figure_ids
    assert len(elements_with_class(dom, "plot-container")) == len(figure_ids)
    # Every plotly figure draws at least one main-svg; a failed newPlot draws none.
    assert len(elements_with_class(dom, "main-svg")) >= len(figure_ids)


def test_every_figure_renders_without_console_errors(tmp_path: Path) -> None:
    page, figure_ids = _write(random_study(40, name="browser"), tmp_path)
    assert figure_ids == {
        "fig-values", "fig-effort", "fig-learning-curves", "fig-history", "fig-intermediate",
        "fig-importances", "fig-parallel", "fig-timeline",
    }
    shown = render(
        file_url(page),
        budget_ms=10_000,
        screenshot_path=ARTIFACTS / "report.png",
        size=(1400, 4000),
    )
    _assert_rendered(shown.dom, shown.errors, figure_ids)
    assert "Winner: cnn" in shown.dom
    assert shown.screenshot is not None
    png = shown.screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 50_000  # a blank page compresses to a few kB


def test_report_without_complete_trials_renders(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="no-complete", direction="maximize")
    add_trial(study, "mlp", TrialState.PRUNED, epochs=[0.2, 0.25])
    add_trial(study, "cnn", TrialState.FAIL)
    page, figure_ids = _write(study, tmp_path)
    # The pruned trial still has a learning curve (mlp is described by its best pruned trial).
    assert figure_ids == {
        "fig-intermediate", "fig-timeline", "fig-learning-curves", "fig-effort",
    }
    dom, errors = dump_dom(file_url(page), budget_ms=5_000)
    _assert_rendered(dom, errors, figure_ids)
    assert "No winner yet" in dom and METRIC in dom
    # Pruned at its best epoch, mlp is under-explored: a styled row with a badge.
    assert '<tr class="under-explored"><td>mlp<span class="badge under-explored">' in dom


def test_console_errors_are_caught(tmp_path: Path) -> None:
    # Guards the assertions above: a page that throws must not pass as error-free.
    page = tmp_path / "broken.html"
    page.write_text(
        "<html><body><p id='x'>before</p><script>"
        "document.getElementById('x').textContent = 'after';"
        "console.log('just a log'); console.error(new TypeError('logged'));"
        "undefinedFunction();"
        "</script></body></html>",
        encoding="utf-8",
    )
    dom, errors = dump_dom(file_url(page), budget_ms=1_000)
    assert ">after<" in dom
    assert len(errors) == 2
    assert errors[0].startswith("TypeError: logged")
    assert errors[1].startswith("Uncaught ReferenceError: undefinedFunction")
