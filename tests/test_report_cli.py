"""``python -m hpsearch.report``: rebuild the report of a real (tiny) study from its files."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
from studyfiles import tiny, write_study

from hpsearch.report import main

pytestmark = pytest.mark.slow

STUDY = tiny(
    model={"architecture": {
        "linear": {},
        "mlp": {"hidden": {"type": "int", "low": 16, "high": 64, "log": True}},
    }},
    train={"max_epochs": 3},
    checkpoint={"keep_top_k_trials": 5},
    report={"seeds": 2},
)
FILES = ("report.html", "report.md", "architectures.csv", "trials.csv")


def _python(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def study_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 6-trial study (without its report): (working folder, study file)."""
    tmp_path = tmp_path_factory.mktemp("report-cli")
    study = write_study(tmp_path, STUDY)
    out = _python(tmp_path, "hpsearch.run", str(study), "--results-dir", "res")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (tmp_path / "res/tiny/report.md").exists()
    return tmp_path, study


def _architectures(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "architectures.csv", newline="") as handle:
        return {row["architecture"]: row for row in csv.DictReader(handle)}


def test_rebuilds_the_report_from_a_results_folder(study_run) -> None:
    tmp_path, _ = study_run
    out = _python(tmp_path, "hpsearch.report", "res/tiny")
    assert out.returncode == 0, out.stdout + out.stderr
    folder = tmp_path / "res/tiny"
    for name in FILES:
        assert (folder / name).is_file()
        assert f"wrote res/tiny/{name}" in out.stdout

    rows = _architectures(folder)
    assert sorted(rows) == ["linear", "mlp"]
    assert sorted(row["rank"] for row in rows.values()) == ["1", "2"]
    for row in rows.values():
        assert math.isfinite(float(row["test_acc"]))
        assert row["seed_n"] == "2"
        low, high = float(row["seed_ci95_low_test_acc"]), float(row["seed_ci95_high_test_acc"])
        assert low <= float(row["seed_mean_test_acc"]) <= high

    leader = next(name for name, row in rows.items() if row["rank"] == "1")
    assert f"winner: {leader} (trial {rows[leader]['best_trial']}," in out.stdout
    markdown = (folder / "report.md").read_text()
    table = markdown.split("## Architectures", 1)[1].split("## ", 1)[0]
    ranked = [line.split("|")[1].strip() for line in table.splitlines()
              if line.startswith("| ") and not line.startswith("| architecture")]
    runner_up = next(name for name in rows if name != leader)
    assert ranked == [leader, runner_up]


def test_study_file_and_no_seeds(study_run, capsys) -> None:
    tmp_path, study = study_run
    code = main([str(study), "--results-dir", str(tmp_path / "res"), "--no-seeds"])
    assert code == 0
    rows = _architectures(tmp_path / "res/tiny")
    assert sorted(rows) == ["linear", "mlp"]
    for row in rows.values():
        assert math.isfinite(float(row["test_acc"]))
        assert (row["seed_n"], row["seed_values"]) == ("0", "")
    assert "winner: " in capsys.readouterr().out


def test_missing_target_exits_2_with_one_line(tmp_path: Path) -> None:
    out = _python(tmp_path, "hpsearch.report", "nonexistent")
    assert out.returncode == 2
    assert out.stderr.startswith("error: nonexistent") and len(out.stderr.splitlines()) == 1


@pytest.mark.parametrize("target", ["plain", "bad.yaml", "fresh.yaml"])
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, monkeypatch, capsys,
                                            target: str) -> None:
    (tmp_path / "plain").mkdir()  # a folder, but not a results folder
    (tmp_path / "bad.yaml").write_text("study: [unclosed\n")
    write_study(tmp_path, STUDY, name="fresh.yaml")  # valid, but never run
    monkeypatch.chdir(tmp_path)
    assert main([target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "results").exists()  # a failed report creates nothing
