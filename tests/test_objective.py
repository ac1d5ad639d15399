"""``objective:``, the user's own training loop, keeps every guarantee of the built-in one.

The user module below is written into the test's folder, as a user's would sit next to the
study file. Its loop trains with its own optimizer, schedule and metric (``val_score``, a name
hpsearch does not compute), and reports through ``ctx``. The in-process tests drive single
trials (book-keeping, exact resume, pruning, stop requests, misuse, the report's test scores);
the end-to-end ones run ``python -m hpsearch.run`` and SIGKILL or Ctrl-C it.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from studyfiles import derive, open_results, write_study
from test_resilience import Run, assert_no_process_left, mid_training, retry_of, worker_pids

import hpsearch
from hpsearch import attrs
from hpsearch import data as data_mod
from hpsearch.checkpoint.format import load_checkpoint
from hpsearch.checkpoint.loading import load_model
from hpsearch.checkpoint.trial_files import TrialFiles
from hpsearch.config import StudyConfig, parse_config
from hpsearch.errors import ConfigError, Interrupted
from hpsearch.objective import run_objective_trial, score_checkpoint, train_and_test
from hpsearch.optuna_private import frozen
from hpsearch.results import RESUME_STATE, ResultsLayout
from hpsearch.space import sample
from hpsearch.storage.trials import fail_trial
from hpsearch.train import TrialEnv

optuna.logging.set_verbosity(optuna.logging.WARNING)

USER_MODULE = textwrap.dedent(
    '''
    import json
    import math
    import os
    import time

    import torch
    import torch.nn.functional as F
    from torch import nn


    def make(input_shape, output_size, hidden):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                             nn.Linear(hidden, output_size))


    @torch.no_grad()
    def score(model, batches):
        """Accuracy and mean cross-entropy over a whole split."""
        model.eval()
        correct = total = 0
        loss = 0.0
        for x, y in batches.iterate(4096):
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            total += len(y)
        model.train()
        return correct / total, loss / total


    def objective(ctx):
        model = ctx.model
        optimizer = torch.optim.SGD(model.parameters(), lr=ctx.params["lr"], momentum=0.9)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.7)
        ctx.restore(optimizer=optimizer, scheduler=schedule)
        train, val = ctx.batches("train"), ctx.batches("val")
        pause = float(os.environ.get("OBJECTIVE_EPOCH_SECONDS", "0"))
        for epoch in ctx.epochs():
            total = seen = 0
            for x, y in train.iterate(ctx.params["batch_size"], ctx.generator):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(y)
                seen += len(y)
            schedule.step()
            time.sleep(pause)
            acc, val_loss = score(model, val)
            ctx.report(epoch, {"train_loss": total / seen, "val_score": acc,
                               "val_loss": val_loss},
                       model=model, optimizer=optimizer, scheduler=schedule)
        if ctx.scoring_test:
            ctx.report_test({"test_score": score(model, ctx.batches("test"))[0]})


    def no_restore(ctx):
        for epoch in ctx.epochs():
            ctx.report(epoch, {"val_score": 0.5})


    def missing_metric(ctx):
        ctx.restore()
        for epoch in ctx.epochs():
            ctx.report(epoch, {"val_accuracy": 0.5})


    def peeks_at_test(ctx):
        ctx.restore()
        ctx.batches("test")


    def never_scores_test(ctx):
        ctx.restore()
        for epoch in ctx.epochs():
            ctx.report(epoch, {"val_score": 0.5})


    def wrong_model(ctx):
        ctx.restore()
        for epoch in ctx.epochs():
            ctx.report(epoch, {"val_score": 0.5}, model=nn.Linear(1, 1))


    def skips_an_epoch(ctx):
        ctx.restore()
        for epoch in ctx.epochs():
            if epoch == 0:
                ctx.report(epoch, {"val_score": 0.5})


    def record_event(event):
        with open(os.environ["OBJECTIVE_EVENTS"], "a") as f:
            f.write(json.dumps([event.kind, event.epoch, event.state]) + "\\n")
    '''
)

MAX_EPOCHS = 4


def study_dict(**sections: Any) -> dict[str, Any]:
    raw = {
        "study": {"name": "objective", "metric": "val_score", "direction": "maximize",
                  "n_trials": 3, "sampler": {"name": "random", "seed": 0},
                  "pruner": {"name": "none"}, "heartbeat_interval": 0.5, "grace_period": 3},
        "objective": "objmod:objective",
        "data": {"name": "mnist1d", "args": {"num_samples": 500}},
        "model": {"architecture": {"net": {"factory": "objmod:make",
                                           "hidden": {"type": "int", "low": 16, "high": 48}}}},
        "train": {"max_epochs": MAX_EPOCHS, "batch_size": 32, "early_stopping": None,
                  "lr": {"type": "float", "low": 0.01, "high": 0.05, "log": True}},
        "checkpoint": {"keep_top_k_trials": 1, "resume_min_seconds": 0},
        "resources": {"devices": "cpu", "workers": 2, "torch_threads": 1},
        "report": {"enabled": False},
    }
    return derive(raw, **sections)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "objmod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("OBJECTIVE_EVENTS", str(events))
    return events


def config_of(**sections: Any) -> StudyConfig:
    return parse_config(study_dict(**sections), "objective.yaml")


def env_of(folder: Path, config: StudyConfig, dataset: data_mod.Dataset,
           **kw: Any) -> TrialEnv:
    return TrialEnv(config=config, dataset=dataset, device=torch.device("cpu"),
                    layout=ResultsLayout(folder), worker="test", log=lambda line: None, **kw)


def val_score(model: torch.nn.Module, dataset: data_mod.Dataset, split: str = "val") -> float:
    x, y = dataset.splits[split]  # type: ignore[index]
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def dataset() -> data_mod.Dataset:
    return data_mod.build(parse_config(
        {"study": {"name": "d"}, "data": study_dict()["data"],
         "model": {"architecture": ["linear"]}}).data)


def metrics_of(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in rec.items() if k != "seconds"} for rec in history]


# ---------------------------------------------------------------- one trial, in process


def test_an_objective_trial_is_book_kept_like_a_built_in_one(
        tmp_path: Path, user_module: Path, dataset: data_mod.Dataset) -> None:
    config = config_of(callbacks=["objmod:record_event"], logging={"tensorboard": True})
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    value = run_objective_trial(trial, sample(trial, config), env_of(tmp_path, config, dataset))

    attrs_ = trial.user_attrs
    history = attrs_[attrs.HISTORY]
    assert [r["epoch"] for r in history] == list(range(MAX_EPOCHS))
    assert all({"train_loss", "val_score", "val_loss", "lr", "seconds"} <= set(r)
               for r in history)
    lr = trial.params["lr"]  # after the user's StepLR(step_size=2, gamma=0.7) stepped
    assert [r["lr"] for r in history] == pytest.approx([lr, lr * .7, lr * .7, lr * .49])
    assert frozen(trial).intermediate_values == {r["epoch"]: r["val_score"] for r in history}
    # The value is the best epoch's, and that epoch is the checkpoint.
    best_epoch = attrs_[attrs.BEST_EPOCH]
    assert value == max(r["val_score"] for r in history) == history[best_epoch]["val_score"]
    ckpt = load_checkpoint(tmp_path / attrs_[attrs.CHECKPOINT])
    assert (ckpt["epoch"], ckpt["value"]) == (best_epoch, value)
    assert ckpt["model"]["factory"] == "objmod:make"
    assert attrs_[attrs.N_PARAMS] == sum(p.numel() for p in load_model(ckpt["path"]).parameters())
    # Rebuilt from the recorded factory, the checkpoint scores what the trial recorded.
    assert val_score(load_model(ckpt["path"]), dataset) == pytest.approx(value)
    assert not (tmp_path / "trials" / "0" / RESUME_STATE).exists()
    # Callbacks and TensorBoard hear of every epoch, and of the end.
    events = [json.loads(line) for line in user_module.read_text().splitlines()]
    assert events == [["epoch", e, "RUNNING"] for e in range(MAX_EPOCHS)] + [
        ["trial_end", MAX_EPOCHS - 1, "COMPLETE"]]
    assert list((tmp_path / "trials" / "0" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_stopped_objective_trial_resumes_exactly_where_it_stopped(
        tmp_path: Path, user_module: Path, dataset: data_mod.Dataset) -> None:
    """Weights, momentum, the schedule and the shuffling order all continue: the resumed
    trial's epochs equal those of a trial that was never stopped."""
    config = config_of()
    straight_study = optuna.create_study(direction="maximize",
                                         sampler=optuna.samplers.RandomSampler(seed=0))
    straight = straight_study.ask()
    run_objective_trial(straight, sample(straight, config),
                        env_of(tmp_path / "straight", config, dataset))

    epochs: list[int] = []
    env = env_of(tmp_path / "stopped", config, dataset, should_stop=lambda: len(epochs) >= 2,
                 on_epoch=lambda n, e, rec: epochs.append(e))
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    first = study.ask()
    with pytest.raises(Interrupted):
        run_objective_trial(first, sample(first, config), env)
    assert epochs == [0, 1, 2]  # honoured at the end of the epoch it came in
    assert (tmp_path / "stopped" / "trials" / "0" / RESUME_STATE).exists()
    fail_trial(study, frozen(first), "interrupted", retry=True)

    retry = study.ask()
    env.should_stop = lambda: False
    run_objective_trial(retry, sample(retry, config), env)
    assert retry.user_attrs[attrs.RESUMED_FROM] == {"trial": 0, "epoch": 3}
    assert sorted(frozen(retry).intermediate_values) == list(range(MAX_EPOCHS))
    assert metrics_of(retry.user_attrs[attrs.HISTORY]) == metrics_of(
        straight.user_attrs[attrs.HISTORY])


