"""A real 2-worker run on tiny data, end to end, through the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState
from studyfiles import open_results, tiny, write_study

import hpsearch
from hpsearch.checkpoint.study_best import read_best_meta
from hpsearch.config import parse_config
from hpsearch.data import DeviceBatches
from hpsearch.data import load as load_data
from hpsearch.train import evaluate

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, study: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpsearch.run", str(study), "--results-dir", "res", *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    raw = tiny(study={"n_trials": 8, "pruner": {"name": "median", "n_startup_trials": 2,
                                                  "n_warmup_steps": 1}})
    study = write_study(tmp_path, raw)
    out = _run(tmp_path, study)
    assert out.returncode == 0, out.stdout + out.stderr
    return tmp_path, study, raw, out


def test_run_finishes_every_trial(finished) -> None:
    tmp_path, _, raw, out = finished
    study = open_results(tmp_path / "res/tiny")
    trials = study.get_trials()
    assert len(trials) == 8
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2  # both worker processes took trials
    for t in trials:
        assert sorted(t.intermediate_values) == list(range(len(t.intermediate_values)))
        assert len(t.intermediate_values) == len(t.user_attrs["history"])
        assert {"architecture", "n_params", "device", "worker", "train_seconds",
                "best_epoch", "best_value"} <= set(t.user_attrs)
        if t.state == TrialState.COMPLETE:
            assert t.value == t.user_attrs["history"][t.user_attrs["best_epoch"]]["val_acc"]
    assert "Best trial" in out.stdout and "load_best_model" in out.stdout
    assert (tmp_path / "res/tiny/run.log").exists()
    assert all((tmp_path / f"res/tiny/trials/{t.number}/train.log").exists() for t in trials)


def test_global_best_is_the_study_best(finished) -> None:
    tmp_path, _, _, _ = finished
    study = open_results(tmp_path / "res/tiny")
    meta = read_best_meta(tmp_path / "res/tiny")
    assert meta["trial"] == study.best_trial.number
    assert meta["value"] == study.best_value
    assert meta["params"] == study.best_trial.params


def test_only_top_k_trials_keep_checkpoints(finished) -> None:
    tmp_path, _, raw, _ = finished
    study = open_results(tmp_path / "res/tiny")
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    ranked = sorted(complete, key=lambda t: -t.value)
    protected = {t.number for t in ranked[:2]}
    for arch in {t.params["architecture"] for t in complete}:
        protected.add(next(t.number for t in ranked if t.params["architecture"] == arch))
    # An architecture that never completed keeps its best pruned trial, for the report.
    pruned = sorted((t for t in trials if t.state == TrialState.PRUNED),
                    key=lambda t: -t.user_attrs["best_value"])
    for arch in {t.params["architecture"] for t in pruned} - {
            t.params["architecture"] for t in complete}:
        protected.add(next(t.number for t in pruned if t.params["architecture"] == arch))
    holders = {int(p.parent.name) for p in (tmp_path / "res/tiny/trials").glob("*/*.pt")}
    assert holders == protected
    for p in (tmp_path / "res/tiny/trials").glob("*/*.pt"):
        torch.load(p, weights_only=True)


def test_load_best_model_reproduces_the_study_best(finished) -> None:
    tmp_path, study_file, raw, _ = finished
    results = tmp_path / "res/tiny"
    model = hpsearch.load_best_model(results)
    assert not model.training
    config = parse_config(raw, "s.yaml")
    dataset = load_data(config.data, results / "data")
    val = DeviceBatches(dataset, "val", torch.device("cpu"), in_memory=True)
    acc = evaluate(model, val, dataset.task)["acc"]
    assert math.isclose(acc, read_best_meta(results)["value"], rel_tol=1e-6)


def test_verify_passes_and_catches_a_changed_value(finished, tmp_path) -> None:
    run_dir, _, _, _ = finished
    out = subprocess.run([sys.executable, "-m", "hpsearch.verify", "res/tiny"], cwd=run_dir,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "reproduced" in out.stdout
    # A copy whose recorded value is off must fail verification.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "res/tiny", copy, symlinks=True)
    meta_path = (copy / "best").resolve() / "meta.json"
    meta = json.loads(meta_path.read_text())
    ckpt = torch.load(copy / "best/model.pt", weights_only=True)
    ckpt["value"] = ckpt["value"] + 0.25
    torch.save(ckpt, copy / "best/model.pt.new")
    (copy / "best/model.pt").unlink()
    (copy / "best/model.pt.new").rename(copy / "best/model.pt")
    from hpsearch.files import sha256_file

    meta["sha256"] = sha256_file(copy / "best/model.pt")
    meta_path.write_text(json.dumps(meta))
    out = subprocess.run([sys.executable, "-m", "hpsearch.verify", str(copy)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "NOT reproduced" in out.stderr


def test_rerun_continues_to_the_new_total(finished) -> None:
    tmp_path, study, _, _ = finished
    out = _run(tmp_path, study, "--n-trials", "10")
    assert out.returncode == 0, out.stderr
    trials = open_results(tmp_path / "res/tiny").get_trials()
    assert len(trials) == 10
    again = _run(tmp_path, study, "--n-trials", "10")
    assert again.returncode == 0
    trials = open_results(tmp_path / "res/tiny").get_trials()
    assert len(trials) == 10  # already at the total: nothing new
