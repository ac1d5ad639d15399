"""Runs that survive kills, crashes and Ctrl-C: real processes, real signals, no mocks.

Every test starts ``python -m hpsearch.run`` as a subprocess in its own session, waits on the
worker status files until a trial is mid-training, then does the damage (SIGKILL a worker,
SIGKILL the parent, SIGINT/SIGTERM) and checks what a user relies on afterwards: the study
reaches ``n_trials``, nothing is left RUNNING, killed trials resume from their last epoch with
contiguous intermediate values, every checkpoint loads with ``weights_only=True``, the study
best is the best trial, and no process outlives the run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState
from processes import HpsearchRun, pid_alive, wait_for
from studyfiles import derive, open_results, regression, write_study

import hpsearch
from hpsearch.files import TMP_PREFIX

optuna.logging.set_verbosity(optuna.logging.WARNING)

pytestmark = pytest.mark.slow


STUDY_NAME = "resilience"
MAX_EPOCHS = 8
N_TRIALS = 3
# Generous: the machine is shared, and starting a worker (torch + optuna) takes seconds.
RUN_TIMEOUT = 240.0


# ---------------------------------------------------------------- study files and runs


def study_dict(**sections: dict[str, Any]) -> dict[str, Any]:
    """A small regression study whose epochs last a few tenths of a second.

    Epochs are long enough for a kill to land between two epochs, and training always runs
    all ``MAX_EPOCHS`` (no pruning, no early stopping), so the intermediate values of a
    resumed trial must be exactly ``0 .. MAX_EPOCHS - 1``.
    """
    raw = regression(
        study={"name": STUDY_NAME, "n_trials": N_TRIALS},
        data={"args": {"n_samples": 1000}},
        model={"architecture": {"mlp": {"hidden": {"type": "int", "low": 48, "high": 96}}}},
        train={"max_epochs": MAX_EPOCHS, "batch_size": 8, "lr_scheduler": None},
        # last.pt after every epoch, so a kill between two epochs loses none of them.
        checkpoint={"keep_top_k_trials": 2, "resume_min_seconds": 0},
    )
    return derive(raw, **sections)


class Run(HpsearchRun):
    """``python -m hpsearch.run STUDY --results-dir res`` in ``cwd`` (like a terminal job)."""

    def __init__(self, cwd: Path, study_file: Path, env: dict[str, str] | None = None,
                 label: str = "run") -> None:
        super().__init__(cwd, [study_file.name, "--results-dir", "res"], label, env)

    @property
    def results(self) -> Path:
        return self.cwd / "res" / STUDY_NAME

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        return super().wait(timeout)


def worker_statuses(results: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((results / ".hpsearch" / "workers").glob("slot-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return out


def mid_training(run: Run, min_epoch: int = 1, last_epoch: int = MAX_EPOCHS - 4,
                 timeout: float = 120.0) -> dict[str, Any]:
    """Wait until some worker reports a finished epoch in ``[min_epoch, last_epoch]``.

    The upper bound leaves the trial several epochs to go, so a kill lands mid-trial.
    """

    def find() -> dict[str, Any] | None:
        for st in worker_statuses(run.results):
            epoch = st.get("epoch")
            if (st.get("state") == "training" and epoch is not None
                    and min_epoch <= epoch <= last_epoch):
                return st
        return None

    return wait_for(find, timeout, f"a worker at epoch {min_epoch}..{last_epoch}", run=run)


def training_statuses(results: Path) -> list[dict[str, Any]]:
    return [s for s in worker_statuses(results) if s.get("state") == "training"]


# ---------------------------------------------------------------- checking the outcome


def open_study(results: Path) -> optuna.Study:
    return open_results(results, STUDY_NAME)


def retry_source(t: FrozenTrial) -> int | None:
    history = t.system_attrs.get("retry_history")
    return int(history[-1]) if history else None


def retry_of(trials: list[FrozenTrial], number: int) -> FrozenTrial:
    found = [t for t in trials if retry_source(t) == number]
    assert len(found) == 1, f"trial {number} should have exactly one retry, found {found}"
    return found[0]


def checkpoint_files(results: Path) -> list[Path]:
    """Every checkpoint of the study: trials, the best, published artifacts (not temporaries)."""
    artifacts = [p for p in (results / "artifacts").glob("*")] if (
        results / "artifacts").is_dir() else []
    return sorted(
        p for p in [*results.rglob("*.pt"), *artifacts]
        if not p.name.startswith(TMP_PREFIX) and p.is_file()
    )


def verify(run: Run) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpsearch.verify", str(run.results)],
        cwd=run.cwd, capture_output=True, text=True, timeout=120, env=run.env,
    )


def assert_study_sound(results: Path, n_trials: int) -> list[FrozenTrial]:
    """The guarantees every finished run gives, however it was interrupted before."""
    study = open_study(results)
    trials = study.get_trials(deepcopy=False)
    states = {t.number: t.state.name for t in trials}
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], states
    assert not [t.number for t in trials if t.state == TrialState.WAITING], states

    retried = {retry_source(t) for t in trials} - {None}
    counted = [t for t in trials if not (t.state == TrialState.FAIL and t.number in retried)]
    assert len(counted) == n_trials, states
    # A retried trial is always a failed one; its retry says where it resumed from.
    for t in trials:
        source = retry_source(t)
        if source is None:
            continue
        assert trials[source].state == TrialState.FAIL, states
        assert "fail_reason" in trials[source].user_attrs
        if t.state == TrialState.COMPLETE:
            resumed = t.user_attrs.get("resumed_from")
            assert resumed is not None and resumed["trial"] == source, t.user_attrs

    for t in trials:
        if t.state == TrialState.COMPLETE:
            # No early stopping and no pruning: every epoch reported exactly once, in order.
            assert sorted(t.intermediate_values) == list(range(MAX_EPOCHS)), (
                t.number, t.intermediate_values)
            # Optuna keeps one value per step, so repeats show in the history instead.
            history = t.user_attrs["history"]
            assert [r["epoch"] for r in history] == list(range(MAX_EPOCHS)), (t.number, history)
            assert [t.intermediate_values[r["epoch"]] for r in history] == [
                r["val_loss"] for r in history]
            assert t.user_attrs.get("checkpoint"), t.user_attrs

    files = checkpoint_files(results)
    assert files, "no checkpoint at all"
    for path in files:
        torch.load(path, weights_only=True)
    # Checkpoints recorded in a manifest also match their sha256.
    for manifest in results.glob("trials/*/manifest.json"):
        for name in json.loads(manifest.read_text())["files"]:
            hpsearch.load_checkpoint(manifest.parent / name)

    best = study.best_trial
    meta = json.loads((results / "best" / "meta.json").read_text())
    assert meta["trial"] == best.number, (meta, best.number, best.value)
    assert meta["value"] == pytest.approx(best.value)
    assert hpsearch.load_checkpoint(results)["trial"] in (best.number, retry_source(best))
    return trials


def assert_resumed(trials: list[FrozenTrial], number: int, reason: str) -> FrozenTrial:
    """Trial ``number`` failed with ``reason`` and its retry continued from a later epoch."""
    failed = trials[number]
    assert failed.state == TrialState.FAIL, failed
    assert reason in failed.user_attrs.get("fail_reason", ""), failed.user_attrs
    retry = retry_of(trials, number)
    assert retry.state == TrialState.COMPLETE, retry
    resumed = retry.user_attrs["resumed_from"]
    assert resumed["trial"] == number
    assert resumed["epoch"] > 0, resumed
    assert sorted(retry.intermediate_values) == list(range(MAX_EPOCHS)), retry.intermediate_values
    return retry


def assert_no_process_left(run: Run, pids: set[int], timeout: float = 5.0) -> None:
    def gone() -> bool:
        return not [p for p in pids if pid_alive(p)] and not run.session_processes()

    end = time.monotonic() + timeout
    while time.monotonic() < end and not gone():
        time.sleep(0.05)
    left = sorted(p for p in pids if pid_alive(p))
    left_session = run.session_processes()
    if left or left_session:
        cmdlines = []
        for proc in left_session:
            try:
                cmdlines.append(f"{proc.pid}: {' '.join(proc.cmdline())[:200]}")
            except psutil.Error:
                pass
        run.kill()
        pytest.fail(f"processes left behind: {left} {cmdlines}")


def worker_pids(results: Path) -> set[int]:
    return {int(s["pid"]) for s in worker_statuses(results) if s.get("pid")}


# ---------------------------------------------------------------- 1. a worker is SIGKILLed


@pytest.mark.parametrize("min_seconds", [0, 3600])
def test_sigkill_worker_mid_trial_resumes_from_last_epoch(tmp_path: Path,
                                                          min_seconds: int) -> None:
    """With ``resume_min_seconds: 3600`` no last.pt exists yet: the retry starts over, and
    the best files of the killed epochs give way to the retrained ones."""
    study_file = write_study(
        tmp_path, study_dict(checkpoint={"resume_min_seconds": min_seconds}))
    run = Run(tmp_path, study_file)
    try:
        status = mid_training(run)
        victim, number = int(status["pid"]), int(status["trial"])
        # Only ever kill a process this test started.
        assert victim in {p.pid for p in run.descendants()}, (victim, run.descendants())
        os.kill(victim, signal.SIGKILL)
        rc = run.wait()
    finally:
        run.kill()
    out = run.output()
    assert rc == 0, out
    assert f"died during trial {number}" in out, out
    trials = assert_study_sound(run.results, n_trials=N_TRIALS)
    if min_seconds:
        retry = retry_of(trials, number)
        assert retry.state == TrialState.COMPLETE, retry
        assert retry.user_attrs["resumed_from"] == {"trial": number, "epoch": 0}
    else:
        assert_resumed(trials, number, "died")
    assert not pid_alive(victim)


def test_frozen_worker_is_detected_by_its_heartbeat_and_replaced(tmp_path: Path) -> None:
    """A worker that hangs (here: SIGSTOP) stops beating; the run must not wait for it forever.

    Beyond the letter of "kills and crashes": a deadlocked or NFS-stuck worker is alive, so
    only its stale heartbeat (grace_period: 3 s here) can tell the parent it is gone.
    """
    study_file = write_study(tmp_path, study_dict())
    run = Run(tmp_path, study_file)
    frozen = None
    try:
        status = mid_training(run)
        frozen, number = int(status["pid"]), int(status["trial"])
        assert frozen in {p.pid for p in run.descendants()}
        os.kill(frozen, signal.SIGSTOP)
        rc = run.wait(timeout=120)
    finally:
        if frozen is not None and pid_alive(frozen):
            os.kill(frozen, signal.SIGKILL)
        run.kill()
    assert rc == 0, run.output()
    trials = assert_study_sound(run.results, n_trials=N_TRIALS)
    assert_resumed(trials, number, "")
    assert not pid_alive(frozen)


DEGRADING_MODEL = textwrap.dedent(
    """
    import math

    import torch
    from torch import nn


    class Degrading(nn.Module):
        # Predicts worse once it has trained `after` batches: with 80 batches an epoch, the
        # best epoch is 0 or 1. The count is a buffer, saved with the weights, so a resumed
        # run continues it and a reloaded checkpoint evaluates exactly as it did in training.

        def __init__(self, input_shape, output_size, after):
            super().__init__()
            self.fc = nn.Linear(math.prod(input_shape), output_size)
            self.after = after
            self.register_buffer("batches", torch.zeros(()))

        def forward(self, x):
            out = self.fc(x.flatten(1))
            if self.training:
                self.batches += 1
            elif self.batches > self.after:
                out = out + 10.0
            return out


    def make(input_shape, output_size, after):
        return Degrading(input_shape, output_size, after)
    """
)


def test_resumed_trial_whose_best_epoch_came_before_the_kill_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry adopts the best checkpoint its failed trial wrote; the study best is valid."""
    (tmp_path / "degrading.py").write_text(DEGRADING_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = study_dict(
        study={"n_trials": 1},
        model={"architecture": {"degrading": {"factory": "degrading:make", "after": 200}}},
        resources={"workers": 1},
    )
    raw["train"]["lr"] = 1e-3
    study_file = write_study(tmp_path, raw)
    run = Run(tmp_path, study_file, env={"PYTHONPATH": str(tmp_path)})
    try:
        status = mid_training(run, min_epoch=3)
        os.kill(int(status["pid"]), signal.SIGKILL)
        rc = run.wait()
    finally:
        run.kill()
    assert rc == 0, run.output()
    trials = assert_study_sound(run.results, n_trials=1)
    retry = assert_resumed(trials, 0, "died")
    assert retry.user_attrs["best_epoch"] in (0, 1)
    meta = json.loads((run.results / "best" / "meta.json").read_text())
    assert meta["trial"] == retry.number
    proc = verify(run)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- 2. the parent is SIGKILLed


def test_sigkill_parent_then_rerun_resumes(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, study_dict())
    run = Run(tmp_path, study_file)
    try:
        status = mid_training(run)
        number = int(status["trial"])
        children = {p.pid for p in run.descendants()}
        os.kill(run.pid, signal.SIGKILL)
        assert run.wait(timeout=10) == -signal.SIGKILL
        # Orphaned workers notice their parent is gone and exit on their own.
        assert_no_process_left(run, children, timeout=10.0)
    finally:
        run.kill()
    assert open_study(run.results).get_trials(deepcopy=False)[number].state == TrialState.RUNNING

    rerun = Run(tmp_path, study_file, label="rerun")
    try:
        rc = rerun.wait()
    finally:
        rerun.kill()
    out = rerun.output()
    assert rc == 0, out
    assert f"trial {number} was left RUNNING" in out, out
    trials = assert_study_sound(rerun.results, n_trials=N_TRIALS)
    assert_resumed(trials, number, "heartbeat")


# ---------------------------------------------------------------- 3. Ctrl-C and SIGTERM


@pytest.mark.parametrize(
    ("signum", "expected", "to_group"),
    [
        pytest.param(signal.SIGINT, 130, True, id="ctrl-c"),  # a terminal signals the group
        pytest.param(signal.SIGTERM, 143, False, id="sigterm"),  # `kill PID`
        # docker stop, systemd and Slurm signal every process of the job, workers included.
        pytest.param(signal.SIGTERM, 143, True, id="sigterm-group"),
    ],
)
def test_signal_stops_cleanly_and_rerun_completes(
    tmp_path: Path, signum: int, expected: int, to_group: bool
) -> None:
    study_file = write_study(tmp_path, study_dict())
    run = Run(tmp_path, study_file)
    try:
        status = mid_training(run)
        number = int(status["trial"])
        pids = worker_pids(run.results) | {p.pid for p in run.descendants()}
        sent = time.monotonic()
        if to_group:
            os.killpg(run.pid, signum)
        else:
            os.kill(run.pid, signum)
        rc = run.wait(timeout=30)
        elapsed = time.monotonic() - sent
        assert_no_process_left(run, pids, timeout=1.0)
    finally:
        run.kill()
    out = run.output()
    assert rc == expected, out
    assert elapsed < 10.0, f"took {elapsed:.1f} s to stop"
    assert "Traceback" not in out, out
    assert not [p for p in worker_pids(run.results) if pid_alive(p)]

    study = open_study(run.results)
    trials = study.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    assert trials[number].state == TrialState.FAIL
    assert "interrupted" in trials[number].user_attrs["fail_reason"]
    assert retry_of(trials, number).state == TrialState.WAITING

    rerun = Run(tmp_path, study_file, label="rerun")
    try:
        rc = rerun.wait()
    finally:
        rerun.kill()
    assert rc == 0, rerun.output()
    trials = assert_study_sound(rerun.results, n_trials=N_TRIALS)
    assert_resumed(trials, number, "interrupted")


SLOW_MODEL = textwrap.dedent(
    """
    import math
    import time

    from torch import nn


    class Slow(nn.Module):
        # Each training batch takes `seconds`: a stop request waits for the batch to end.

        def __init__(self, input_shape, output_size, seconds=6.0):
            super().__init__()
            self.fc = nn.Linear(math.prod(input_shape), output_size)
            self.seconds = seconds

        def forward(self, x):
            if self.training:
                time.sleep(self.seconds)
            return self.fc(x.flatten(1))


    def make(input_shape, output_size):
        return Slow(input_shape, output_size)
    """
)


def test_second_ctrl_c_exits_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "slow.py").write_text(SLOW_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    study_file = write_study(
        tmp_path, study_dict(model={"architecture": {"slow": {"factory": "slow:make"}}})
    )
    run = Run(tmp_path, study_file, env={"PYTHONPATH": str(tmp_path)})
    try:
        wait_for(lambda: len(training_statuses(run.results)) == 2, 120.0,
                 "both workers to train", run=run)
        pids = worker_pids(run.results) | {p.pid for p in run.descendants()}
        os.killpg(run.pid, signal.SIGINT)
        # The workers are inside a 6 s batch: the graceful stop is still under way.
        wait_for(lambda: "stopping" in (run.results / "run.log").read_text(), 5.0,
                 "the first Ctrl-C to be acknowledged", run=run)
        sent = time.monotonic()
        os.killpg(run.pid, signal.SIGINT)
        rc = run.wait(timeout=30)
        elapsed = time.monotonic() - sent
        assert_no_process_left(run, pids, timeout=2.0)
    finally:
        run.kill()
    assert rc == 130, run.output()
    assert elapsed < 2.5, f"the second Ctrl-C took {elapsed:.1f} s"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_ctrl_c_while_workers_start(tmp_path: Path, method: str) -> None:
    """Ctrl-C right after the workers start (spawned ones are still importing torch)."""
    study_file = write_study(tmp_path, study_dict(resources={"start_method": method}))
    run = Run(tmp_path, study_file)
    try:
        def starting_worker() -> bool:
            if method == "fork":
                return bool(run.descendants())
            return any("popen_loky_posix" in " ".join(_cmdline(p)) for p in run.descendants())

        wait_for(starting_worker, 60.0, "a worker process to be started", run=run)
        pids = {p.pid for p in run.descendants()}
        sent = time.monotonic()
        os.killpg(run.pid, signal.SIGINT)
        rc = run.wait(timeout=30)
        elapsed = time.monotonic() - sent
        assert_no_process_left(run, pids, timeout=2.0)
    finally:
        run.kill()
    out = run.output()
    assert rc == 130, out
    assert elapsed < 20.0  # spawned workers still importing torch on a loaded machine
    # Ctrl-C is the user's request, not a crash: no "died", no "segmentation fault", and no
    # KeyboardInterrupt traceback from a worker that was still starting when it landed.
    assert "died" not in out, out
    assert "segmentation" not in out, out
    assert "Traceback" not in out, out

    rerun = Run(tmp_path, study_file, label="rerun")
    try:
        rc = rerun.wait()
    finally:
        rerun.kill()
    assert rc == 0, rerun.output()
    assert_study_sound(rerun.results, n_trials=N_TRIALS)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def test_kill_during_first_epoch_of_a_resumed_trial_keeps_progress(tmp_path: Path) -> None:
    """Two kills in a row: the second lands before the resumed trial saved its own state."""
    study_file = write_study(tmp_path, study_dict())
    run = Run(tmp_path, study_file)
    try:
        status = mid_training(run, min_epoch=2)
        first = int(status["trial"])
        os.kill(int(status["pid"]), signal.SIGKILL)

        def resumed() -> dict[str, Any] | None:
            for st in training_statuses(run.results):
                number = st.get("trial")
                if number is None or number == first:
                    continue
                folder = run.results / "trials" / str(number)
                log = folder / "train.log"
                text = log.read_text() if log.exists() else ""
                marker = f"resumed from trial {first}"
                # Resumed, but no epoch of its own finished yet.
                if marker in text and not re.search(r"\d epoch \d+:", text.split(marker, 1)[1]):
                    return st
            return None

        status = wait_for(resumed, 120.0, f"the retry of trial {first} to resume", run=run)
        second = int(status["trial"])
        os.kill(int(status["pid"]), signal.SIGKILL)
        rc = run.wait()
    finally:
        run.kill()
    assert rc == 0, run.output()
    trials = assert_study_sound(run.results, n_trials=N_TRIALS)
    assert trials[second].user_attrs["resumed_from"]["epoch"] >= 2
    third = assert_resumed(trials, second, "died")
    # The progress made before the first kill survives the second one.
    assert third.user_attrs["resumed_from"]["epoch"] >= 2, third.user_attrs["resumed_from"]


# ---------------------------------------------------------------- 6. models that fail


FAULTY_MODELS = textwrap.dedent(
    """
    import math

    import torch
    from torch import nn


    class Faulty(nn.Module):
        '''A linear model that breaks after ``after`` forward calls (a few epochs in).'''

        def __init__(self, input_shape, output_size, mode, after):
            super().__init__()
            self.fc = nn.Linear(math.prod(input_shape), output_size)
            self.mode, self.after, self.calls = mode, after, 0

        def forward(self, x):
            self.calls += 1
            out = self.fc(x.flatten(1))
            if self.calls > self.after:
                if self.mode == "raise":
                    raise RuntimeError("boom: the model exploded on purpose")
                return out * float("nan")
            return out


    def make_boom(input_shape, output_size, after=25):
        return Faulty(input_shape, output_size, "raise", after)


    def make_nan(input_shape, output_size, after=25):
        return Faulty(input_shape, output_size, "nan", after)
    """
)


def faulty_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **sections: Any) -> Path:
    (tmp_path / "faulty_models.py").write_text(FAULTY_MODELS)
    # The study loader imports factories when it validates the file, in this process too.
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = study_dict(**sections)
    raw["train"].update(max_epochs=4, batch_size=64, lr=3e-3)
    return write_study(tmp_path, raw)


