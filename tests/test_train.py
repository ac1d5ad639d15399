"""The trial loop: best-epoch tracking, NaN handling, checkpoint/value agreement, resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import optuna
import pytest
import torch
from studyfiles import TINY

from hpsearch.checkpoint.format import load_checkpoint
from hpsearch.config import parse_config
from hpsearch.data import build
from hpsearch.errors import Interrupted
from hpsearch.results import ResultsLayout
from hpsearch.space import TrialParams
from hpsearch.train import NonFiniteError, Tracker, TrialEnv, run_trial


@pytest.mark.parametrize(
    "mode,values,best,epoch",
    [
        ("min", [3.0, 2.0, 2.5, 1.0, 1.5], 1.0, 3),
        ("max", [0.1, 0.5, 0.4, 0.5, 0.2], 0.5, 1),  # a tie is not an improvement
        ("min", [float("nan"), 2.0, float("inf"), 1.9], 1.9, 3),
        ("max", [float("nan"), float("inf"), 0.3], 0.3, 2),
        ("min", [float("-inf"), 5.0], 5.0, 1),
    ],
)
def test_tracker_best_epoch(mode: str, values: list[float], best: float, epoch: int) -> None:
    t = Tracker(mode)
    for i, v in enumerate(values):
        t.update(v, i)
    assert t.best == best and t.best_epoch == epoch


def test_tracker_never_best_when_all_nonfinite() -> None:
    t = Tracker("min")
    for i, v in enumerate([float("nan"), float("inf")]):
        assert not t.update(v, i)
    assert t.best is None and t.best_epoch is None


def test_tracker_patience_and_min_delta() -> None:
    t = Tracker("min", min_delta=0.1, patience=2)
    assert t.update(1.0, 0)
    assert not t.update(0.95, 1)  # better, but by less than min_delta
    assert not t.should_stop
    assert not t.update(0.93, 2)
    assert t.should_stop and t.best == 1.0


def test_tracker_state_round_trip() -> None:
    t = Tracker("max", patience=3)
    t.update(0.2, 0)
    t.update(0.1, 1)
    u = Tracker("max", patience=3)
    u.load_state_dict(t.state_dict())
    assert (u.best, u.best_epoch, u.bad_epochs) == (0.2, 0, 1)


@pytest.fixture(scope="module")
def dataset():
    config = parse_config(copy.deepcopy(TINY), "s.yaml")
    return build(config.data)


def _env(tmp_path: Path, config, dataset) -> TrialEnv:
    return TrialEnv(config=config, dataset=dataset, device=torch.device("cpu"),
                    layout=ResultsLayout(tmp_path), worker="test", log=lambda s: None)


def _params(**train) -> TrialParams:
    base = {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9,
            "batch_size": 64}
    return TrialParams("mlp", {"hidden": 32}, {**base, **train})


def test_value_is_best_epoch_metric_and_matches_checkpoint(tmp_path, dataset) -> None:
    raw = copy.deepcopy(TINY)
    raw["train"]["max_epochs"] = 6
    raw["train"]["early_stopping"] = None
    config = parse_config(raw, "s.yaml")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    value = run_trial(trial, _params(), _env(tmp_path, config, dataset))
    history = trial.user_attrs["history"]
    best_epoch = trial.user_attrs["best_epoch"]
    accs = [h["val_acc"] for h in history]
    assert len(history) == 6
    assert value == max(accs) == accs[best_epoch]
    ckpt = load_checkpoint(tmp_path / trial.user_attrs["checkpoint"])
    assert ckpt["epoch"] == best_epoch and ckpt["value"] == value
    assert ckpt["model"]["architecture"] == "mlp" and ckpt["model"]["params"] == {"hidden": 32}
    # The file is self-describing and loads with plain weights_only=True.
    plain = torch.load(tmp_path / trial.user_attrs["checkpoint"], weights_only=True)
    assert set(plain) >= {"model_state_dict", "epoch", "monitor", "mode", "value", "trial",
                          "study", "history", "hpsearch_version", "format_version", "params"}
    assert not (tmp_path / "trials" / "0" / "last.pt").exists()


def test_nan_loss_fails_the_trial(tmp_path, dataset) -> None:
    config = parse_config(copy.deepcopy(TINY), "s.yaml")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    with pytest.raises(NonFiniteError, match="non-finite"):
        run_trial(trial, _params(lr=1e12), _env(tmp_path, config, dataset))


def test_nan_loss_prunes_when_configured(tmp_path, dataset) -> None:
    raw = copy.deepcopy(TINY)
    raw["train"]["on_nonfinite"] = "prune"
    config = parse_config(raw, "s.yaml")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        run_trial(trial, _params(lr=1e12), _env(tmp_path, config, dataset))
    assert "non-finite" in trial.user_attrs["prune_reason"]


def test_top_k_epochs_kept_per_trial(tmp_path, dataset) -> None:
    raw = copy.deepcopy(TINY)
    raw["train"].update(max_epochs=8, early_stopping=None)
    raw["checkpoint"].update(keep_top_k=2)
    config = parse_config(raw, "s.yaml")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    run_trial(trial, _params(lr=0.003), _env(tmp_path, config, dataset))
    files = sorted((tmp_path / "trials" / "0").glob("epoch*.pt"))
    assert 1 <= len(files) <= 2
    values = sorted((load_checkpoint(f)["value"] for f in files), reverse=True)
    accs = sorted((h["val_acc"] for h in trial.user_attrs["history"]), reverse=True)
    assert math.isclose(values[0], accs[0])


def test_save_none_writes_no_checkpoint(tmp_path, dataset) -> None:
    raw = copy.deepcopy(TINY)
    raw["checkpoint"].update(save="none")
    config = parse_config(raw, "s.yaml")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    run_trial(trial, _params(), _env(tmp_path, config, dataset))
    assert not list((tmp_path / "trials" / "0").glob("*.pt"))
    assert "checkpoint" not in trial.user_attrs


@pytest.mark.parametrize("min_seconds", [0.0, 3600.0])
def test_resume_state_is_throttled_but_always_written_on_stop(tmp_path, dataset,
                                                               min_seconds: float) -> None:
    raw = copy.deepcopy(TINY)
    raw["train"].update(max_epochs=8, early_stopping=None)
    raw["checkpoint"].update(resume_min_seconds=min_seconds)
    config = parse_config(raw, "s.yaml")
    last = tmp_path / "trials" / "0" / "last.pt"
    seen: list[bool] = []

    def on_epoch(trial: int, epoch: int, record: dict) -> None:
        # Epoch e's write was submitted before this call and epoch e-1's has finished.
        seen.append(last.exists())

    env = _env(tmp_path, config, dataset)
    env.on_epoch = on_epoch
    env.should_stop = lambda: len(seen) >= 4  # a stop request after epoch 3
    trial = optuna.create_study(direction="maximize").ask()
    with pytest.raises(Interrupted):
        run_trial(trial, _params(), env)
    assert len(seen) == 5  # epochs 0-4; the request is seen at the end of epoch 4
    if min_seconds:
        assert seen[:4] == [False] * 4  # throttled: never during these short epochs
    else:
        assert seen[1:4] == [True] * 3
    # The stop wrote the resume state of the last finished epoch either way.
    assert torch.load(last, weights_only=True)["epoch"] == 4
