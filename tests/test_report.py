"""Report data computed from studies with known trials, and the files written from it."""

from __future__ import annotations

import csv
import io
import math
import os
import random
import re
import stat
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from hpsearch import files, ranking, report
from hpsearch.errors import FileWriteError
from hpsearch.report import compute_report, seed_summary, t_quantile_975
from hpsearch.report import figures as report_figures
from hpsearch.report import render as report_render
from hpsearch.report.__main__ import winner_line
from hpsearch.report.render import seed_table, write_report
from hpsearch.results import ResultsLayout

optuna.logging.set_verbosity(optuna.logging.WARNING)

T0 = datetime(2026, 1, 5, 9, 0, 0)
ARCHS = ("mlp", "cnn", "resnet")
METRIC = "val_acc"


def _distributions(arch: str) -> dict[str, BaseDistribution]:
    dists: dict[str, BaseDistribution] = {
        "architecture": CategoricalDistribution(list(ARCHS)),
        "lr": FloatDistribution(1e-4, 1e-1, log=True),
    }
    if arch == "mlp":
        dists["hidden"] = CategoricalDistribution([32, 64, 128])
    elif arch == "cnn":
        dists["depth"] = IntDistribution(1, 4)
    else:
        dists["width"] = IntDistribution(8, 64)
    return dists


def _params(arch: str, rng: random.Random) -> dict[str, Any]:
    params: dict[str, Any] = {"architecture": arch, "lr": 10 ** rng.uniform(-4, -1)}
    if arch == "mlp":
        params["hidden"] = rng.choice([32, 64, 128])
    elif arch == "cnn":
        params["depth"] = rng.randint(1, 4)
    else:
        params["width"] = rng.randint(8, 64)
    return params


def _history(values: list[float], seconds_per_epoch: float = 10.0) -> list[dict[str, float]]:
    return [
        {
            "epoch": i,
            "train_loss": 1.0 / (i + 1),
            "val_loss": 1.2 / (i + 1),
            METRIC: v,
            "lr": 0.01,
            "seconds": seconds_per_epoch * (i + 1),
        }
        for i, v in enumerate(values)
    ]


def add_trial(
    study: optuna.Study,
    arch: str | None,
    state: TrialState,
    value: float | None = None,
    *,
    params: dict[str, Any] | None = None,
    epochs: list[float] | None = None,
    best_epoch: int | None = None,
    n_params: int = 1000,
    worker: str = "host:1",
    device: str = "cpu",
    start: datetime | None = None,
    minutes: float = 1.0,
    checkpoint: str | None = None,
    extra_attrs: dict[str, Any] | None = None,
) -> None:
    """Add one finished trial laid out the way the core writes it."""
    number = len(study.trials)
    rng = random.Random(number)
    if params is None and arch is not None:
        params = _params(arch, rng)
    dists = _distributions(arch) if arch is not None else {}
    params = params or {}
    dists = {k: d for k, d in dists.items() if k in params}
    epochs = epochs if epochs is not None else ([value] if value is not None else [])
    if best_epoch is None and epochs:
        best_epoch = max(range(len(epochs)), key=lambda i: epochs[i])
    attrs: dict[str, Any] = {"worker": worker, "device": device}
    if arch is not None:
        history = _history(epochs)
        attrs.update(
            architecture=arch,
            n_params=n_params,
            history=history,
            train_seconds=history[-1]["seconds"] if history else 0.0,
        )
        if best_epoch is not None:
            attrs.update(best_epoch=best_epoch, best_value=epochs[best_epoch])
        if checkpoint is not None:
            attrs["checkpoint"] = checkpoint
    if state == TrialState.FAIL:
        attrs["fail_reason"] = "CUDA out of memory"
    attrs.update(extra_attrs or {})
    trial = optuna.create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params=params,
        distributions=dists,
        user_attrs=attrs,
        intermediate_values={i: v for i, v in enumerate(epochs)},
    )
    trial.datetime_start = start or T0 + timedelta(minutes=2 * number)
    trial.datetime_complete = trial.datetime_start + timedelta(minutes=minutes)
    study.add_trial(trial)


def known_study(direction: str = "maximize", *, with_pruned: bool = True) -> optuna.Study:
    """mlp: 6 complete, 1 pruned, 1 failed; cnn: 3 complete, 2 pruned; resnet: none complete.

    Maximizing, every pruned trial is worse than its architecture's complete ones, and
    resnet's only finished trial was pruned at its best epoch (still improving). Minimizing,
    each architecture's best value is a pruned trial's.
    """
    study = optuna.create_study(study_name=f"known-{direction}", direction=direction)
    for value in (0.90, 0.85, 0.88, 0.80, 0.86, 0.70):
        add_trial(study, "mlp", TrialState.COMPLETE, value, epochs=[value - 0.1, value])
    if with_pruned:
        add_trial(study, "mlp", TrialState.PRUNED, epochs=[0.3])
    add_trial(study, "mlp", TrialState.FAIL)
    for value in (0.92, 0.91, 0.89):
        curve = [value - 0.2, value, value - 0.1]
        add_trial(study, "cnn", TrialState.COMPLETE, value, epochs=curve)
    if with_pruned:
        add_trial(study, "cnn", TrialState.PRUNED, epochs=[0.2, 0.25])
        add_trial(study, "cnn", TrialState.PRUNED, epochs=[0.1])
        add_trial(study, "resnet", TrialState.PRUNED, epochs=[0.15])
    add_trial(study, "resnet", TrialState.FAIL)
    return study


def random_study(n_trials: int = 40, seed: int = 0, name: str = "random") -> optuna.Study:
    """A study shaped like a real run: three architectures, two workers, all trial states."""
    rng = random.Random(seed)
    study = optuna.create_study(study_name=name, direction="maximize")
    lanes = [("host:11", "cuda:0"), ("host:12", "cuda:1")]
    clock = {lane: T0 for lane in lanes}
    for i in range(n_trials):
        arch = ARCHS[i % 3]
        lane = lanes[i % 2]
        ceiling = {"mlp": 0.85, "cnn": 0.93, "resnet": 0.9}[arch]
        n_epochs = rng.randint(3, 12)
        curve = [
            ceiling * (1 - math.exp(-(e + 1) / 3)) + rng.gauss(0, 0.01) for e in range(n_epochs)
        ]
        roll = rng.random()
        state = TrialState.COMPLETE
        if roll < 0.2:
            state, curve = TrialState.PRUNED, curve[:2]
        elif roll < 0.25:
            state = TrialState.FAIL
        best = max(range(len(curve)), key=lambda e: curve[e])
        minutes = 0.5 * len(curve)
        add_trial(
            study,
            arch,
            state,
            curve[best] if state == TrialState.COMPLETE else None,
            params=_params(arch, rng),
            epochs=curve,
            best_epoch=best,
            n_params=rng.randint(10_000, 500_000),
            worker=lane[0],
            device=lane[1],
            start=clock[lane],
            minutes=minutes,
            checkpoint=f"trials/{i}/epoch{best:03d}-val_acc{curve[best]:.4f}.pt",
        )
        clock[lane] += timedelta(minutes=minutes + rng.choice([0.1, 0.1, 2.0]))
    return study