@pytest.mark.parametrize(
    ("on_nonfinite", "nan_state"),
    [("fail", TrialState.FAIL), ("prune", TrialState.PRUNED)],
)
def test_failing_models_fail_cleanly_while_others_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_nonfinite: str, nan_state: TrialState
) -> None:
    study_file = faulty_study(
        tmp_path,
        monkeypatch,
        study={
            "n_trials": 4,
            "enqueue": [
                {"architecture": "boom"},
                {"architecture": "nan"},
                {"architecture": "mlp", "hidden": 16},
                {"architecture": "mlp", "hidden": 32},
            ],
        },
        model={
            "architecture": {
                "mlp": {"hidden": {"type": "int", "low": 16, "high": 32}},
                "boom": {"factory": "faulty_models:make_boom"},
                "nan": {"factory": "faulty_models:make_nan"},
            }
        },
        train={"on_nonfinite": on_nonfinite},
    )
    run = Run(tmp_path, study_file, env={"PYTHONPATH": str(tmp_path)})
    try:
        rc = run.wait()
    finally:
        run.kill()
    out = run.output()
    assert rc == 0, out
    assert "died" not in out, "a failing model must not kill its worker:\n" + out

    trials = open_study(run.results).get_trials(deepcopy=False)
    by_arch = {t.params["architecture"]: t for t in trials if "hidden" not in t.params}
    assert len(trials) == 4, [(t.number, t.state, t.params) for t in trials]

    boom = by_arch["boom"]
    assert boom.state == TrialState.FAIL
    assert "RuntimeError: boom: the model exploded on purpose" in boom.user_attrs["fail_reason"]

    nan = by_arch["nan"]
    assert nan.state == nan_state, nan
    if nan_state == TrialState.FAIL:
        assert "non-finite" in nan.user_attrs["fail_reason"], nan.user_attrs
    else:
        assert "non-finite" in nan.user_attrs["prune_reason"], nan.user_attrs

    mlps = [t for t in trials if t.params["architecture"] == "mlp"]
    assert [t.state for t in mlps] == [TrialState.COMPLETE] * 2
    for t in (boom, nan):
        assert not (run.results / "trials" / str(t.number) / "last.pt").exists()
    meta = json.loads((run.results / "best" / "meta.json").read_text())
    assert meta["architecture"] == "mlp"
    for path in checkpoint_files(run.results):
        torch.load(path, weights_only=True)