def test_the_pruner_stops_an_objective_trial(
        tmp_path: Path, user_module: Path, dataset: data_mod.Dataset) -> None:
    config = config_of(callbacks=["objmod:record_event"])
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match="pruned at epoch 0"):
        run_objective_trial(trial, sample(trial, config), env_of(tmp_path, config, dataset))
    events = [json.loads(line) for line in user_module.read_text().splitlines()]
    assert events == [["epoch", 0, "RUNNING"], ["trial_end", 0, "PRUNED"]]


@pytest.mark.parametrize(("function", "error", "says"), [
    ("no_restore", RuntimeError, r"call ctx.restore\(optimizer=..., scheduler=...\) before"),
    ("missing_metric", ValueError, r"lacks 'val_score' \(study.metric\)"),
    ("peeks_at_test", RuntimeError, "the search never sees it"),
    ("wrong_model", RuntimeError, r"model=...\) must be ctx.model"),
    ("skips_an_epoch", RuntimeError, r"epoch 1 was not reported"),
])
def test_misuse_of_the_context_fails_the_trial_saying_how(
        tmp_path: Path, user_module: Path, dataset: data_mod.Dataset, function: str,
        error: type[Exception], says: str) -> None:
    config = config_of(objective=f"objmod:{function}")
    trial = optuna.create_study(direction="maximize").ask()
    with pytest.raises(error, match=says):
        run_objective_trial(trial, sample(trial, config), env_of(tmp_path, config, dataset))