def random_report_inputs(study: optuna.Study) -> dict[str, Any]:
    rng = random.Random(1)
    archs = {t.params["architecture"] for t in study.trials if t.state == TrialState.COMPLETE}
    return {
        "metric": METRIC,
        "test_metric_name": "test_acc",
        "test_metrics": {a: 0.8 + 0.01 * len(a) for a in archs},
        "seed_metrics": {
            a: [0.8 + 0.01 * len(a) + rng.gauss(0, 0.004) for _ in range(3)] for a in archs
        },
    }


def compute(study: optuna.Study, **overrides: Any) -> report.ReportData:
    kwargs: dict[str, Any] = {
        "metric": METRIC,
        "test_metric_name": "test_acc",
        "test_metrics": {},
        "seed_metrics": {},
        "now": T0 + timedelta(hours=1),
    }
    kwargs.update(overrides)
    return compute_report(study, **kwargs)


# --- per-architecture table -------------------------------------------------------------------


def test_counts_per_state() -> None:
    data = compute(known_study())
    assert data.counts == report.StateCounts(complete=9, pruned=4, failed=2, running=0)
    assert data.architecture("mlp").counts == report.StateCounts(6, 1, 1, 0)
    assert data.architecture("cnn").counts == report.StateCounts(3, 2, 0, 0)
    assert data.architecture("resnet").counts == report.StateCounts(0, 1, 1, 0)


def test_running_and_architecture_less_trials_are_counted() -> None:
    study = known_study()
    study.add_trial(optuna.create_trial(state=TrialState.RUNNING, params={}, distributions={}))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={}, distributions={}))
    data = compute(study)
    assert data.counts.running == 1
    unknown = data.architecture(report.UNKNOWN_ARCHITECTURE)
    assert unknown.counts == report.StateCounts(0, 0, 1, 1)
    assert unknown.rank is None
    assert "running" in report_render.architecture_table(data).headers


def test_best_per_architecture_maximize() -> None:
    data = compute(known_study("maximize"))
    assert data.direction == "maximize"
    assert list(data.architecture_names) == ["cnn", "mlp", "resnet"]
    # resnet's only finished trial was pruned at its best epoch: under-explored, never ranked.
    assert [a.rank for a in data.architectures] == [1, 2, None]
    assert [a.explored for a in data.architectures] == [True, True, False]
    assert [a.from_pruned for a in data.architectures] == [False, False, True]
    for arch, value in {"cnn": 0.92, "mlp": 0.90}.items():
        summary = data.architecture(arch)
        assert summary.best_value == pytest.approx(value)
        assert data.trials[summary.best_trial].value == pytest.approx(value)
    assert data.winner is not None and data.winner.architecture == "cnn"
    assert data.verdict.best_architecture == "cnn"


def test_best_per_architecture_minimize_uses_pruned_representatives() -> None:
    data = compute(known_study("minimize"))
    assert data.direction == "minimize"
    # Minimizing, each architecture's lowest value is a pruned trial's first (and last)
    # epoch: every representative was pruned while still improving, so none is ranked.
    assert list(data.architecture_names) == ["cnn", "resnet", "mlp"]
    assert [a.rank for a in data.architectures] == [None, None, None]
    assert [a.best_value for a in data.architectures] == pytest.approx([0.1, 0.15, 0.3])
    assert all(a.from_pruned and a.still_improving for a in data.architectures)
    assert data.verdict.best_architecture is None
    # The winner is still the best complete trial, what best/ holds.
    assert data.winner is not None
    assert (data.winner.architecture, data.winner.value) == ("mlp", pytest.approx(0.70))
    assert "No architecture is explored enough" in data.verdict.text
    assert "mlp trial 5, is only the best complete trial so far" in data.verdict.text
    with_completes_only = compute(known_study("minimize", with_pruned=False))
    assert list(with_completes_only.architecture_names) == ["mlp", "cnn", "resnet"]
    assert [a.rank for a in with_completes_only.architectures] == [1, 2, None]


def test_top_n_median_and_iqr() -> None:
    data = compute(known_study())
    mlp = data.architecture("mlp")
    assert mlp.top_values == pytest.approx((0.90, 0.88, 0.86, 0.85, 0.80))
    assert mlp.top_median == pytest.approx(0.86)
    assert (mlp.top_q1, mlp.top_q3) == pytest.approx((0.85, 0.88))
    cnn = data.architecture("cnn")  # fewer than top_n trials: uses the three it has
    assert cnn.top_median == pytest.approx(0.91)
    assert (cnn.top_q1, cnn.top_q3) == pytest.approx((0.90, 0.915))
    resnet = data.architecture("resnet")
    assert (resnet.top_values, resnet.top_median, resnet.top_q1) == ((), None, None)


def test_top_n_is_configurable_and_direction_aware() -> None:
    data = compute(known_study("minimize"), top_n=2)
    mlp = data.architecture("mlp")
    assert mlp.top_values == pytest.approx((0.70, 0.80))
    assert mlp.top_median == pytest.approx(0.75)
    assert (mlp.top_q1, mlp.top_q3) == pytest.approx((0.725, 0.775))
    assert "top-2 median" in report_render.architecture_table(data).headers
    with pytest.raises(ValueError, match="top_n"):
        compute(known_study(), top_n=0)


