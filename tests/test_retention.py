"""The incremental bookkeeping (TrialIndex, Retention) agrees with recomputing from all trials."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import optuna
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from studyfiles import TINY

from hpsearch.checkpoint.retention import Retention, select_kept
from hpsearch.config import parse_config
from hpsearch.storage.trials import TrialIndex, counted, fail_trial, retried_numbers

ARCHS = ["linear", "mlp", "cnn1d"]
STATES = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING]

event = st.tuples(
    st.sampled_from(STATES),
    st.floats(0.0, 1.0, allow_nan=False),
    st.sampled_from(ARCHS),
    st.booleans(),  # a FAIL is retried
)


def _add(study: optuna.Study, state: TrialState, value: float, arch: str, retried: bool) -> None:
    dist = {"architecture": CategoricalDistribution(ARCHS)}
    if state == TrialState.FAIL and retried:
        study.add_trial(create_trial(state=TrialState.RUNNING, params={"architecture": arch},
                                     distributions=dist))
        fail_trial(study, study.get_trials()[-1], "died", retry=True, max_retries=5)
        return
    study.add_trial(create_trial(
        state=state, params={"architecture": arch}, distributions=dist,
        value=value if state == TrialState.COMPLETE else None,
        user_attrs={"best_value": value} if state == TrialState.PRUNED else {},
    ))


@settings(max_examples=60, deadline=None)
@given(events=st.lists(event, min_size=1, max_size=40), k=st.integers(1, 4),
       minimize=st.booleans(), every=st.integers(1, 5))
def test_incremental_view_matches_recomputing(events, k, minimize, every) -> None:
    raw = copy.deepcopy(TINY)
    raw["study"]["direction"] = "minimize" if minimize else "maximize"
    raw["checkpoint"]["keep_top_k_trials"] = k
    config = parse_config(raw, "s.yaml")
    study = optuna.create_study(direction=raw["study"]["direction"])
    index = TrialIndex()
    retention = Retention(config)
    for i, ev in enumerate(events):
        _add(study, *ev)
        if i % every:  # the view is brought up to date at irregular intervals
            continue
        trials = study.get_trials(deepcopy=False)
        index.update(trials)
        for t in retention.index.update(trials):
            retention._take(t)
        assert index.retried == retried_numbers(trials)
        assert index.counted(trials) == counted(trials)
        assert {t.number for t in trials[:index.settled]} <= set(index.finished)
        complete = [(t.number, t.value, t.params["architecture"]) for t in trials
                    if t.state == TrialState.COMPLETE]
        pruned = [(t.number, t.user_attrs["best_value"], t.params["architecture"])
                  for t in trials if t.state == TrialState.PRUNED]
        assert retention.kept() == select_kept(complete, k, minimize, pruned)


def _checkpoint(results: Path, number: int, value: float) -> None:
    folder = results / "trials" / str(number)
    folder.mkdir(parents=True)
    (folder / "epoch000.pt").write_bytes(b"x")
    entry = {"kind": "best", "epoch": 0, "value": value, "sha256": ""}
    (folder / "manifest.json").write_text(json.dumps(
        {"files": {"epoch000.pt": entry}, "monitor": "val_acc", "mode": "max"}))


def test_retention_deletes_only_what_is_no_longer_kept(tmp_path: Path) -> None:
    raw = copy.deepcopy(TINY)
    raw["checkpoint"]["keep_top_k_trials"] = 1
    config = parse_config(raw, "s.yaml")  # maximize val_acc
    study = optuna.create_study(direction="maximize")
    retention = Retention(config)
    for number, value in enumerate([0.5, 0.7, 0.6]):
        _add(study, TrialState.COMPLETE, value, "mlp", False)
        _checkpoint(tmp_path, number, value)
        (tmp_path / ".hpsearch").mkdir(exist_ok=True)
        deleted = retention.apply(study, tmp_path, number)
        assert deleted == {0: [], 1: [0], 2: [2]}[number]
    left = sorted(p.parent.name for p in tmp_path.glob("trials/*/epoch000.pt"))
    assert left == ["1"]


def test_two_workers_keep_exactly_the_protected_trials(tmp_path: Path) -> None:
    """Each worker reads the study for its claims between its own retention passes, as the
    real loop does; trials the other worker finished meanwhile must still count."""
    raw = copy.deepcopy(TINY)
    raw["checkpoint"]["keep_top_k_trials"] = 2
    config = parse_config(raw, "s.yaml")
    study = optuna.create_study(direction="maximize")
    (tmp_path / ".hpsearch").mkdir()
    workers = [(TrialIndex(), Retention(config)) for _ in range(2)]
    values = [0.2, 0.9, 0.5, 0.8, 0.3, 0.95, 0.1, 0.6]
    for number, value in enumerate(values):
        claims, retention = workers[number % 2]
        claims.update(study.get_trials(deepcopy=False))  # the claim before the trial
        _add(study, TrialState.COMPLETE, value, ARCHS[number % 2], False)
        _checkpoint(tmp_path, number, value)
        retention.apply(study, tmp_path, number)
    holders = {int(p.parent.name) for p in tmp_path.glob("trials/*/epoch000.pt")}
    complete = [(n, v, ARCHS[n % 2]) for n, v in enumerate(values)]
    assert holders == select_kept(complete, 2, False) == {1, 2, 5}
