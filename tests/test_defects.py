"""Every README claim, tried (issue 15): each defect found by trying one, as a test that fails
before its fix.

Most tests run ``python -m hpsearch.run`` as a user would, on tiny regression data.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import tomllib
import torch
from optuna.trial import TrialState
from studyfiles import derive, open_results, regression, write_study

import hpsearch
from hpsearch.checkpoint.retention import retired_checkpoints
from hpsearch.checkpoint.study_best import update_study_best
from hpsearch.config import load_config
from hpsearch.dashboard import RETIRED_NOTE, PresentedStorage
from hpsearch.errors import CheckpointError
from hpsearch.files import atomic_torch_save
from hpsearch.optuna_private import storage_of, study_id, trial_id
from hpsearch.results import ResultsLayout
from hpsearch.run import run_config
from hpsearch.samplers import PRUNERS, REQUIRES, SAMPLERS, missing_packages

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RUN_TIMEOUT = 240.0
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def run_cli(folder: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``python -m hpsearch.run ARGS`` in ``folder``."""
    return subprocess.run(
        [sys.executable, "-m", "hpsearch.run", *args], cwd=folder, capture_output=True,
        text=True, timeout=timeout, env=None if env is None else {**os.environ, **env},
    )


def small(name: str, **sections: Any) -> dict[str, Any]:
    """REGRESSION, smaller still: one worker on the CPU, a handful of quick epochs."""
    raw = regression(
        study={"name": name},
        data={"args": {"n_samples": 200}},
        train={"max_epochs": 2, "batch_size": 64},
        resources={"devices": "cpu", "workers": 1, "torch_threads": 1},
    )
    return derive(raw, **sections)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return lines[0]


def reference_names(key: str) -> list[str]:
    """The names the README's reference table lists for ``study.sampler`` / ``study.pruner``."""
    reference = README.split("## Study file reference", 1)[1].split("\n## ", 1)[0]
    row = re.search(rf"^\| `{re.escape(key)}` \|[^|]*\| `name`: ([^;]+);", reference, re.M)
    assert row, f"no {key} row in the README's reference table"
    return [re.sub(r"\s*\(.*\)$", "", n).strip() for n in row.group(1).split(", ")]


# ---------------------------------------------------------------- 1. a rerun draws new points


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_rerunning_a_seeded_study_never_replays_earlier_params(tmp_path: Path,
                                                               sampler: str) -> None:
    raw = small("seeded", study={"n_trials": 3, "sampler": {"name": sampler, "seed": 1}},
                train={"max_epochs": 1})
    study_file = write_study(tmp_path, raw)
    for n_trials in ("3", "6"):
        proc = run_cli(tmp_path, study_file.name, "--results-dir", "res", "--workers", "1",
                       "--n-trials", n_trials)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    trials = open_results(tmp_path / "res" / "seeded").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(drawn)) == 6, f"the rerun replayed earlier trials: {drawn}"


# ---------------------------------------------------------------- 2. every sampler and pruner

# What a sampler or pruner needs beyond its name. The space is finite (grid, bruteforce) and
# numeric besides the architecture (cmaes, gp); one start-up trial, so the model-based
# samplers do their own work (and import their packages) within three trials.
SWEEP_SPACE = {
    "model": {"architecture": {"mlp": {"hidden": {"type": "int", "low": 8, "high": 16,
                                                  "step": 8}}}},
    "train": {"max_epochs": 3, "lr": {"type": "float", "low": 0.001, "high": 0.003,
                                      "step": 0.001}},
}
SAMPLER_ARGS: dict[str, dict[str, Any]] = {
    "grid": {"search_space": {"architecture": ["mlp"], "mlp.hidden": [8, 16],
                              "lr": [0.001, 0.002, 0.003]}},
    "cmaes": {"n_startup_trials": 1},
    "gp": {"n_startup_trials": 1},
    "tpe": {"n_startup_trials": 1},
}
PRUNER_ARGS: dict[str, dict[str, Any]] = {
    "percentile": {"percentile": 50.0},
    "threshold": {"upper": 1e9},
    "patient": {"patience": 1, "wrapped": {"name": "median"}},
}


def test_the_readme_lists_every_sampler_and_pruner_there_is() -> None:
    assert sorted(reference_names("study.sampler")) == sorted(SAMPLERS)
    assert sorted(reference_names("study.pruner")) == sorted(PRUNERS)


def test_every_package_a_sampler_or_pruner_needs_is_a_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = {re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower()
                 for d in project["dependencies"]}
    needed = {m.split(".")[0] for modules in REQUIRES.values() for m in modules}
    assert needed - installed == set(), "pip install -e . would leave these out"
    for name in [*SAMPLERS, *PRUNERS]:
        assert missing_packages(name) == [], f"{name}: run pip install -e '.[dev]'"