def test_best_trial_details() -> None:
    study = optuna.create_study(study_name="details", direction="maximize")
    add_trial(
        study, "mlp", TrialState.COMPLETE, 0.8, epochs=[0.5, 0.8, 0.7], n_params=12345,
        params={"architecture": "mlp", "lr": 0.01, "hidden": 64}, checkpoint="trials/0/best.pt",
    )
    add_trial(study, "mlp", TrialState.COMPLETE, 0.6, epochs=[0.6, 0.55, 0.5, 0.4])
    add_trial(study, "mlp", TrialState.PRUNED, epochs=[0.2, 0.3])
    data = compute(study, results_dir="results/details", test_metrics={"mlp": 0.79})
    mlp = data.architecture("mlp")
    assert (mlp.best_trial, mlp.n_params, mlp.best_epoch) == (0, 12345, 1)
    assert mlp.time_to_best == pytest.approx(20.0)  # history[1]["seconds"]
    assert mlp.total_train_seconds == pytest.approx(30 + 40 + 20)  # pruned trials count too
    assert mlp.test_metric == pytest.approx(0.79)
    assert mlp.best_params == {"lr": 0.01, "hidden": 64}
    assert mlp.checkpoint == "trials/0/best.pt"


def test_architecture_without_complete_trials_shows_its_best_pruned_trial() -> None:
    data = compute(known_study())
    table = report_render.architecture_table(data)
    row = dict(zip(table.headers, table.rows[2]))
    assert row["architecture"] == "resnet"
    assert (row["trials"], row["complete"], row["pruned"], row["failed"]) == ("2", "0", "1", "1")
    assert row["best val_acc"] == "0.15 (pruned at epoch 0)"
    assert row["rank"] == "–"
    for column in ("top-5 median", "top-5 IQR"):
        assert row[column] == "–"
    assert "Representative: each architecture is described by its trial with the best" in (
        report_render.render_markdown(data))


# --- representatives and exploration ----------------------------------------------------------


def _slow_starter_study() -> optuna.Study:
    """cnn: four complete trials; mlp: two complete trials near chance and one pruned trial
    that climbed to 0.94 before the pruner cut it (one epoch after its best)."""
    study = optuna.create_study(study_name="slow-starter", direction="maximize")
    for value in (0.90, 0.88, 0.86, 0.85):
        add_trial(study, "cnn", TrialState.COMPLETE, value, epochs=[value - 0.1, value])
    add_trial(study, "mlp", TrialState.COMPLETE, 0.10, epochs=[0.09, 0.10])
    add_trial(study, "mlp", TrialState.COMPLETE, 0.12, epochs=[0.11, 0.12])
    add_trial(study, "mlp", TrialState.PRUNED, epochs=[0.10, 0.30, 0.60, 0.94, 0.93],
              checkpoint="trials/6/epoch003-val_acc0.9400.pt")
    return study


def test_a_pruned_trial_can_represent_its_architecture() -> None:
    study = _slow_starter_study()
    data = compute(study, min_trials=3, results_dir="results/slow-starter")
    mlp = data.architecture("mlp")
    # The pruned trial's best epoch beats every complete trial of mlp (and of cnn).
    assert (mlp.best_trial, mlp.from_pruned, mlp.pruned_at_epoch) == (6, True, 4)
    assert mlp.best_value == pytest.approx(0.94) and mlp.best_epoch == 3
    assert mlp.checkpoint == "trials/6/epoch003-val_acc0.9400.pt"
    assert (mlp.explored, mlp.still_improving, mlp.rank) == (True, False, 1)
    # The same trial measure.py scores and retrains.
    bests = ranking.architecture_bests(study.trials, minimize=False)
    assert {a: t.number for a, t in bests.items()} == {"cnn": 0, "mlp": 6}
    table = report_render.architecture_table(data)
    row = dict(zip(table.headers, table.rows[0]))
    assert (row["architecture"], row["best val_acc"], row["best epoch"]) == (
        "mlp", "0.94 (pruned at epoch 4)", "3")
    assert (row["trials"], row["complete"], row["pruned"], row["epochs trained"]) == (
        "3", "2", "1", "9")
    assert next(c for c in data.learning_curves if c.architecture == "mlp").trial_number == 6
    # The winner stays the best complete trial (best/), and the verdict says it differs.
    assert data.winner is not None
    assert (data.winner.architecture, data.winner.trial_number) == ("cnn", 0)
    assert data.winner.representative
    assert data.verdict.best_architecture == "mlp"
    assert data.verdict.text.startswith(
        "mlp is the best explored architecture: best val_acc 0.94 (pruned at epoch 4) in "
        "trial 6.")
    assert "The winner (the best complete trial, the model in best/) is cnn trial 0, not mlp: " \
        "mlp's best trial was pruned" in data.verdict.text
    assert data.exploration.under_explored == () and data.exploration.command is None


def test_the_winner_is_measured_only_when_it_represents_its_architecture() -> None:
    study = optuna.create_study(study_name="winner-not-rep", direction="maximize")
    add_trial(study, "mlp", TrialState.COMPLETE, 0.80, epochs=[0.7, 0.8])
    add_trial(study, "mlp", TrialState.PRUNED, epochs=[0.85, 0.90, 0.89])
    data = compute(study, test_metrics={"mlp": 0.88}, seed_metrics={"mlp": [0.87, 0.88]})
    winner = data.winner
    assert winner is not None and (winner.trial_number, winner.representative) == (0, False)
    assert (winner.test_metric, winner.seeds.n) == (None, 0)
    assert "not measured (the report measures mlp's representative)" in (
        report_render.render_markdown(data))


def _starved_study() -> optuna.Study:
    """cnn and mlp: four complete trials each (one mlp trial failed too); resnet: two complete
    trials, one of them the study's best."""
    study = optuna.create_study(study_name="starved", direction="maximize")
    for i in range(4):
        add_trial(study, "cnn", TrialState.COMPLETE, 0.90 - 0.01 * i, epochs=[0.8, 0.90 - 0.01 * i])
        add_trial(study, "mlp", TrialState.COMPLETE, 0.85 - 0.01 * i, epochs=[0.8, 0.85 - 0.01 * i])
    add_trial(study, "mlp", TrialState.FAIL)
    add_trial(study, "resnet", TrialState.COMPLETE, 0.97, epochs=[0.5, 0.97])
    add_trial(study, "resnet", TrialState.COMPLETE, 0.60, epochs=[0.5, 0.60])
    return study


