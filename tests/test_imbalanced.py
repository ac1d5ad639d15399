"""The second shipped example, ``studies/imbalanced.yaml``: imbalanced classes, macro F1,
a class-weighted loss, bf16, dict batches through ``train.step`` (issue 11, item 8)."""

from __future__ import annotations

import copy
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from sklearn.metrics import f1_score
from studyfiles import derive, open_results, write_study

from hpsearch.checkpoint.loading import load_model
from hpsearch.config import load_config, parse_config
from hpsearch.data import DeviceBatches, build

ROOT = Path(__file__).resolve().parents[1]
STUDY_FILE = ROOT / "studies" / "imbalanced.yaml"


@pytest.fixture()
def on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``studies.imbalanced`` importable, as from the repository root."""
    monkeypatch.syspath_prepend(str(ROOT))


def small() -> dict:
    """The shipped study, shrunk to run in seconds on 2 cores."""
    raw = yaml.safe_load(STUDY_FILE.read_text())
    return derive(
        raw,
        study={"n_trials": 4, "min_trials_per_architecture": 2, "pruner": {"name": "none"},
               "heartbeat_interval": 0.5, "grace_period": 5},
        data={"args": {"n_samples": 1500, "seed": 0}},
        train={"max_epochs": 3},
        resources={"devices": "cpu", "workers": 2, "torch_threads": 1},
        report={"seeds": 2},
    )


def test_the_shipped_study_is_what_the_issue_asks_for(on_path: None) -> None:
    cfg = load_config(STUDY_FILE)
    assert cfg.study.metric == cfg.checkpoint.monitor == "val_f1"
    assert cfg.checkpoint.mode == "max" and cfg.train.precision == "bf16"
    assert cfg.train.step == "studies.imbalanced:step"
    assert cfg.train.loss is not None and cfg.train.loss.name == "cross_entropy"
    from studies import imbalanced

    assert len(cfg.train.loss.arguments["weight"]) == len(imbalanced.CLASSES)
    # The data: Datasets with a collate function that makes dict batches, imbalanced classes.
    ds = build(cfg.data)
    assert ds.collate_fn is imbalanced.collate and ds.streams is not None
    counts = torch.bincount(ds.streams["train"].label, minlength=3).tolist()
    assert counts[0] > 5 * counts[1] > 5 * counts[2] > 0
    batch = next(DeviceBatches(ds, "train", torch.device("cpu"), in_memory=False)
                 .batches(16, torch.Generator().manual_seed(0)))
    assert set(batch) == {"numeric", "category", "label"}
    model = imbalanced.transaction_net(list(ds.input_shape), ds.output_size, hidden=8, depth=1)
    result = imbalanced.step(model, batch)
    assert result["outputs"].shape == (16, 3) and result["targets"] is batch["label"]


@pytest.mark.slow
def test_the_example_runs_end_to_end_ranked_by_val_f1_and_scored_by_test_f1(
        tmp_path: Path, on_path: None) -> None:
    raw = small()
    study_file = write_study(tmp_path, raw, "imbalanced.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-m", "hpsearch.run", study_file.name,
                          "--results-dir", "res"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    results = tmp_path / "res" / "imbalanced"
    with open(results / "architectures.csv", newline="") as handle:
        rows = {row["architecture"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == ["deep", "wide"]

    # Ranked by val_f1: each architecture's best val_f1 is its trials' best epoch's value.
    trials = open_results(results).trials
    for arch, row in rows.items():
        best = max(h["val_f1"] for t in trials if t.user_attrs.get("architecture") == arch
                   for h in t.user_attrs["history"])
        assert float(row["best_val_f1"]) == pytest.approx(best)
    leader = max(rows, key=lambda a: float(rows[a]["best_val_f1"]))
    assert rows[leader]["rank"] == "1"
    markdown = (results / "report.md").read_text()
    assert "best val_f1" in markdown and "test_f1" in markdown

    # Scored by test_f1: the leader's checkpoint, rebuilt and scored by hand on the test split.
    assert rows[leader]["seed_n"] == "2"
    assert math.isfinite(float(rows[leader]["seed_mean_test_f1"]))
    cfg = parse_config(copy.deepcopy(raw), "imbalanced.yaml")
    test = build(cfg.data).streams["test"]
    model = load_model(results / rows[leader]["checkpoint"])
    with torch.no_grad():
        pred = model({"numeric": test.numeric, "category": test.category}).argmax(1)
    assert float(rows[leader]["test_f1"]) == pytest.approx(
        f1_score(test.label, pred, average="macro"), abs=1e-5)

    # verify re-evaluates the study best through the step.
    check = subprocess.run([sys.executable, "-m", "hpsearch.verify", str(results)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "val_f1" in check.stdout, check.stdout + check.stderr