# ---------------------------------------------------------------- the report's test scores


def test_the_report_scores_the_test_split_through_the_objective(
        tmp_path: Path, user_module: Path, dataset: data_mod.Dataset) -> None:
    config = config_of()
    trial = optuna.create_study(direction="maximize").ask()
    params = sample(trial, config)
    run_objective_trial(trial, params, env_of(tmp_path, config, dataset))
    path = tmp_path / trial.user_attrs[attrs.CHECKPOINT]
    # A kept checkpoint: the objective trains nothing and scores the loaded weights.
    scored = score_checkpoint(config, path, params, dataset, torch.device("cpu"))
    assert scored["test_score"] == pytest.approx(val_score(load_model(path), dataset, "test"))
    # A seed retrain: trained afresh, scored with its best epoch's weights, reproducibly.
    cpu = torch.device("cpu")
    retrained = train_and_test(config, params, dataset, cpu, seed=1_000_000)
    assert 0.0 <= retrained["test_score"] <= 1.0
    assert train_and_test(config, params, dataset, cpu, seed=1_000_000) == retrained

    silent = config_of(objective="objmod:never_scores_test")
    with pytest.raises(RuntimeError, match=r"did not call ctx.report_test"):
        train_and_test(silent, params, dataset, cpu, seed=1)