def test_an_under_explored_architecture_is_labelled_and_not_judged(tmp_path: Path) -> None:
    study = _starved_study()
    data = compute(
        study, min_trials=4, prune_within_architecture=True, min_trials_to_prune=2,
        sample_within_architecture=True, results_dir="results/starved",
        seed_metrics={"cnn": [0.90, 0.91, 0.92], "mlp": [0.84, 0.85, 0.86],
                      "resnet": [0.95, 0.96, 0.97]},
    )
    assert list(data.architecture_names) == ["cnn", "mlp", "resnet"]
    resnet = data.architecture("resnet")
    assert (resnet.rank, resnet.explored) == (None, False)
    assert resnet.exploration_note == "2 of 4 finished trials"
    # The verdict is over cnn and mlp only, although resnet has the best value.
    assert data.verdict.best_architecture == "cnn"
    assert (data.gap.leader, data.gap.runner_up, data.gap.verdict) == ("cnn", "mlp", "separated")
    assert data.winner is not None and data.winner.architecture == "resnet"
    assert "is resnet trial 9, not cnn: resnet is under-explored" in data.verdict.text
    exploration = data.exploration
    assert exploration.under_explored == ("resnet",)
    # 11 trials count towards n_trials (the failed one too); resnet needs 2 more.
    assert (exploration.trials_to_add, exploration.n_trials) == (2, 13)
    assert exploration.command == (
        "python -m hpsearch.run results/starved/config.yaml --results-dir results "
        "--n-trials 13")
    assert exploration.advice is not None
    assert exploration.advice.startswith(
        "Under-explored, so not judged: resnet (2 of 4 finished trials). It needs 2 more trials")

    paths = write_report(data, study, tmp_path)
    rows = {row["architecture"]: row for row in _read_csv(paths["architectures_csv"])}
    assert (rows["resnet"]["explored"], rows["resnet"]["exploration_note"]) == (
        "False", "2 of 4 finished trials")
    assert (rows["cnn"]["explored"], rows["cnn"]["exploration_note"]) == ("True", "")
    assert rows["resnet"]["rank"] == ""

    markdown = paths["markdown"].read_text(encoding="utf-8")
    table = markdown.split("## Architectures", 1)[1].split("## ", 1)[0]
    resnet_line = next(line for line in table.splitlines() if line.startswith("| resnet "))
    assert "| under-explored: 2 of 4 finished trials |" in resnet_line
    assert "**Verdict (separated):** cnn is the best explored architecture" in markdown
    assert "**More trials needed:** Under-explored, so not judged: resnet" in markdown
    assert f"```sh\n{exploration.command}\n```" in markdown
    assert "Minimum trials per architecture (study.min_trials_per_architecture): 4." in markdown
    assert ("Pruning within architecture (study.prune_within_architecture): on: a trial is "
            "pruned only by comparison with trials of its own architecture, once that "
            "architecture has 2 finished trials (study.min_trials_to_prune)") in markdown
    assert ("Sampling within architecture (study.sample_within_architecture, TPE): on: the "
            "architecture is sampled over the whole study") in markdown
    assert "Under-explored: an architecture with fewer than 4 finished" in markdown

    page = paths["html"].read_text(encoding="utf-8")
    row_html = re.search(r'<tr class="under-explored"><td>resnet(.*?)</tr>', page)
    assert row_html is not None
    assert '<span class="badge under-explored">under-explored</span>' in row_html.group(1)
    assert re.search(r'<tr class="leader"><td>cnn</td>', page)
    assert page.count('<tr class="under-explored">') == 2  # architectures and seeds tables
    # The explored column holds prose (the reason): header and cells both align left.
    assert '<th class="wrap">explored</th>' in page
    assert f"<pre><code>{exploration.command}</code></pre>" in page

    bare = compute(study, min_trials=4)
    assert bare.exploration.command == "python -m hpsearch.run <study file> --n-trials 13"
    assert "Pruning within architecture (study.prune_within_architecture): unknown" in (
        report_render.render_markdown(bare))
    assert "Sampling within architecture (study.sample_within_architecture, TPE): unknown" in (
        report_render.render_markdown(bare))


def test_no_explored_architecture_names_no_best() -> None:
    data = compute(_starved_study(), min_trials=5)
    assert data.verdict.best_architecture is None
    assert [a.rank for a in data.architectures] == [None, None, None]
    assert data.verdict.text == (
        "No architecture is explored enough to name a best one. The winner below, resnet "
        "trial 9, is only the best complete trial so far.")
    assert data.gap.verdict == "n/a" and data.gap.leader is None
    # cnn 4, mlp 4 (the failed trial is not finished), resnet 2 of 5.
    assert (data.exploration.trials_to_add, data.exploration.n_trials) == (1 + 1 + 3, 16)


@pytest.mark.parametrize(("curve", "improving"), [
    ([0.10, 0.40, 0.57], True),   # best epoch 2 is the last it trained: cut while climbing
    ([0.10, 0.60, 0.57], False),  # it had peaked at epoch 1
])
def test_a_representative_pruned_while_still_improving_is_under_explored(
    curve: list[float], improving: bool
) -> None:
    study = optuna.create_study(study_name="improving", direction="maximize")
    add_trial(study, "resnet", TrialState.COMPLETE, 0.10, epochs=[0.09, 0.10])
    add_trial(study, "resnet", TrialState.COMPLETE, 0.11, epochs=[0.09, 0.11])
    add_trial(study, "resnet", TrialState.PRUNED, epochs=curve)
    for value in (0.50, 0.52, 0.51):
        add_trial(study, "cnn", TrialState.COMPLETE, value, epochs=[value])
    data = compute(study, min_trials=2)
    slow = data.architecture("resnet")
    assert (slow.best_trial, slow.from_pruned, slow.pruned_at_epoch) == (2, True, 2)
    assert (slow.still_improving, slow.explored) == (improving, not improving)
    if improving:
        assert slow.exploration_note == (
            "its best trial 2 was pruned at epoch 2 while still improving")
        assert slow.rank is None and data.verdict.best_architecture == "cnn"
        # It has its 2 trials already; still improving, it needs at least one more.
        assert (data.exploration.under_explored, data.exploration.trials_to_add) == (("resnet",), 1)
        assert data.exploration.n_trials == 7
    else:
        assert slow.exploration_note is None
        assert slow.rank == 1 and data.verdict.best_architecture == "resnet"
        assert data.exploration.under_explored == ()


