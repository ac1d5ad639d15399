"""GPU checks: run by scripts/gpu_check.sh on a machine with CUDA; skipped elsewhere.

The end-to-end tests drive the command line (``python -m hpsearch.run ... --devices cuda:0``)
as real subprocesses and read what a user reads: the results folder and the study's journal.
They import nothing of hpsearch but its public API, so renaming internal modules leaves them
alone. The subprocesses stay in pytest's process group, so a ``timeout`` around pytest (as in
gpu_check.sh) stops them too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from optuna.trial import FrozenTrial, TrialState
from studyfiles import open_results, tiny, write_study

import hpsearch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RUN_TIMEOUT = 240.0

# User model factories, written into each test's folder and found through PYTHONPATH.
GPU_MODELS = textwrap.dedent(
    """
    import math
    import time

    import torch
    from torch import nn


    class Slow(nn.Module):
        # A linear model whose training batches each take `seconds`: trials long enough to
        # overlap, or to be stopped in the middle, whatever the GPU's speed.

        def __init__(self, input_shape, output_size, seconds):
            super().__init__()
            self.fc = nn.Linear(math.prod(input_shape), output_size)
            self.seconds = seconds

        def forward(self, x):
            if self.training:
                time.sleep(self.seconds)
            return self.fc(x.flatten(1))


    def make_slow(input_shape, output_size):
        return Slow(input_shape, output_size, 0.05)


    class Asserting(nn.Module):
        # Indexes out of bounds on the GPU: a device-side assert, which breaks the context.

        def __init__(self, input_shape, output_size):
            super().__init__()
            self.fc = nn.Linear(math.prod(input_shape), output_size)

        def forward(self, x):
            out = self.fc(x.flatten(1))
            bad = torch.full((len(x),), 10**6, device=x.device, dtype=torch.long)
            return out[torch.arange(len(x), device=x.device), bad].unsqueeze(1) + out


    def make_asserting(input_shape, output_size):
        return Asserting(input_shape, output_size)


    def streaming(n=600, features=40, classes=10):
        # torch Datasets, not arrays: batched through DataLoaders instead of on the device.
        g = torch.Generator().manual_seed(0)
        def split(k):
            x = torch.randn(k, features, generator=g)
            return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
        return {"train": split(n), "val": split(n // 4), "test": split(n // 4),
                "task": "classification", "input_shape": [features], "output_size": classes}


    def make_huge(input_shape, output_size):
        # 1 GiB (kept alive by the traceback while the failure is handled), then 10**12
        # floats (4 TB): more than any GPU has, so the allocator raises OutOfMemoryError.
        device = torch.device("cuda", torch.cuda.current_device())
        ballast = torch.ones(2**28, device=device)
        weight = torch.empty(10**12, device=device)
        raise AssertionError(f"allocated {ballast.numel() + weight.numel()} floats")
    """
)


# ---------------------------------------------------------------- helpers


def with_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Write the model factories into ``tmp_path``; the environment that imports them.

    This process imports them too: ``load_best_model`` rebuilds a model through its factory.
    """
    (tmp_path / "gpu_models.py").write_text(GPU_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def command(study_file: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "hpsearch.run", study_file.name, "--results-dir", "res",
            "--devices", "cuda:0", *flags]


def run_cli(cwd: Path, study_file: Path, *flags: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(study_file, *flags), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)


def trials_of(results: Path) -> list[FrozenTrial]:
    return open_results(results).get_trials(deepcopy=False)


def states(trials: list[FrozenTrial]) -> dict[int, str]:
    return {t.number: t.state.name for t in trials}


def peak_concurrency(trials: list[FrozenTrial]) -> int:
    """The most trials running at one moment, from their start and completion times."""
    events: list[tuple[datetime, int]] = []
    for t in trials:
        assert t.datetime_start is not None and t.datetime_complete is not None, t
        events += [(t.datetime_start, 1), (t.datetime_complete, -1)]
    running = peak = 0
    for _, change in sorted(events):  # at a tie, an end (-1) sorts before a start
        running += change
        peak = max(peak, running)
    return peak


def wait_for_file(proc: subprocess.Popen[str], folder: Path, pattern: str, log: Path,
                  timeout: float = 120.0) -> Path:
    """The first file matching ``folder/pattern`` once one exists, while ``proc`` runs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {folder}/{pattern} "
                        f"appeared:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    pytest.fail(f"no {folder}/{pattern} after {timeout} s:\n{log.read_text(errors='replace')}")


# ---------------------------------------------------------------- slots and devices


def test_slots_pin_explicit_devices() -> None:
    # Internal API, imported here so that a renamed module fails this test only.
    from hpsearch.config import ResourcesSection

    try:
        from hpsearch.workers.slots import plan_slots
    except ImportError:  # the layout before hpsearch.workers became a package
        from hpsearch.workers import plan_slots  # type: ignore[no-redef]

    slots = plan_slots(ResourcesSection(devices="auto", trials_per_device=2))
    n = torch.cuda.device_count()
    # Interleaved, so a workers limit spreads the workers over every GPU.
    assert [s.device for s in slots] == [f"cuda:{i}" for _ in range(2) for i in range(n)]


def test_run_on_gpu_with_two_trials_per_device(tmp_path: Path) -> None:
    raw = tiny(study={"n_trials": 6}, resources={"devices": ["cuda:0"], "trials_per_device": 2,
                                                 "workers": "auto"})
    study_file = write_study(tmp_path, raw)
    out = subprocess.run(
        [sys.executable, "-m", "hpsearch.run", str(study_file), "--results-dir", "res"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    trials = open_results(tmp_path / "res/tiny").get_trials()
    assert len(trials) == 6
    assert {t.user_attrs["device"] for t in trials} == {"cuda:0"}
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    model = hpsearch.load_best_model(tmp_path / "res/tiny", map_location="cuda:0")
    assert next(model.parameters()).device.type == "cuda"
    cpu = hpsearch.load_best_model(tmp_path / "res/tiny", map_location="cpu")
    assert next(cpu.parameters()).device.type == "cpu"


@pytest.mark.parametrize("per_device", [2, 4])
def test_trials_share_one_gpu_concurrently(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           per_device: int) -> None:
    """``trials_per_device: N`` on one GPU: N workers on cuda:0, N trials at a time."""
    env = with_models(tmp_path, monkeypatch)
    raw = tiny(
        study={"n_trials": 2 * per_device},
        model={"architecture": {"slow": {"factory": "gpu_models:make_slow"}}},
        # About 3 s per trial: far longer than the workers' start-up stagger.
        train={"max_epochs": 12, "early_stopping": None},
        resources={"devices": ["cuda:0"], "trials_per_device": per_device, "workers": "auto"},
    )
    study_file = write_study(tmp_path, raw)
    out = run_cli(tmp_path, study_file, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = trials_of(tmp_path / "res/tiny")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 * per_device, states(trials)
    assert {t.user_attrs["device"] for t in trials} == {"cuda:0"}
    assert len({t.user_attrs["worker"] for t in trials}) == per_device
    spans = [(t.number, t.user_attrs["worker"], t.datetime_start, t.datetime_complete)
             for t in trials]
    assert peak_concurrency(trials) == per_device, spans
    model = hpsearch.load_best_model(tmp_path / "res/tiny", map_location="cuda:0")
    assert next(model.parameters()).device == torch.device("cuda", 0)


# ---------------------------------------------------------------- SIGTERM, then a rerun


def test_sigterm_mid_trial_then_rerun_resumes_on_gpu(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    env = with_models(tmp_path, monkeypatch)
    epochs = 16
    raw = tiny(
        study={"n_trials": 2},
        model={"architecture": {"slow": {"factory": "gpu_models:make_slow"}}},
        # About 0.3 s per epoch, last.pt after every one of them.
        train={"max_epochs": epochs, "early_stopping": None},
        checkpoint={"keep_top_k_trials": 2, "resume_min_seconds": 0},
        resources={"workers": 1},
    )
    study_file = write_study(tmp_path, raw)
    results = tmp_path / "res/tiny"
    log = tmp_path / "run.out"
    with open(log, "w") as sink:
        proc = subprocess.Popen(command(study_file), cwd=tmp_path, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, text=True)
        try:
            last = wait_for_file(proc, results / "trials", "*/last.pt", log)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    first = log.read_text(errors="replace")
    assert rc == 128 + signal.SIGTERM, first
    assert "Traceback" not in first, first
    number = int(last.parent.name)
    stopped = trials_of(results)[number]
    assert stopped.state == TrialState.FAIL, states(trials_of(results))
    assert "interrupted" in stopped.user_attrs["fail_reason"], stopped.user_attrs
    assert (results / "trials" / str(number) / "last.pt").exists()

    out = run_cli(tmp_path, study_file, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    trials = trials_of(results)
    # Only the stopped trial is left FAIL, retried by the trial that resumed it.
    assert [t.number for t in trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED)
            and "retried_as" not in t.user_attrs] == [], states(trials)
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [number], states(trials)
    resumed = [t for t in trials if "resumed_from" in t.user_attrs]
    assert len(resumed) == 1, states(trials)
    retry = resumed[0]
    assert retry.number == trials[number].user_attrs["retried_as"]
    assert retry.state == TrialState.COMPLETE, retry
    assert retry.user_attrs["resumed_from"]["trial"] == number
    assert retry.user_attrs["resumed_from"]["epoch"] >= 1, retry.user_attrs["resumed_from"]
    assert sorted(retry.intermediate_values) == list(range(epochs)), retry.intermediate_values
    counted = [t for t in trials if t.state != TrialState.FAIL]
    assert len(counted) == 2, states(trials)
    assert {t.user_attrs["device"] for t in trials} == {"cuda:0"}
    model = hpsearch.load_best_model(results, map_location="cuda:0")
    assert next(model.parameters()).device.type == "cuda"


# ---------------------------------------------------------------- out of GPU memory


def test_out_of_memory_trial_fails_and_the_worker_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = with_models(tmp_path, monkeypatch)
    raw = tiny(
        study={"n_trials": 2,
               "enqueue": [{"architecture": "huge"}, {"architecture": "mlp", "hidden": 32}]},
        model={"architecture": {
            "huge": {"factory": "gpu_models:make_huge"},
            "mlp": {"hidden": {"type": "int", "low": 16, "high": 64, "log": True}},
        }},
        resources={"workers": 1},
    )
    study_file = write_study(tmp_path, raw)
    out = run_cli(tmp_path, study_file, "--workers", "1", env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "died" not in text, "an out-of-memory trial must not kill its worker:\n" + text
    trials = trials_of(tmp_path / "res/tiny")
    assert len(trials) == 2, states(trials)
    huge, normal = trials
    assert huge.params["architecture"] == "huge", huge.params
    assert huge.state == TrialState.FAIL, states(trials)
    assert "out of memory" in huge.user_attrs["fail_reason"].lower(), huge.user_attrs
    assert normal.params["architecture"] == "mlp", normal.params
    assert normal.state == TrialState.COMPLETE, (states(trials), normal.user_attrs)
    assert normal.user_attrs["worker"] == huge.user_attrs["worker"]
    assert {t.user_attrs["device"] for t in trials} == {"cuda:0"}
    model = hpsearch.load_best_model(tmp_path / "res/tiny", map_location="cuda:0")
    assert next(model.parameters()).device.type == "cuda"


# ---------------------------------------------------------------- a broken CUDA context


def test_device_side_assert_fails_the_trial_and_replaces_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = with_models(tmp_path, monkeypatch)
    raw = tiny(
        study={"n_trials": 2,
               "enqueue": [{"architecture": "asserting"}, {"architecture": "linear"}]},
        model={"architecture": {"asserting": {"factory": "gpu_models:make_asserting"},
                                "linear": {}}},
        resources={"workers": 1},
    )
    study_file = write_study(tmp_path, raw)
    out = run_cli(tmp_path, study_file, "--workers", "1", env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "CUDA context broken" in text and "replacing it" in text, text
    trials = trials_of(tmp_path / "res/tiny")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE], states(trials)
    assert "CUDA error" in trials[0].user_attrs["fail_reason"], trials[0].user_attrs
    # A fresh process, with a fresh context, ran the next trial.
    assert trials[0].user_attrs["worker"] != trials[1].user_attrs["worker"]


# ---------------------------------------------------------------- streaming data


def test_streaming_data_through_persistent_pinned_loaders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = with_models(tmp_path, monkeypatch)
    raw = tiny(
        study={"n_trials": 2},
        data={"name": "gpu_models:streaming", "args": {}, "num_workers": 2},
        model={"architecture": {"linear": {}}},
        train={"max_epochs": 3},
        resources={"workers": 1},
    )
    study_file = write_study(tmp_path, raw)
    out = run_cli(tmp_path, study_file, "--workers", "1", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = trials_of(tmp_path / "res/tiny")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, states(trials)
    assert {t.user_attrs["device"] for t in trials} == {"cuda:0"}


# ---------------------------------------------------------------- training options on CUDA


def test_fp16_with_grad_scaler_clip_and_compile_on_gpu(tmp_path: Path) -> None:
    raw = tiny(
        study={"n_trials": 2},
        model={"architecture": {"mlp": {"hidden": 32}, "cnn1d": {"channels": 4}}},
        train={"max_epochs": 2, "precision": 16, "grad_clip_norm": 1.0, "compile": True,
               "accumulate_grad_batches": 2, "metrics": ["acc", "f1", "auroc"],
               "lr_scheduler": {"name": "onecycle"}},
        resources={"workers": 1},
    )
    study_file = write_study(tmp_path, raw)
    out = run_cli(tmp_path, study_file, "--workers", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    trials = trials_of(tmp_path / "res/tiny")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, states(trials)
    for t in trials:
        assert all(0 <= h["val_f1"] <= 1 and 0 <= h["val_auroc"] <= 1
                   for h in t.user_attrs["history"])
    model = hpsearch.load_best_model(tmp_path / "res/tiny", map_location="cuda:0")
    assert next(model.parameters()).dtype == torch.float32


def test_fp16_resume_restores_the_grad_scaler_on_gpu(tmp_path: Path) -> None:
    # Internal API, imported here so that a renamed module fails this test only.
    import copy

    import optuna
    from studyfiles import TINY

    from hpsearch.config import parse_config
    from hpsearch.data import build
    from hpsearch.errors import Interrupted
    from hpsearch.optuna_private import frozen
    from hpsearch.results import ResultsLayout
    from hpsearch.space import sample
    from hpsearch.storage.trials import fail_trial
    from hpsearch.train import TrialEnv, run_trial

    raw = copy.deepcopy(TINY)
    raw["model"]["architecture"] = {"mlp": {"hidden": 32}}
    raw["train"].update(max_epochs=4, lr=0.01, early_stopping=None, precision=16,
                        lr_scheduler={"name": "cosine", "warmup_epochs": 1})
    raw["checkpoint"].update(resume_min_seconds=0)
    cfg = parse_config(raw, "s.yaml")
    ds = build(cfg.data)
    device = torch.device("cuda:0")

    def env(folder: Path, **kw: object) -> TrialEnv:
        return TrialEnv(config=cfg, dataset=ds, device=device, layout=ResultsLayout(folder),
                        worker="test", log=lambda s: None, **kw)  # type: ignore[arg-type]

    straight = optuna.create_study(direction="maximize").ask()
    run_trial(straight, sample(straight, cfg), env(tmp_path / "a"))
    epochs: list[int] = []
    resumed_env = env(tmp_path / "b", should_stop=lambda: len(epochs) >= 1,
                      on_epoch=lambda n, e, rec: epochs.append(e))
    study = optuna.create_study(direction="maximize")
    first = study.ask()
    with pytest.raises(Interrupted):
        run_trial(first, sample(first, cfg), resumed_env)
    state = torch.load(tmp_path / "b/trials/0/last.pt", weights_only=True)
    assert state["grad_scaler_state_dict"]["scale"] > 0
    fail_trial(study, frozen(first), "interrupted", retry=True)
    resumed_env.should_stop = lambda: False
    retry = study.ask()
    run_trial(retry, sample(retry, cfg), resumed_env)
    a, b = straight.user_attrs["history"], retry.user_attrs["history"]
    assert [h["lr"] for h in a] == [h["lr"] for h in b]
    for ha, hb in zip(a, b):
        assert hb["val_loss"] == pytest.approx(ha["val_loss"], rel=1e-3)