# ---------------------------------------------------------------- the study file


def test_objective_study_files_are_checked(user_module: Path) -> None:
    config = config_of()
    assert config.objective == "objmod:objective"
    # A metric of the user's own needs no train.metrics, and the saved copy reads back.
    assert parse_config(config.as_study_dict()).objective == "objmod:objective"
    with pytest.raises(ConfigError, match="train.precision: has no effect with `objective:`"):
        config_of(train={"precision": "bf16"})
    with pytest.raises(ConfigError, match="objective: .*cannot import 'nomodule'"):
        config_of(objective="nomodule:fn")
    # Without the objective, hpsearch would have to compute that metric itself.
    with pytest.raises(ConfigError, match="study.metric: 'val_score' is not computed"):
        parse_config(study_dict(objective=None))


# ---------------------------------------------------------------- real runs, real signals


@pytest.mark.slow
def test_objective_study_survives_sigkill_and_keeps_every_guarantee(
        tmp_path: Path, user_module: Path) -> None:
    raw = study_dict(train={"max_epochs": 6}, report={"enabled": True, "seeds": 1})
    study_file = write_study(tmp_path, raw)
    run = ObjectiveRun(tmp_path, study_file, env={"OBJECTIVE_EPOCH_SECONDS": "0.15"})
    run_results = run.results
    try:
        status = mid_training(run, min_epoch=1, last_epoch=2)
        victim, number = int(status["pid"]), int(status["trial"])
        assert victim in {p.pid for p in run.descendants()}
        os.kill(victim, signal.SIGKILL)
        rc = run.wait()
    finally:
        run.kill()
    out = run.output()
    assert rc == 0, out
    assert f"died during trial {number}" in out, out

    study = open_results(run_results)
    trials = study.get_trials(deepcopy=False)
    retry = retry_of(trials, number)
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs[attrs.RESUMED_FROM]["trial"] == number
    assert retry.user_attrs[attrs.RESUMED_FROM]["epoch"] > 0
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    for t in complete:
        assert sorted(t.intermediate_values) == list(range(6)), t.intermediate_values
    # Retention: only the best trial keeps files (one architecture, keep_top_k_trials: 1).
    best = study.best_trial
    with_files = {int(p.parent.name) for p in run_results.glob("trials/*/*.pt")}
    assert with_files == {best.number}, with_files
    ckpt = load_checkpoint(run_results / best.user_attrs[attrs.CHECKPOINT])
    assert (ckpt["epoch"], ckpt["value"]) == (best.user_attrs[attrs.BEST_EPOCH], best.value)
    # best/ is that trial, and load_best_model rebuilds it from the recorded factory.
    meta = json.loads((run_results / "best" / "meta.json").read_text())
    assert meta["trial"] == best.number and meta["value"] == pytest.approx(best.value)
    config = parse_config(raw)
    dataset = data_mod.load(config.data, ResultsLayout(run_results).data_cache)
    assert val_score(hpsearch.load_best_model(run_results), dataset) == pytest.approx(best.value)
    # verify reproduces the value with the objective's own scoring, on the validation split.
    verified = subprocess.run([sys.executable, "-m", "hpsearch.verify", str(run_results)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(user_module.parent)})
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"val_score={best.value:.6g} reproduced" in verified.stdout, verified.stdout
    # Dashboard artifacts: the kept checkpoint and the study best.
    assert best.user_attrs.get(attrs.CHECKPOINT_ARTIFACT)
    assert study.user_attrs.get(attrs.STUDY_BEST_ARTIFACT)
    # The report scored the test split through the objective: the checkpoint and a retrain.
    row = next(r for r in _csv_rows(run_results / "architectures.csv")
               if r["architecture"] == "net")
    assert 0.0 <= float(row["test_score"]) <= 1.0
    assert row["seed_n"] == "1" and 0.0 <= float(row["seed_values"]) <= 1.0