def test_search_effort_is_cumulative_by_completion_time() -> None:
    study = optuna.create_study(study_name="effort", direction="maximize")
    add_trial(study, "mlp", TrialState.COMPLETE, 0.8, epochs=[0.6, 0.7, 0.8], start=T0,
              minutes=10)
    add_trial(study, "cnn", TrialState.COMPLETE, 0.9, epochs=[0.8, 0.9], start=T0, minutes=2)
    add_trial(study, "mlp", TrialState.PRUNED, epochs=[0.2],
              start=T0 + timedelta(minutes=1), minutes=3)
    add_trial(study, "mlp", TrialState.FAIL, start=T0 + timedelta(minutes=5), minutes=2)
    running = optuna.create_trial(
        state=TrialState.RUNNING, params={"architecture": "cnn"},
        distributions={"architecture": CategoricalDistribution(list(ARCHS))},
        user_attrs={"architecture": "cnn", "history": _history([0.5, 0.6])},
    )
    running.datetime_start = T0 + timedelta(minutes=3)
    study.add_trial(running)
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING, params={"architecture": "mlp"},
        distributions={"architecture": CategoricalDistribution(list(ARCHS))},
    ))
    now = T0 + timedelta(minutes=30)
    data = compute(study, now=now)
    effort = {e.architecture: e for e in data.effort}
    assert [e.architecture for e in data.effort] == list(data.architecture_names)
    mlp, cnn = effort["mlp"], effort["cnn"]
    minutes = [(t - T0).total_seconds() / 60 for t in mlp.times]
    assert minutes == [4, 7, 10]  # by completion time, not trial number
    assert mlp.trial_numbers == (2, 3, 0)
    assert mlp.states == ("PRUNED", "FAIL", "COMPLETE")
    assert (mlp.trials, mlp.epochs) == ((1, 2, 3), (1, 1, 4))  # the waiting trial never ran
    assert cnn.times == (T0 + timedelta(minutes=2), now)  # the running trial counts now
    assert (cnn.trials, cnn.epochs) == ((1, 2), (2, 4))
    assert data.architecture("mlp").total_epochs == 4
    assert data.architecture("cnn").total_epochs == 4

    section = next(s for s in report_figures.draw_figures(data) if s.key == "effort")
    assert section.figure is not None
    assert sorted({trace.name for trace in section.figure.data}) == ["cnn", "mlp"]
    assert len(section.figure.data) == 4  # trials and epochs for each architecture


# --- seeds and the gap verdict ----------------------------------------------------------------


def test_seed_summary_matches_hand_computation() -> None:
    summary = seed_summary([0.90, 0.91, 0.92])
    # mean 0.91, sample std 0.01, t(0.975, 2) = 4.302653 -> half width 4.302653 * 0.01 / sqrt(3)
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert summary.n == 3
    assert summary.mean == pytest.approx(0.91)
    assert summary.half_width == pytest.approx(half, rel=1e-6)
    assert (summary.ci_low, summary.ci_high) == pytest.approx((0.91 - half, 0.91 + half))

    five = seed_summary([1.0, 2.0, 3.0, 4.0, 10.0])
    # mean 4, std sqrt(12.5), t(0.975, 4) = 2.776445
    assert five.half_width == pytest.approx(2.776445 * math.sqrt(12.5) / math.sqrt(5), rel=1e-6)


def test_seed_summary_edge_cases() -> None:
    single = seed_summary([0.9])
    assert (single.n, single.mean, single.ci_low, single.half_width) == (1, 0.9, None, None)
    assert seed_summary([]) == report.SeedSummary((), 0, None, None, None)
    with_nan = seed_summary([0.9, math.nan, 0.92])
    assert with_nan.n == 2 and len(with_nan.values) == 3
    assert with_nan.mean == pytest.approx(0.91)
    assert with_nan.half_width == pytest.approx(12.706205 * math.sqrt(0.0002) / math.sqrt(2))


def test_t_quantile_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 40), 50, 100, 1000, 10**6):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-6)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


@pytest.mark.parametrize(
    ("direction", "seeds", "verdict"),
    [
        ("maximize", {"cnn": [0.90, 0.91, 0.92], "mlp": [0.84, 0.85, 0.86]}, "separated"),
        ("maximize", {"cnn": [0.88, 0.90, 0.92], "mlp": [0.86, 0.87, 0.88]}, "within noise"),
        ("maximize", {"cnn": [0.80, 0.81, 0.82], "mlp": [0.90, 0.91, 0.92]}, "reversed"),
        ("maximize", {"cnn": [0.90], "mlp": [0.84, 0.85, 0.86]}, "n/a"),
        # Minimizing, mlp leads on validation; lower test loss confirms it.
        ("minimize", {"mlp": [0.50, 0.51, 0.52], "cnn": [0.60, 0.61, 0.62]}, "separated"),
        ("minimize", {"mlp": [0.60, 0.61, 0.62], "cnn": [0.50, 0.51, 0.52]}, "reversed"),
    ],
)
def test_gap_verdict(direction: str, seeds: dict[str, list[float]], verdict: str) -> None:
    # Minimizing, the pruned trials' low accuracies would be the representatives (each pruned
    # while still improving, so under-explored): leave them out to judge mlp against cnn.
    study = known_study(direction, with_pruned=direction == "maximize")
    data = compute(study, seed_metrics=seeds)
    gap = data.gap
    assert gap.verdict == verdict
    assert (gap.leader, gap.runner_up) == tuple(data.architecture_names[:2])
    if verdict != "n/a":
        expected = statistics_mean(seeds[gap.leader]) - statistics_mean(seeds[gap.runner_up])
        assert gap.difference == pytest.approx(expected)
    else:
        assert "at least 2 finite seed retrains" in gap.text


def test_gap_verdict_says_when_a_checkpoint_did_not_reproduce() -> None:
    # cnn leads on validation and its best checkpoint scored 0.95 on the test split, but its
    # configuration stays near chance with fresh seeds (seen with a GRU at a high learning
    # rate): the verdict must not read that as mlp generalizing better without saying so.
    study = known_study()
    seeds = {"cnn": [0.10, 0.11, 0.12], "mlp": [0.80, 0.81, 0.82]}
    data = compute(study, seed_metrics=seeds, test_metrics={"cnn": 0.95, "mlp": 0.81})
    assert (data.gap.leader, data.gap.verdict) == ("cnn", "reversed")
    assert "cnn's best checkpoint scored 0.95 test_acc, outside its retrains' interval" in \
        data.gap.text
    assert "mlp's best checkpoint" not in data.gap.text  # 0.81 lies inside its interval
    assert "cnn's best checkpoint scored 0.95" in report_render.render_markdown(data)
    # A checkpoint inside its retrains' interval adds nothing.
    quiet = compute(study, seed_metrics=seeds, test_metrics={"cnn": 0.11, "mlp": 0.81})
    assert "did not reproduce" not in quiet.gap.text