@pytest.mark.slow
def test_every_sampler_and_pruner_the_readme_lists_runs_a_study(tmp_path: Path) -> None:
    samplers, pruners = reference_names("study.sampler"), reference_names("study.pruner")
    pairs = list(itertools.zip_longest(samplers, pruners, fillvalue=None))
    failures = []
    for index, (sampler, pruner) in enumerate(pairs):
        sampler, pruner = sampler or "random", pruner or "none"
        raw = small(
            f"sweep{index}",
            study={"n_trials": 3,
                   "sampler": {"name": sampler, "seed": 0, **SAMPLER_ARGS.get(sampler, {})},
                   "pruner": {"name": pruner, **PRUNER_ARGS.get(pruner, {})}},
            **SWEEP_SPACE,
        )
        config = load_config(write_study(tmp_path, raw, f"{sampler}-{pruner}.yaml"))
        result = run_config(config, tmp_path / "res", handle_signals=False)
        states = [t.state.name for t in open_results(result.results_dir).trials]
        reasons = {str(t.user_attrs.get("fail_reason"))
                   for t in open_results(result.results_dir).trials
                   if t.state == TrialState.FAIL}
        if (result.exit_code != 0 or len(states) != 3
                or not set(states) <= {"COMPLETE", "PRUNED"}):
            failures.append(f"{sampler} + {pruner}: exit {result.exit_code}, {states}, "
                            f"{sorted(reasons)}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_a_missing_sampler_package_stops_before_any_work(tmp_path: Path) -> None:
    # What a machine without the package sees: importing it fails.
    fake = tmp_path / "without_cmaes"
    fake.mkdir()
    (fake / "cmaes.py").write_text("raise ImportError('No module named cmaes')\n")
    raw = small("nocmaes", study={"sampler": {"name": "cmaes", "seed": 0}})
    study_file = write_study(tmp_path, raw)
    proc = run_cli(tmp_path, study_file.name, "--results-dir", "res",
                   env={"PYTHONPATH": str(fake)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = one_error_line(proc)
    assert "study.yaml" in line and "study.sampler" in line, line
    assert "'cmaes'" in line and "pip install cmaes" in line, line
    assert not (tmp_path / "res").exists()


# ---------------------------------------------------------------- 3, 4. CUDA on a CPU machine


@NO_CUDA
@pytest.mark.slow
@pytest.mark.parametrize("where", ["flag", "study file"])
def test_cuda_devices_on_a_cpu_machine_stop_before_anything_is_written(tmp_path: Path,
                                                                       where: str) -> None:
    if where == "flag":
        study_file = write_study(tmp_path, small("nocuda"))
        proc = run_cli(tmp_path, study_file.name, "--results-dir", "res", "--devices", "cuda:0")
    else:
        study_file = write_study(tmp_path, small("nocuda", resources={"devices": ["cuda:0"]}))
        proc = run_cli(tmp_path, study_file.name, "--results-dir", "res")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = one_error_line(proc)
    assert "resources.devices" in line and "cuda:0" in line, line
    assert "CUDA is not available" in line, line
    assert not ResultsLayout(tmp_path / "res" / "nocuda").root.exists()


@NO_CUDA
def test_loading_onto_cuda_on_a_cpu_machine_says_cuda_is_not_available(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    atomic_torch_save({"model_state_dict": {"weight": torch.zeros(3)}}, model)
    update_study_best(tmp_path, model, {"trial": 0, "value": 0.5}, minimize=True)
    for load in (hpsearch.load_checkpoint, hpsearch.load_best_model):
        with pytest.raises(CheckpointError) as err:
            load(tmp_path, map_location="cuda:0")
        assert "CUDA is not available" in str(err.value)
        assert "corrupt" not in str(err.value)


# ---------------------------------------------------------------- 5. the resume hint


@pytest.mark.slow
def test_ctrl_c_resume_hint_repeats_the_flags(tmp_path: Path) -> None:
    raw = small("hint", study={"n_trials": 2}, data={"args": {"n_samples": 1000}},
                train={"max_epochs": 200, "batch_size": 8})
    study_file = write_study(tmp_path, raw)
    status = ResultsLayout(tmp_path / "OUT" / "hint").status_file(0)
    out = tmp_path / "out.txt"
    with open(out, "w") as fo:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "hpsearch.run", study_file.name, "--results-dir", "OUT",
             "--devices", "cpu", "--workers", "1"],
            cwd=tmp_path, stdout=fo, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while not _training(status):
                assert proc.poll() is None, out.read_text()
                assert time.monotonic() < deadline, out.read_text()
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = out.read_text()
    assert code == 130, output
    hint = output.split("Resume with:", 1)
    assert len(hint) == 2, output
    assert "--results-dir OUT --devices cpu --workers 1" in hint[1].splitlines()[0], output


def _training(status: Path) -> bool:
    try:
        return json.loads(status.read_text()).get("state") == "training"
    except (FileNotFoundError, json.JSONDecodeError):
        return False


# ---------------------------------------------------------------- 6. a grid runs out cleanly


@pytest.mark.slow
def test_a_grid_smaller_than_n_trials_ends_cleanly(tmp_path: Path) -> None:
    raw = small(
        "grid",
        study={"n_trials": 6, "sampler": {"name": "grid", "search_space": {
            "architecture": ["mlp"], "mlp.hidden": [8, 16], "lr": [0.001, 0.01]}}},
        model={"architecture": {"mlp": {"hidden": {"type": "categorical",
                                                   "choices": [8, 16]}}}},
        train={"max_epochs": 1, "lr": {"type": "categorical", "choices": [0.001, 0.01]}},
    )
    study_file = write_study(tmp_path, raw)
    proc = run_cli(tmp_path, study_file.name, "--results-dir", "res", "--workers", "1")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "stopped with an error" not in output, output
    trials = open_results(tmp_path / "res" / "grid").trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4, [(t.number, t.state.name) for t in trials]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4


# ---------------------------------------------------------------- 7. deleted checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("store", ["none", "filesystem"])
def test_a_pruned_trials_deleted_checkpoint_is_not_offered(tmp_path: Path, store: str) -> None:
    # Every trial is pruned after its first epoch; only the best pruned one keeps its file.
    raw = small(
        "pruned",
        study={"n_trials": 3, "metric": "val_mse",
               "pruner": {"name": "threshold", "upper": 0.0}},
        train={"max_epochs": 4},
        checkpoint={"save": "last", "keep_top_k_trials": 1},
        artifacts={"store": store},
    )
    study_file = write_study(tmp_path, raw)
    proc = run_cli(tmp_path, study_file.name, "--results-dir", "res")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = tmp_path / "res" / "pruned"
    study = open_results(results)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3
    assert all(t.user_attrs.get("checkpoint") for t in trials)
    missing = {t.number for t in trials if not (results / t.user_attrs["checkpoint"]).exists()}
    assert len(missing) == 2, [t.user_attrs["checkpoint"] for t in trials]

    storage, sid = storage_of(study), study_id(study)
    assert retired_checkpoints(storage, sid) == missing
    view = PresentedStorage(storage)
    shown = {t.number: t.user_attrs["checkpoint"] for t in view.get_all_trials(sid)}
    for t in trials:
        one = view.get_trial(trial_id(t)).user_attrs["checkpoint"]
        if t.number in missing:
            assert shown[t.number] == one == RETIRED_NOTE
            assert "deleted" in RETIRED_NOTE
        else:
            assert shown[t.number] == one == t.user_attrs["checkpoint"]


# ---------------------------------------------------------------- 8. --workers 0


@pytest.mark.slow
def test_zero_workers_names_the_key_and_what_is_allowed(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, small("zero"))
    proc = run_cli(tmp_path, study_file.name, "--results-dir", "res", "--workers", "0")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = one_error_line(proc)
    assert "resources.workers" in line and "whole number" in line, line
    assert "≥ 1" in line and "auto" in line, line
    assert not (tmp_path / "res").exists()


# ---------------------------------------------------------------- 9. the summary and the layout


@pytest.fixture(scope="module")
def unsearched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished run (report included) that searches only the architecture."""
    folder = tmp_path_factory.mktemp("unsearched")
    raw = small("unsearched", study={"n_trials": 2, "sampler": {"name": "random", "seed": 0}},
                model={"architecture": {"linear": {}, "mlp": {}}},
                train={"lr": 0.003}, report={"enabled": True, "seeds": 0})
    study_file = write_study(folder, raw)
    proc = run_cli(folder, study_file.name, "--results-dir", "res")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder / "res" / "unsearched", proc.stdout


@pytest.mark.slow
def test_summary_has_no_empty_params_line(unsearched: tuple[Path, str]) -> None:
    _, stdout = unsearched
    assert "Best trial" in stdout, stdout
    assert not re.search(r"^\s*params:\s*$", stdout, flags=re.M), stdout


def readme_layout_names() -> set[str]:
    """Every file or folder name the README's results layout mentions."""
    section = README.split("## Results layout", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    names = set()
    for token in re.split(r"[\s,]+", block):
        names.update(part for part in token.split("/") if part)
    return names


@pytest.mark.slow
def test_readme_results_layout_names_everything_a_run_leaves(
        unsearched: tuple[Path, str]) -> None:
    results, _ = unsearched
    layout = ResultsLayout(results)
    documented = readme_layout_names()
    left = {p.name for p in layout.root.iterdir()}
    left |= {p.name for p in layout.control.iterdir()}
    left |= {p.name for p in layout.trials.glob("*/*") if p.suffix != ".pt"}
    assert layout.best_stages.is_dir() and layout.config_copy.is_file()
    assert left - documented == set(), f"the README's results layout omits {left - documented}"
