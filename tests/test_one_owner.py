"""One owner per fact, seen from outside: the ranking rule everywhere, file permissions, and a
run that keeps its Ctrl-C handling through the report."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from studyfiles import derive, open_results, tiny, write_study

from hpsearch.checkpoint.study_best import read_best_meta, update_study_best
from hpsearch.files import atomic_torch_save

# A model whose output never depends on its input or its training: every trial of every
# architecture scores exactly the same, so every "best" is a tie.
CONSTANT_MODEL = '''
import torch
from torch import nn


class Constant(nn.Module):
    def __init__(self, output_size):
        super().__init__()
        self.register_buffer("logits", torch.zeros(output_size))
        self.unused = nn.Parameter(torch.zeros(1))  # the optimizer needs a parameter

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0.0 * self.unused


def make(input_shape, output_size, **params):
    return Constant(output_size)
'''


def tie_study(folder: Path) -> Path:
    (folder / "constmodel.py").write_text(CONSTANT_MODEL)
    raw = tiny(
        study={"name": "ties", "n_trials": 2, "sampler": {"name": "random", "seed": 0},
               "enqueue": [{"architecture": "zeta"}, {"architecture": "alpha"}]},
        model={"architecture": {"zeta": {"factory": "constmodel:make"},
                                "alpha": {"factory": "constmodel:make"}}},
        train={"max_epochs": 2, "lr": 0.001, "batch_size": 64},
        resources={"devices": "cpu", "workers": 1, "torch_threads": 1},
        report={"enabled": True, "seeds": 0},
    )
    return write_study(folder, raw)


def run_cli(folder: Path, *args: str, umask: int | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    def set_umask() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.run([sys.executable, "-m", *args], cwd=folder, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=set_umask)


@pytest.mark.slow
def test_a_tie_names_the_earlier_trial_everywhere_and_files_are_shared(tmp_path: Path) -> None:
    study_file = tie_study(tmp_path)
    # Under umask 022 everything a run writes must be readable by group and others.
    proc = run_cli(tmp_path, "hpsearch.run", study_file.name, "--results-dir", "res",
                   umask=0o022)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = tmp_path / "res" / "ties"
    study = open_results(results)
    values = [t.value for t in study.trials]
    assert values[0] == values[1], values  # the tie this test is about
    assert study.best_trial.number == 0
    assert [t.params["architecture"] for t in study.trials] == ["zeta", "alpha"]

    # best/, the run summary, the report's winner and the report CLI's winner line.
    assert read_best_meta(results)["trial"] == 0
    assert "Best trial 0:" in proc.stdout, proc.stdout
    rows = (results / "architectures.csv").read_text().splitlines()
    header = rows[0].split(",")
    first = dict(zip(header, rows[1].split(",")))
    assert first["architecture"] == "zeta", rows
    assert "trial 0" in (results / "report.md").read_text().split("## ", 2)[1]
    again = run_cli(tmp_path, "hpsearch.report", "res/ties", "--no-seeds")
    assert again.returncode == 0, again.stderr
    winner = [line for line in again.stdout.splitlines() if line.startswith("winner:")]
    assert winner and "zeta (trial 0," in winner[0], again.stdout

    readable = stat.S_IRGRP | stat.S_IROTH
    written = [results / name for name in ("report.html", "report.md", "architectures.csv",
                                           "trials.csv", "config.yaml")]
    written += [results / "best" / "model.pt", results / "best" / "meta.json"]
    written += sorted((results / "trials").glob("*/*.pt"))
    written += sorted((results / "trials").glob("*/manifest.json"))
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & readable == readable, f"{path}: {oct(mode)}"


def test_the_study_best_goes_to_the_earlier_trial_whatever_finishes_first(
        tmp_path: Path) -> None:
    model = tmp_path / "m.pt"
    atomic_torch_save({"model_state_dict": {}}, model)
    # Trial 1 finishes first; trial 0 then ties it and, being earlier, becomes the best
    # (Optuna's best_trial); a later tie never replaces it.
    assert update_study_best(tmp_path, model, {"trial": 1, "value": 0.5}, minimize=True)
    assert update_study_best(tmp_path, model, {"trial": 0, "value": 0.5}, minimize=True)
    assert not update_study_best(tmp_path, model, {"trial": 2, "value": 0.5}, minimize=True)
    assert read_best_meta(tmp_path)["trial"] == 0


@pytest.mark.slow
def test_ctrl_c_during_seed_retrains_stops_them_and_says_so(tmp_path: Path) -> None:
    raw = derive(
        tiny(study={"name": "retrains", "n_trials": 2, "sampler": {"name": "random", "seed": 0}}),
        data={"name": "mnist1d", "args": {"num_samples": 2000}},
        train={"max_epochs": 40, "lr": 0.003, "batch_size": 32, "early_stopping": None},
        resources={"devices": "cpu", "workers": 1, "torch_threads": 1},
        report={"enabled": True, "seeds": 4},
    )
    raw["model"] = {"architecture": {"mlp": {"hidden": 256}}}
    study_file = write_study(tmp_path, raw)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        # Its own session, like a terminal job: Ctrl-C goes to the whole process group.
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "hpsearch.run", study_file.name, "--results-dir",
             "res", "--n-trials", "1"],
            cwd=tmp_path, stdout=fo, stderr=fe, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 240
            while "retraining each architecture" not in out.read_text():
                assert proc.poll() is None, out.read_text() + err.read_text()
                assert time.monotonic() < deadline, out.read_text()
                time.sleep(0.2)
            time.sleep(1.0)  # the retrains are under way
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = out.read_text(), err.read_text()
    assert code == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr, stdout + stderr
    assert "interrupted during the report" in stdout, stdout
    assert "interrupted before the study started" not in stdout + stderr
    results = tmp_path / "res" / "retrains"
    assert not (results / "report.html").exists()
    # The study itself is whole: the trial is complete and the best is kept.
    assert [t.state.name for t in open_results(results).trials] == ["COMPLETE"]
    assert json.loads((results / "best" / "meta.json").read_text())["trial"] == 0
    assert torch.load(results / "best" / "model.pt", weights_only=True)["model_state_dict"]