def test_gap_verdict_says_when_the_lead_did_not_hold() -> None:
    # As seen with a GRU: its checkpoint scored 0.976 and one retrain 0.981, but two stayed
    # at chance. The interval (0.39 ± 1.3) is too wide to exclude the checkpoint, yet two of
    # three retrains fell below every retrain of the runner-up.
    study = known_study()
    seeds = {"cnn": [0.105, 0.09, 0.981], "mlp": [0.938, 0.911, 0.914]}
    data = compute(study, seed_metrics=seeds, test_metrics={"cnn": 0.976, "mlp": 0.93})
    assert (data.gap.leader, data.gap.verdict) == ("cnn", "within noise")
    assert "outside its retrains' interval" not in data.gap.text
    assert ("cnn's lead did not hold with fresh seeds: 2 of its 3 retrains (0.105, 0.09 "
            "test_acc) scored worse than every retrain of mlp") in data.gap.text
    assert "cnn's lead did not hold" in report_render.render_markdown(data)
    # Ordinary seed noise in a close race: one retrain below the runner-up's worst is not most.
    close = compute(study, seed_metrics={"cnn": [0.961, 0.966, 0.97],
                                         "mlp": [0.963, 0.965, 0.967]},
                    test_metrics={"cnn": 0.968, "mlp": 0.965})
    assert close.gap.verdict == "within noise" and "did not hold" not in close.gap.text
    # A reversed verdict already says the runner-up is ahead.
    reversed_ = compute(study, seed_metrics={"cnn": [0.80, 0.81, 0.82],
                                             "mlp": [0.90, 0.91, 0.92]},
                        test_metrics={"cnn": 0.81, "mlp": 0.91})
    assert reversed_.gap.verdict == "reversed" and "did not hold" not in reversed_.gap.text


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_gap_verdict_needs_two_architectures() -> None:
    study = optuna.create_study(study_name="one", direction="maximize")
    add_trial(study, "mlp", TrialState.COMPLETE, 0.8)
    data = compute(study, seed_metrics={"mlp": [0.8, 0.81]})
    assert data.gap.verdict == "n/a" and data.gap.runner_up is None


def test_single_seed_shows_ci_not_available() -> None:
    data = compute(known_study(), seed_metrics={"cnn": [0.9], "mlp": [0.85]})
    cells = dict(zip(seed_table(data).headers, seed_table(data).rows[0]))
    assert cells["test_acc mean ± 95% CI [low, high]"] == "0.9 (CI n/a)"
    assert data.gap.verdict == "n/a"


# --- the winner -------------------------------------------------------------------------------


def test_winner() -> None:
    study = optuna.create_study(study_name="win", direction="maximize")
    add_trial(study, "mlp", TrialState.COMPLETE, 0.7)
    add_trial(
        study, "cnn", TrialState.COMPLETE, 0.95, epochs=[0.9, 0.95],
        params={"architecture": "cnn", "lr": 0.003, "depth": 3},
        checkpoint="trials/1/epoch001-val_acc0.9500.pt",
    )
    data = compute(
        study,
        results_dir=Path("results/win"),
        test_metrics={"cnn": 0.94, "mlp": 0.69},
        seed_metrics={"cnn": [0.93, 0.94, 0.95]},
    )
    winner = data.winner
    assert winner is not None
    assert (winner.architecture, winner.trial_number, winner.best_epoch) == ("cnn", 1, 1)
    assert winner.value == pytest.approx(0.95)
    assert winner.params == {"lr": 0.003, "depth": 3}
    assert winner.test_metric == pytest.approx(0.94)
    assert winner.seeds.mean == pytest.approx(0.94)
    assert winner.checkpoint_path == "results/win/trials/1/epoch001-val_acc0.9500.pt"
    assert winner.load_call == 'hpsearch.load_best_model("results/win")'


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_a_tie_goes_to_the_earlier_trial_everywhere(direction: str, tmp_path: Path) -> None:
    # Trial 1's architecture sorts first by name: a tie broken by name would pick it.
    study = optuna.create_study(study_name="tie", direction=direction)
    add_trial(study, "mlp", TrialState.COMPLETE, 0.9, epochs=[0.9])
    add_trial(study, "cnn", TrialState.COMPLETE, 0.9, epochs=[0.9])
    add_trial(study, "mlp", TrialState.COMPLETE, 0.9, epochs=[0.9])
    assert study.best_trial.number == 0
    data = compute(study)
    assert data.winner is not None
    assert (data.winner.architecture, data.winner.trial_number) == ("mlp", 0)
    assert [(a.architecture, a.rank, a.best_trial) for a in data.architectures] == [
        ("mlp", 1, 0), ("cnn", 2, 1),
    ]
    line = winner_line(study, METRIC, ResultsLayout(tmp_path / "tie"))
    assert line.startswith("winner: mlp (trial 0, best val_acc 0.9)")
    minimize = direction == "minimize"
    bests = ranking.architecture_bests(study.trials, minimize)  # what the report measures
    assert {arch: t.number for arch, t in bests.items()} == {"mlp": 0, "cnn": 1}


def test_winner_without_results_dir_or_checkpoint() -> None:
    study = optuna.create_study(study_name="bare", direction="maximize")
    add_trial(study, "mlp", TrialState.COMPLETE, 0.7, extra_attrs={"checkpoint": None})
    winner = compute(study).winner
    assert winner is not None
    assert winner.load_call == 'hpsearch.load_best_model("results/bare")'
    assert (winner.checkpoint, winner.checkpoint_path) == (None, None)
    assert "not kept" in report_render.render_markdown(compute(study))


def test_no_complete_trials() -> None:
    study = optuna.create_study(study_name="empty", direction="maximize")
    add_trial(study, "mlp", TrialState.PRUNED, epochs=[0.2])
    add_trial(study, "cnn", TrialState.FAIL)
    data = compute(study)
    assert data.winner is None
    assert data.gap.verdict == "n/a"
    # mlp's only trial was pruned at its best epoch (still improving): shown, never ranked.
    assert [(a.architecture, a.rank, a.from_pruned) for a in data.architectures] == [
        ("mlp", None, True), ("cnn", None, False),
    ]
    assert [c.architecture for c in data.learning_curves] == ["mlp"]
    assert data.history.values == ()
    assert "No complete trials yet" in report_render.render_markdown(data)


