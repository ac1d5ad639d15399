"""``hpsearch.run_study``, the Python API: real runs in this process (forked workers), and
real subprocesses for what only another interpreter shows (a function defined in ``__main__``,
a model whose module is missing, Ctrl-C)."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from optuna.trial import TrialState
from studyfiles import open_results, regression, write_study

import hpsearch
from hpsearch.checkpoint.study_best import read_best_meta
from hpsearch.user_code import reference_of, resolve

pytestmark = pytest.mark.slow

USER_MODULE = "apiuser"
USER_CODE = '''
import math
import os
import time

import torch
from torch import nn


def points(n=400, features=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    y = x @ torch.linspace(-1, 1, features) + 0.1 * torch.randn(n, generator=g)
    return {"x": x.numpy(), "y": y.numpy(), "task": "regression"}


def make(input_shape, output_size, hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, output_size))


def half_mse(outputs, targets):
    return 0.5 * torch.mean((outputs - targets) ** 2)


def max_error(outputs, targets):
    return float((outputs - targets).abs().max())


def record(event):
    with open(os.environ["API_TEST_EVENTS"], "a") as f:
        f.write(f"{event.kind} {event.trial}\\n")


def broken(input_shape, output_size):
    raise RuntimeError("this model cannot be built")


class Slow(nn.Module):
    """Each training batch sleeps, so that an epoch lasts long enough to interrupt."""

    def __init__(self, input_shape, output_size):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), output_size)

    def forward(self, x):
        if self.training:
            time.sleep(0.04)
        return self.fc(x.flatten(1))
'''


def user_study(mod: ModuleType, name: str) -> dict[str, Any]:
    """A regression study whose every user function is given as the function itself."""
    return regression(
        study={"name": name, "n_trials": 5},
        data={"name": mod.points, "args": {"n": 400}},
        model={"architecture": {"mine": {"factory": mod.make,
                                         "hidden": {"type": "int", "low": 8, "high": 24}}}},
        train={"max_epochs": 2, "loss": mod.half_mse, "metrics": ["mse", mod.max_error]},
        callbacks=[mod.record],
        # Fresh interpreters, as on GPUs: they import the module from this process's sys.path.
        resources={"start_method": "spawn"},
    )


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, Path]]:
    """The user's module, importable in this process only (by its sys.path, as a notebook's
    ``sys.path.append`` does), which its workers inherit."""
    folder = tmp_path_factory.mktemp("usercode")
    (folder / f"{USER_MODULE}.py").write_text(USER_CODE)
    sys.path.insert(0, str(folder))
    try:
        import apiuser  # type: ignore[import-not-found]

        yield apiuser, folder
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(USER_MODULE, None)


@pytest.fixture(scope="module")
def dict_run(user_module: tuple[ModuleType, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[hpsearch.StudyResult, Path]:
    mod, _ = user_module
    tmp = tmp_path_factory.mktemp("dictrun")
    events = tmp / "events.txt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("API_TEST_EVENTS", str(events))
        result = hpsearch.run_study(user_study(mod, "fromdict"), results_dir=tmp / "res",
                                    n_trials=2, workers=1)
    return result, events


# ---------------------------------------------------------------- a dict study, functions in it


def test_functions_in_a_dict_study_run_by_their_reference(dict_run) -> None:
    result, events = dict_run
    saved = yaml.safe_load((result.results_dir / "config.yaml").read_text())
    assert saved["data"]["name"] == "apiuser:points"
    assert saved["model"]["architecture"]["mine"]["factory"] == "apiuser:make"
    assert saved["train"]["loss"]["name"] == "apiuser:half_mse"
    assert saved["train"]["metrics"] == ["mse", "apiuser:max_error"]
    assert saved["callbacks"] == ["apiuser:record"]
    # Each function ran: the loss trained, the metric was computed, the callback was called.
    trials = result.study.get_trials()
    assert all("val_max_error" in t.user_attrs["history"][0] for t in trials)
    assert sorted(events.read_text().split("\n")[:-1]) == sorted(
        [f"epoch {t.number}" for t in trials for _ in range(2)]
        + [f"trial_end {t.number}" for t in trials])


def test_arguments_override_the_study(dict_run) -> None:
    result, _ = dict_run
    trials = open_results(result.results_dir).get_trials()
    assert len(trials) == 2  # n_trials=2 over the study's 5
    assert result.config.study.n_trials == 2 and result.config.resources.workers == 1
    assert result.config.resources.start_method == "spawn"
    assert len({t.user_attrs["worker"] for t in trials}) == 1
    assert result.results_dir.is_absolute() and result.results_dir.name == "fromdict"
    assert result.results_dir.parent.name == "res"


def test_the_result_names_the_study_best_and_loads_it(dict_run) -> None:
    result, _ = dict_run
    study = open_results(result.results_dir)
    best, frozen = result.best_trial, study.best_trial
    assert best is not None
    assert (best.number, best.value, result.best_value) == (
        frozen.number, frozen.value, study.best_value)
    assert best.architecture == "mine"
    assert best.params["hidden"] == frozen.params["mine.hidden"]
    assert best.params["architecture"] == "mine" and best.params["lr"] == frozen.params["lr"]
    assert best.epoch == frozen.user_attrs["best_epoch"]
    assert best.checkpoint == result.results_dir / "best" / "model.pt"
    assert read_best_meta(result.results_dir)["trial"] == best.number
    assert (result.name, result.metric, result.direction) == ("fromdict", "val_loss", "minimize")
    assert result.report is None  # the study disables it
    assert f"best trial {best.number} (mine)" in repr(result)
    assert len(result.study.get_trials()) == 2

    model = result.load_best_model()
    assert isinstance(model, torch.nn.Module) and not model.training
    ckpt = result.load_checkpoint()
    assert ckpt["model"]["factory"] == "apiuser:make"
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["model_state_dict"][key]), key


def test_a_model_whose_module_is_missing_says_how_to_make_it_importable(
        dict_run, user_module, tmp_path: Path) -> None:
    result, _ = dict_run
    _, folder = user_module
    load = [sys.executable, "-c", "import sys, hpsearch; "
            "print(type(hpsearch.load_best_model(sys.argv[1])).__name__)",
            str(result.results_dir)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Another process, started elsewhere, that does not see the user's module.
    missing = subprocess.run(load, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 1, missing.stdout + missing.stderr
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("hpsearch.errors.CheckpointError: cannot rebuild the model of"), last
    assert "'apiuser'" in last and "apiuser:make" in last, last
    assert "PYTHONPATH" in last and "apiuser.py" in last and "pip install" in last, last
    # The same process, told where the module is, loads it.
    found = subprocess.run(load, cwd=tmp_path, env={**env, "PYTHONPATH": str(folder)},
                           capture_output=True, text=True, timeout=120)
    assert found.returncode == 0 and found.stdout.strip() == "Sequential", found.stderr


def test_a_run_whose_first_trials_all_fail_raises_the_reason(
        user_module, tmp_path: Path) -> None:
    mod, _ = user_module
    raw = regression(study={"name": "broken", "n_trials": 4, "max_initial_failures": 2},
                     model={"architecture": {"broken": {"factory": mod.broken}}})
    with pytest.raises(hpsearch.HpsearchError) as err:
        hpsearch.run_study(raw, results_dir=tmp_path / "res", workers=1)
    assert type(err.value) is hpsearch.HpsearchError  # the run's failure, not a usage error
    text = str(err.value)
    assert text.startswith("study stopped: the first 2 trials of this run all failed"), text
    assert "this model cannot be built" in text, text
    assert str(tmp_path / "res" / "broken" / "run.log") in text, text


# ---------------------------------------------------------------- a study file, from a thread


def test_a_study_file_runs_from_another_thread_and_continues_when_called_again(
        tmp_path: Path) -> None:
    path = write_study(tmp_path, regression(study={"name": "fromfile", "n_trials": 5}))
    results: list[Any] = []
    # Not the main thread: no signal handlers can be installed there, the run goes on.
    worker = threading.Thread(target=lambda: results.append(
        hpsearch.run_study(str(path), results_dir=tmp_path / "res", n_trials=2)))
    worker.start()
    worker.join(timeout=240)
    assert not worker.is_alive()
    assert len(results) == 1, "run_study raised in its thread"
    first = results[0]
    assert [t.state for t in first.study.get_trials()] == [TrialState.COMPLETE] * 2

    again = hpsearch.run_study(path, results_dir=tmp_path / "res", n_trials=3)
    trials = again.study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert again.results_dir == first.results_dir == (tmp_path / "res" / "fromfile").absolute()
    assert again.best_trial is not None
    assert again.best_trial.value == min(t.value for t in trials)


# ---------------------------------------------------------------- errors, before any work


def nested_factory() -> Any:
    def make(input_shape: Any, output_size: int) -> torch.nn.Module:
        return torch.nn.Linear(1, output_size)
    return make


class CallableFactory:
    def __call__(self, input_shape: Any, output_size: int) -> torch.nn.Module:
        return torch.nn.Linear(1, output_size)


@pytest.mark.parametrize(
    ("factory", "why"),
    [
        pytest.param(lambda input_shape, output_size: None, "is a lambda", id="lambda"),
        pytest.param(nested_factory(), "is defined inside another function", id="nested"),
        pytest.param(functools.partial(torch.nn.Linear, 8), "is a partial object", id="partial"),
        pytest.param(CallableFactory(), "is a CallableFactory object", id="callable-object"),
    ],
)
def test_a_function_that_cannot_be_imported_by_name_is_refused(
        factory: Any, why: str, tmp_path: Path) -> None:
    raw = regression(model={"architecture": {"mine": {"factory": factory}}})
    with pytest.raises(hpsearch.ConfigError) as err:
        hpsearch.run_study(raw, results_dir=tmp_path / "res")
    assert err.value.key == "model.architecture.mine.factory"
    text = str(err.value)
    assert text.startswith("<study dict>: model.architecture.mine.factory: "), text
    assert why in text and "move it into a .py file" in text, text
    assert "load_best_model" in text, text  # says why it must be importable
    assert not (tmp_path / "res").exists()


def test_an_import_that_fails_later_names_the_missing_piece(
        user_module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needsdep.py").write_text("import not_installed_anywhere\n\ndef f():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as err:
        resolve("needsdep:f")
    assert "it needs 'not_installed_anywhere', which is not installed" in str(err.value)
    with pytest.raises(ImportError, match="has no 'gone'; was it renamed"):
        resolve("apiuser:gone")


def test_importable_functions_and_classes_are_recorded_by_reference(user_module) -> None:
    mod, _ = user_module
    assert reference_of(mod.make) == "apiuser:make"
    assert reference_of(mod.Slow) == "apiuser:Slow"
    assert reference_of(torch.nn.functional.mse_loss) == "torch.nn.functional:mse_loss"


@pytest.mark.parametrize(
    ("study", "kwargs", "key", "words"),
    [
        pytest.param(regression(train={"optimizer": "adamm"}), {}, "train.optimizer",
                     ["<study dict>", "adam"], id="bad-value"),
        pytest.param(regression(model={"architecture": {"mine": {"factory": "__main__:make"}}}),
                     {}, "model.architecture.mine.factory", ["__main__", ".py file"],
                     id="main-reference"),
        pytest.param(regression(), {"n_trials": 0}, "study.n_trials",
                     ["<study dict> (with run_study arguments)"], id="bad-override"),
        pytest.param(regression(), {"devices": "cuda:7"}, "resources.devices",
                     ["cuda:7"], id="missing-device"),
    ],
)
def test_a_bad_study_or_argument_raises_a_config_error_naming_the_key(
        study: dict[str, Any], kwargs: dict[str, Any], key: str, words: list[str],
        tmp_path: Path) -> None:
    with pytest.raises(hpsearch.ConfigError) as err:
        hpsearch.run_study(study, results_dir=tmp_path / "res", **kwargs)
    assert err.value.key == key, str(err.value)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "res").exists()


def test_a_study_of_another_type_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(hpsearch.UsageError, match="not int"):
        hpsearch.run_study(42)  # type: ignore[arg-type]
    with pytest.raises(hpsearch.ConfigError, match="file not found"):
        hpsearch.run_study(tmp_path / "nope.yaml", results_dir=tmp_path / "res")


# ---------------------------------------------------------------- real scripts, run as __main__


def run_script(folder: Path, body: str, *args: str,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    script = folder / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script), *args], cwd=folder,
                          capture_output=True, text=True, timeout=timeout)


def test_a_function_defined_in_main_is_refused_by_name(tmp_path: Path) -> None:
    raw = json.dumps(regression(study={"name": "inmain"}))
    proc = run_script(tmp_path, f'''
        import json
        import torch
        import hpsearch

        def make(input_shape, output_size):
            return torch.nn.Linear(input_shape[0], output_size)

        study = json.loads({raw!r})
        study["model"]["architecture"] = {{"mine": {{"factory": make}}}}
        try:
            hpsearch.run_study(study, results_dir="res")
        except hpsearch.ConfigError as err:
            print("KEY", err.key)
            print("MESSAGE", err)
    ''')
    assert proc.returncode == 0, proc.stderr
    assert "KEY model.architecture.mine.factory" in proc.stdout, proc.stdout
    assert "make is defined in __main__" in proc.stdout, proc.stdout
    assert "move it into a .py file" in proc.stdout, proc.stdout
    assert not (tmp_path / "res").exists()


INTERRUPTIBLE = '''
    import sys
    import hpsearch
    import apiuser

    study = {study}
    study["model"] = {{"architecture": {{"slow": {{"factory": apiuser.Slow}}}}}}
    try:
        result = hpsearch.run_study(study, results_dir="res")
    except hpsearch.Interrupted as err:
        print("INTERRUPTED", err.exit_code, err, flush=True)
        sys.exit(err.exit_code)
    print("DONE", len(result.study.get_trials()), result.best_trial.number)
'''


def test_ctrl_c_leaves_resume_state_raises_interrupted_and_a_second_call_resumes(
        tmp_path: Path) -> None:
    (tmp_path / f"{USER_MODULE}.py").write_text(USER_CODE)
    raw = regression(
        study={"name": "stopped", "n_trials": 1},
        data={"args": {"n_samples": 600}},
        train={"max_epochs": 8, "batch_size": 64, "lr_scheduler": None},
        checkpoint={"resume_min_seconds": 0},  # resume state after every epoch
        resources={"devices": "cpu", "workers": 1, "torch_threads": 1},
    )
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(INTERRUPTIBLE.format(study=repr(raw))))
    out = tmp_path / "out.txt"
    results = tmp_path / "res" / "stopped"
    with open(out, "w") as sink:
        # Its own session, like a terminal job: Ctrl-C goes to the whole process group.
        proc = subprocess.Popen([sys.executable, "-u", str(script)], cwd=tmp_path,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not any(json.loads(p.read_text() or "{}").get("epoch") in (1, 2, 3)
                          for p in (results / ".hpsearch" / "workers").glob("slot-*.json")):
                assert proc.poll() is None, out.read_text()
                assert time.monotonic() < deadline, out.read_text()
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert code == 130, text
    assert "INTERRUPTED 130 interrupted: every finished trial and checkpoint is kept" in text
    assert "hpsearch.run_study(<the same study>, results_dir='res')" in text, text
    assert "Traceback" not in text, text
    trials = open_results(results).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING], text
    assert "interrupted" in trials[0].user_attrs["fail_reason"]

    again = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "DONE 2 1" in again.stdout, again.stdout
    retry = open_results(results).get_trials()[1]
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from"]["trial"] == 0
    assert retry.user_attrs["resumed_from"]["epoch"] > 0
    assert sorted(retry.intermediate_values) == list(range(8))