# ---------------------------------------------------------------- 7. a study that only fails


def test_first_failures_stop_the_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study_file = faulty_study(
        tmp_path,
        monkeypatch,
        study={"n_trials": 10, "max_initial_failures": 2},
        model={"architecture": {"boom": {"factory": "faulty_models:make_boom", "after": 0}}},
    )
    run = Run(tmp_path, study_file, env={"PYTHONPATH": str(tmp_path)})
    try:
        rc = run.wait()
    finally:
        run.kill()
    out = run.output()
    assert rc == 1, out
    assert "Traceback" not in out
    assert "the first 2 trials of this run all failed" in out, out
    assert "boom: the model exploded on purpose" in out, out

    trials = open_study(run.results).get_trials(deepcopy=False)
    assert 2 <= len(trials) < 10, [(t.number, t.state) for t in trials]
    assert all(t.state == TrialState.FAIL for t in trials), [(t.number, t.state) for t in trials]



HELD_START = """
import os, signal, sys, threading, time
from joblib.externals.loky.backend.context import get_context
from hpsearch.workers.supervisor import stop_signals_held
import heldchild

got = []
signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
done = threading.Event()
idle = threading.Thread(target=done.wait)  # started before the block: it does not block SIGINT
idle.start()
child = get_context("loky").Process(target=heldchild.report_mask, args=(sys.argv[1],))
with stop_signals_held():
    child.start()  # the first spawn also starts the resource trackers
    os.kill(os.getpid(), signal.SIGINT)  # process-wide, as the terminal sends it
    time.sleep(0.5)
    print("during", got, flush=True)
time.sleep(0.2)
done.set()
idle.join()
child.join()
print("after", got, flush=True)
"""

HELD_CHILD = """
import signal

def report_mask(path):
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with open(path, "w") as f:
        f.write(" ".join(sorted(signal.Signals(s).name for s in blocked)))
"""


def test_ctrl_c_during_a_worker_start_is_neither_lost_nor_fatal(tmp_path: Path) -> None:
    """The parent has other threads; a Ctrl-C while a worker starts reaches the run's handler
    exactly once, and the spawned child starts with both stop signals blocked (Python 3.11's
    resource tracker used to unblock them on its start)."""
    (tmp_path / "heldchild.py").write_text(HELD_CHILD)
    mask_file = tmp_path / "mask.txt"
    proc = subprocess.run([sys.executable, "-c", HELD_START, str(mask_file)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    # The handler runs once: while the child starts (another thread took the signal) or
    # right after (the starting thread had it blocked); never is it dropped.
    assert proc.stdout.split("\n")[1] == f"after [{int(signal.SIGINT)}]", proc.stdout
    assert mask_file.read_text().split() == ["SIGINT", "SIGTERM"]