def test_empty_study() -> None:
    study = optuna.create_study(study_name="nothing")
    data = compute(study)
    assert data.architectures == () and data.counts.total == 0
    assert data.timeline.bars == ()


def test_rejects_unknown_architectures_and_multi_objective() -> None:
    with pytest.raises(ValueError, match=r"test_metrics.*\['vit'\]"):
        compute(known_study(), test_metrics={"vit": 0.9})
    with pytest.raises(ValueError, match="seed_metrics"):
        compute(known_study(), seed_metrics={"vit": [0.9]})
    with pytest.raises(ValueError, match="single-objective"):
        compute(optuna.create_study(directions=["minimize", "maximize"]))
    with pytest.raises(ValueError, match="min_trials"):
        compute(known_study(), min_trials=-1)


def test_nan_values_do_not_crash() -> None:
    study = optuna.create_study(study_name="nan", direction="maximize")
    add_trial(study, "mlp", TrialState.COMPLETE, 0.8, epochs=[math.nan, 0.8])
    add_trial(study, "cnn", TrialState.COMPLETE, 0.7, extra_attrs={"train_seconds": math.nan})
    data = compute(
        study,
        test_metrics={"mlp": math.nan, "cnn": 0.7},
        seed_metrics={"mlp": [0.8, math.nan, 0.82], "cnn": [math.nan]},
    )
    assert math.isnan(data.architecture("mlp").test_metric or 0.0)
    table = report_render.architecture_table(data)
    assert dict(zip(table.headers, table.rows[0]))["test_acc (best ckpt)"] == "NaN"
    seeds = dict(zip(seed_table(data).headers, seed_table(data).rows[0]))
    assert seeds["seeds"] == "2 of 3"
    assert math.isnan(data.learning_curves[0].metric[0])
    assert "nan" in report_render.architectures_csv(data)
    # NaN reaches plotly as null, never as a bare NaN token that JavaScript cannot parse.
    page = report_render.render_html(data, report_figures.draw_figures(data))
    plots = [part.split("</script>", 1)[0] for part in page.split("Plotly.newPlot(")[1:]]
    assert plots and not any(re.search(r"\bNaN\b|Infinity", plot) for plot in plots)


# --- figure data ------------------------------------------------------------------------------


def test_optimization_history_tracks_best_so_far() -> None:
    data = compute(known_study())
    values = (0.90, 0.85, 0.88, 0.80, 0.86, 0.70, 0.92, 0.91, 0.89)
    assert data.history.values == pytest.approx(values)
    assert data.history.best_so_far == pytest.approx((0.9,) * 6 + (0.92,) * 3)
    minimize = compute(known_study("minimize")).history
    assert minimize.best_so_far == pytest.approx((0.9, 0.85, 0.85, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7))


def test_intermediate_values_and_learning_curves() -> None:
    data = compute(known_study())
    pruned = [c for c in data.intermediate if c.state == "PRUNED"]
    assert [(c.architecture, c.steps) for c in pruned] == [
        ("mlp", (0,)), ("cnn", (0, 1)), ("cnn", (0,)), ("resnet", (0,)),
    ]
    cnn = next(c for c in data.learning_curves if c.architecture == "cnn")
    assert cnn.epochs == (0, 1, 2)
    assert cnn.metric == pytest.approx((0.72, 0.92, 0.82))
    assert cnn.best_epoch == 1
    assert [c.architecture for c in data.learning_curves] == ["cnn", "mlp", "resnet"]


def test_importances_skip_small_scopes_with_a_note() -> None:
    data = compute(known_study())
    overall = data.importances[0]
    assert overall.scope == "all architectures" and overall.items == ()
    assert overall.note is not None and "at least 10" in overall.note


def test_importances_overall_and_per_architecture() -> None:
    study = random_study(60)
    data = compute(study)
    scopes = {imp.scope: imp for imp in data.importances}
    assert set(scopes) == {"all architectures", *ARCHS}
    overall = dict(scopes["all architectures"].items)
    assert "architecture" in overall and "lr" in overall
    assert sum(overall.values()) == pytest.approx(1.0)
    cnn = dict(scopes["cnn"].items)
    assert set(cnn) == {"lr", "depth"}  # architecture is constant within a scope


def test_parallel_coordinates_axes() -> None:
    data = compute(known_study())
    overall = data.parallel[0]
    assert [axis.label for axis in overall.axes] == ["architecture", "log10(lr)"]
    arch_axis = overall.axes[0]
    assert arch_axis.tick_labels == ("cnn", "mlp")
    assert len(overall.values) == 9
    assert overall.note is not None and "depth" in overall.note and "hidden" in overall.note
    mlp = next(pc for pc in data.parallel if pc.scope == "mlp")
    hidden = next(axis for axis in mlp.axes if axis.label == "hidden")
    assert hidden.tick_labels == ("32", "64", "128")  # numeric categories sort as numbers
    resnet = next(pc for pc in data.parallel if pc.scope == "resnet")
    assert resnet.values == () and resnet.note == "no complete trials"


def test_timeline_lanes_and_utilization() -> None:
    study = optuna.create_study(study_name="timeline", direction="maximize")
    lane = {"worker": "a:1", "device": "cuda:0", "minutes": 10}
    add_trial(study, "mlp", TrialState.COMPLETE, 0.8, start=T0, **lane)
    add_trial(study, "mlp", TrialState.COMPLETE, 0.7, start=T0 + timedelta(minutes=30), **lane)
    add_trial(study, "cnn", TrialState.FAIL, worker="b:2", device="cuda:1", start=T0, minutes=40)
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params={}, distributions={}))
    data = compute(study)
    timeline = data.timeline
    assert len(timeline.bars) == 3  # the waiting trial never started
    assert (timeline.start, timeline.end) == (T0, T0 + timedelta(minutes=40))
    lanes = {lane.name: lane for lane in timeline.lanes}
    assert lanes["a:1 · cuda:0"].busy_seconds == pytest.approx(1200)
    assert lanes["a:1 · cuda:0"].utilization == pytest.approx(0.5)
    assert lanes["b:2 · cuda:1"].utilization == pytest.approx(1.0)


def test_timeline_running_trial_ends_at_report_time() -> None:
    study = optuna.create_study(study_name="running")
    trial = optuna.create_trial(state=TrialState.RUNNING, params={}, distributions={})
    trial.datetime_start = T0
    study.add_trial(trial)
    data = compute(study, now=T0 + timedelta(minutes=5))
    assert data.timeline.bars[0].end == T0 + timedelta(minutes=5)