@pytest.mark.slow
def test_ctrl_c_stops_an_objective_study_and_the_rerun_resumes_it(
        tmp_path: Path, user_module: Path) -> None:
    raw = study_dict(study={"n_trials": 2}, train={"max_epochs": 6})
    study_file = write_study(tmp_path, raw)
    env = {"OBJECTIVE_EPOCH_SECONDS": "0.15"}
    run = ObjectiveRun(tmp_path, study_file, env=env)
    run_results = run.results
    try:
        status = mid_training(run, min_epoch=1, last_epoch=2)
        number = int(status["trial"])
        pids = worker_pids(run_results) | {p.pid for p in run.descendants()}
        os.killpg(run.pid, signal.SIGINT)
        rc = run.wait(timeout=30)
        assert_no_process_left(run, pids, timeout=2.0)
    finally:
        run.kill()
    assert rc == 130, run.output()
    assert (run_results / "trials" / str(number) / RESUME_STATE).exists()
    stopped = open_results(run_results).get_trials(deepcopy=False)[number]
    assert "interrupted" in stopped.user_attrs[attrs.FAIL_REASON]

    rerun = ObjectiveRun(tmp_path, study_file, env=env, label="rerun")
    try:
        assert rerun.wait() == 0, rerun.output()
    finally:
        rerun.kill()
    retry = retry_of(open_results(run_results).get_trials(deepcopy=False), number)
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs[attrs.RESUMED_FROM]["epoch"] > 0
    assert sorted(retry.intermediate_values) == list(range(6))


class ObjectiveRun(Run):
    """test_resilience's run of ``python -m hpsearch.run``, for this study's folder."""

    @property
    def results(self) -> Path:
        return self.cwd / "res" / "objective"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- found on the way


def test_a_resumed_trial_deletes_the_checkpoint_its_dead_worker_never_recorded(
        tmp_path: Path) -> None:
    """A worker SIGKILLed between writing a checkpoint and its manifest left the file behind
    for good (seen in the SIGKILL test above): the retry now removes it."""
    dead = TrialFiles(tmp_path / "1", "val_score", "max", keep_top_k=1)
    dead.folder.mkdir()
    dead.save("epoch000.pt", {"w": torch.zeros(1)}, "best", 0, 0.5)
    torch.save({"w": torch.ones(1)}, dead.folder / "epoch001.pt")  # never recorded
    torch.save({"epoch": 0}, dead.folder / RESUME_STATE)
    retry = TrialFiles(tmp_path / "2", "val_score", "max", keep_top_k=1)
    retry.adopt(dead)
    assert sorted(p.name for p in retry.folder.glob("*.pt")) == ["epoch000.pt"]
    assert list(retry.entries) == ["epoch000.pt"]
    # The resume state is the caller's to move.
    assert sorted(p.name for p in dead.folder.glob("*.pt")) == [RESUME_STATE]
