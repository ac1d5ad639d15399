"""``python -m hpsearch.report``: rebuild the report of a real (tiny) study from its files."""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from studyfiles import derive, tiny, write_study

from hpsearch import files
from hpsearch.errors import Interrupted
from hpsearch.report import build_report
from hpsearch.report.__main__ import main
from hpsearch.storage.backends import open_study
from hpsearch.workers.slots import Slot

pytestmark = pytest.mark.slow

STUDY = tiny(
    # Each architecture gets its 3 of the 6 trials, so the report ranks both.
    study={"min_trials_per_architecture": 3},
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


def test_the_suggested_command_tops_up_under_explored_architectures(tmp_path: Path) -> None:
    # Two trials, one per architecture, of the two each needs: neither is judged, and the
    # report's command continues the study until both have theirs.
    study = write_study(tmp_path, derive(STUDY, study={"n_trials": 2,
                                                       "min_trials_per_architecture": 2},
                                         report={"enabled": True, "seeds": 0}))
    out = _python(tmp_path, "hpsearch.run", str(study), "--results-dir", "res")
    assert out.returncode == 0, out.stdout + out.stderr
    folder = tmp_path / "res/tiny"
    rows = _architectures(folder)
    assert {name: (row["explored"], row["rank"], row["exploration_note"])
            for name, row in rows.items()} == {
        "linear": ("False", "", "1 of 2 finished trials"),
        "mlp": ("False", "", "1 of 2 finished trials"),
    }
    markdown = (folder / "report.md").read_text()
    assert "No architecture is explored enough to name a best one." in markdown
    command = markdown.split("```sh\n", 1)[1].split("\n```", 1)[0]
    assert command == ("python -m hpsearch.run res/tiny/config.yaml --results-dir res "
                       "--n-trials 4")

    again = _python(tmp_path, *command.split()[2:])
    assert again.returncode == 0, again.stdout + again.stderr
    rows = _architectures(folder)
    assert {name: (row["explored"], row["trials"]) for name, row in rows.items()} == {
        "linear": ("True", "2"), "mlp": ("True", "2"),
    }
    assert sorted(row["rank"] for row in rows.values()) == ["1", "2"]
    assert "More trials needed" not in (folder / "report.md").read_text()


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


def test_progress_is_reported_once_per_seed_retrain(study_run) -> None:
    tmp_path, study_file = study_run
    config, layout, study = open_study(study_file, tmp_path / "res")
    lines: list[str] = []
    slots = [Slot(0, "cpu", 1), Slot(1, "cpu", 1)]
    build_report(config, study, layout, slots, on_progress=lines.append)
    n = 2 * config.report.seeds  # two architectures
    assert lines[0] == (f"report: retraining each architecture's best with "
                        f"{config.report.seeds} seeds on 2 slots")
    done = lines[1:]
    assert len(done) == n
    seeds = [(m["arch"], int(m["seed"])) for m in
             (re.fullmatch(rf"report: seed retrain {i}/{n} done \((?P<arch>\w+), seed "
                           r"(?P<seed>\d+)\)", line) for i, line in enumerate(done, start=1))
             if m is not None]
    assert len(seeds) == n
    assert sorted(seeds) == sorted((a, s) for a in ("linear", "mlp")
                                   for s in (1_000_000, 1_000_001))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_during_seed_retrains_exits_with_one_line(study_run, sig: int,
                                                                    code: int) -> None:
    tmp_path, _ = study_run
    folder = tmp_path / "res/tiny"
    before = {name: (folder / name).stat().st_ino for name in FILES if (folder / name).exists()}
    # The same study with many seeds of longer retrains, so that they are still running when
    # Ctrl-C comes (50 seeds of the 3-epoch study can all finish within a few seconds).
    busy = write_study(tmp_path, derive(STUDY, report={"seeds": 50}, train={"max_epochs": 40}),
                       name="busy.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpsearch.report", str(busy), "--results-dir", "res"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("report: seed retrain 1/"):
                break  # the retrains are running: 99 are left
        os.killpg(proc.pid, sig)  # a terminal's Ctrl-C reaches the whole group
        started = time.monotonic()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - started < 20
    assert proc.returncode == code, out + err
    assert err.splitlines() == [
        "interrupted: the report was not written; the study is unchanged"
    ], err
    after = {name: (folder / name).stat().st_ino for name in FILES if (folder / name).exists()}
    assert after == before


def test_an_interrupt_during_seed_retrains_propagates_at_once(study_run) -> None:
    # The run's signal handler raises Interrupted in the main thread; here the progress
    # callback does, as each retrain's line is printed.
    tmp_path, study_file = study_run
    config, layout, study = open_study(study_file, tmp_path / "res")
    config = config.model_copy(update={"report": config.report.model_copy(update={"seeds": 50})})
    before = {name: (layout.root / name).stat().st_ino
              for name in FILES if (layout.root / name).exists()}
    lines: list[str] = []

    def interrupt_after_first(text: str) -> None:
        lines.append(text)
        if "done" in text:
            raise Interrupted()

    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "tasks cancelled" warning either
        with pytest.raises(Interrupted):
            build_report(config, study, layout, [Slot(0, "cpu", 1), Slot(1, "cpu", 1)],
                         on_progress=interrupt_after_first)
    assert time.monotonic() - started < 60
    assert len(lines) == 2 and "1/100 done" in lines[1]
    after = {name: (layout.root / name).stat().st_ino
             for name in FILES if (layout.root / name).exists()}
    assert after == before


def test_a_failed_write_exits_1_naming_the_file(study_run, monkeypatch, capsys) -> None:
    tmp_path, _ = study_run
    folder = tmp_path / "res/tiny"
    real_replace = os.replace

    def full_disk(src: str, dst: str | Path) -> None:
        if Path(dst).name == "report.md":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", full_disk)
    assert main([str(folder), "--no-seeds"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: cannot write {folder / 'report.md'}: No space left on device"
    ]