# --- files ------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def test_write_report_files(tmp_path: Path) -> None:
    study = known_study()
    data = compute(
        study,
        results_dir="results/known-maximize",
        test_metrics={"cnn": 0.915, "mlp": 0.87},
        seed_metrics={"cnn": [0.90, 0.91, 0.92], "mlp": [0.84, 0.85, 0.86]},
    )
    paths = write_report(data, study, tmp_path / "out")
    assert {k: p.name for k, p in paths.items()} == {
        "html": "report.html",
        "markdown": "report.md",
        "architectures_csv": "architectures.csv",
        "trials_csv": "trials.csv",
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in paths.values()
    )

    archs = _read_csv(paths["architectures_csv"])
    assert next(iter(archs[0])) == "architecture"
    assert [row["architecture"] for row in archs] == ["cnn", "mlp", "resnet"]
    assert [row["complete"] for row in archs] == ["3", "6", "0"]
    by_name = {row["architecture"]: row for row in archs}
    assert (by_name["mlp"]["complete"], by_name["mlp"]["pruned"], by_name["mlp"]["failed"]) == (
        "6", "1", "1",
    )
    assert float(by_name["cnn"]["best_val_acc"]) == pytest.approx(0.92)
    assert float(by_name["cnn"]["test_acc"]) == pytest.approx(0.915)
    assert float(by_name["cnn"]["seed_mean_test_acc"]) == pytest.approx(0.91)
    assert float(by_name["resnet"]["best_val_acc"]) == pytest.approx(0.15)
    assert (by_name["resnet"]["best_from_pruned"], by_name["cnn"]["best_from_pruned"]) == (
        "True", "False")
    assert [row["explored"] for row in archs] == ["True", "True", "False"]
    assert [row["rank"] for row in archs] == ["1", "2", ""]
    assert by_name["resnet"]["pruned_at_epoch"] == "0"
    assert (by_name["mlp"]["trials"], by_name["mlp"]["total_epochs"]) == ("8", "13")

    trials = _read_csv(paths["trials_csv"])
    assert len(trials) == len(study.trials)
    assert [row["number"] for row in trials] == [str(t.number) for t in study.trials]
    assert {"param_lr", "param_hidden", "param_depth"} <= set(trials[0])
    assert "param_architecture" not in trials[0]
    assert trials[7]["state"] == "FAIL" and trials[7]["fail_reason"] == "CUDA out of memory"
    assert trials[0]["param_depth"] == ""  # conditional params are blank where not sampled

    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "| architecture | rank | explored | trials | complete | pruned | failed |" in markdown
    assert "**Verdict (separated):**" in markdown
    assert "do not overlap" in markdown
    assert 'hpsearch.load_best_model("results/known-maximize")' in markdown

    page = paths["html"].read_text(encoding="utf-8")
    assert "cdn.plot.ly" not in page.replace(_plotlyjs(), "")
    assert "<script src" not in page and 'src="http' not in page
    assert page.count(_plotlyjs()) == 1
    drawn = [s for s in report_figures.draw_figures(data) if s.figure is not None]
    assert page.count('data-figure="') == len(drawn)
    assert page.index('id="winner"') < page.index('id="architectures"') < page.index('id="figures"')
    assert "Winner: cnn" in page


def _plotlyjs() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def test_report_files_follow_the_umask(tmp_path: Path) -> None:
    # The old writer left every report file readable by its owner only (mkstemp's 0600).
    study = known_study()
    previous = os.umask(0o022)
    try:
        paths = write_report(compute(study), study, tmp_path)
    finally:
        os.umask(previous)
    for kind in ("html", "markdown", "architectures_csv", "trials_csv"):
        assert stat.S_IMODE(paths[kind].stat().st_mode) == 0o644, kind


def test_write_report_with_no_complete_trials(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="empty", direction="maximize")
    add_trial(study, "mlp", TrialState.PRUNED, epochs=[0.2])
    data = compute(study)
    paths = write_report(data, study, tmp_path)
    page = paths["html"].read_text(encoding="utf-8")
    assert "No winner yet" in page and "No complete trials yet." in page
    assert len(_read_csv(paths["architectures_csv"])) == 1


def test_write_report_rejects_another_studys_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known-maximize"):
        write_report(compute(known_study()), known_study("minimize"), tmp_path)


def test_failed_write_names_the_path_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = known_study()
    data = compute(study)
    paths = write_report(data, study, tmp_path)
    before = paths["trials_csv"].read_bytes()
    real_replace = os.replace

    def failing_replace(src: str, dst: str | Path) -> None:
        if Path(dst).name == "trials.csv":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(FileWriteError, match="No space left") as caught:
        write_report(data, study, tmp_path)
    assert isinstance(caught.value, OSError)
    assert caught.value.filename == str(tmp_path / "trials.csv")
    assert str(tmp_path / "trials.csv") in str(caught.value)
    assert paths["trials_csv"].read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert not list(tmp_path.glob(f"{files.TMP_PREFIX}*"))


def test_write_report_into_a_file_path_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    study = known_study()
    with pytest.raises(FileWriteError) as caught:
        write_report(compute(study), study, blocker)
    assert caught.value.filename == str(blocker)


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / f"{files.TMP_PREFIX}abc123.html"  # the temporary of report.html
    stale.write_text("half a page")
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("keep")
    study = known_study()
    write_report(compute(study), study, tmp_path)
    assert not stale.exists() and unrelated.exists()


def test_draw_figures_sections() -> None:
    sections = report_figures.draw_figures(compute(known_study()))
    assert [s.key for s in sections] == [
        "values", "effort", "learning-curves", "history", "intermediate", "importances",
        "parallel", "timeline",
    ]
    by_key = {s.key: s for s in sections}
    # Too few trials for importances: a note instead of a figure, never an exception.
    assert by_key["importances"].figure is None
    assert "at least 10" in (by_key["importances"].note or "")
    parallel = by_key["parallel"].figure
    assert parallel is not None
    assert [trace.name for trace in parallel.data] == ["all architectures", "cnn", "mlp"]
    assert [trace.visible for trace in parallel.data] == [True, False, False]
    timeline = by_key["timeline"].figure
    assert timeline is not None and timeline.layout.xaxis.type == "date"
