"""Tuning the user's own training: metrics, losses, the built-in loop's options, TensorBoard
and callbacks (issue 11, part 1)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from sklearn.metrics import f1_score
from studyfiles import REGRESSION, TINY, open_results, user_module, write_study

from hpsearch import evaluation
from hpsearch.callbacks import TrialEvent
from hpsearch.config import parse_config
from hpsearch.data import Dataset, DeviceBatches, build
from hpsearch.errors import CallbackError, ConfigError, Interrupted
from hpsearch.evaluation import Evaluator, builtin_metric, study_evaluator
from hpsearch.losses import build_loss
from hpsearch.optuna_private import frozen
from hpsearch.results import ResultsLayout
from hpsearch.run.runner import check_strategy, load_dataset
from hpsearch.space import TrialParams, from_params, sample
from hpsearch.storage.trials import fail_trial
from hpsearch.train import Trainer, TrialEnv, run_trial

# User code the study files name, written into each test's folder (on sys.path).
USER_CODE = textwrap.dedent(
    """
    import json
    import os

    import torch
    from torch import nn

    CALLS = []


    def spread(outputs, targets):
        # A user metric: called once per split with all of it.
        CALLS.append(len(targets))
        return float(outputs.max(1).values.std())


    def margin_loss(outputs, targets, scale=1.0):
        return scale * nn.functional.multi_margin_loss(outputs, targets)


    def record(event):
        with open(os.environ["EVENTS_FILE"], "a") as f:
            f.write(json.dumps({"kind": event.kind, "trial": event.trial, "epoch": event.epoch,
                                "state": event.state, "value": event.value,
                                "metrics": sorted(event.metrics),
                                "params": event.params}) + "\\n")


    def explode(event):
        if event.kind == "epoch" and event.epoch == 1:
            raise RuntimeError("the tracking server is down")


    EVENTS = []


    def keep(event):
        EVENTS.append(event)


    class Passthrough(nn.Module):
        # Outputs its input as logits (plus a parameter the optimizer can hold).
        def __init__(self):
            super().__init__()
            self.zero = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x + 0.0 * self.zero


    def passthrough(input_shape, output_size):
        return Passthrough()


    def skewed(n=400):
        # Logits and labels whose F1 over the whole split differs from the mean of F1s over
        # batches: the positives are all in the last part of each split.
        g = torch.Generator().manual_seed(0)
        y = (torch.arange(n) >= n * 3 // 4).long()
        noise = torch.randn(n, generator=g)
        score = torch.where(y == 1, noise + 0.7, noise - 0.7)
        x = torch.stack([-score, score], 1)
        return {"x": x.numpy(), "y": y.numpy(), "x_val": x.numpy(), "y_val": y.numpy(),
                "x_test": x.numpy(), "y_test": y.numpy(), "task": "classification"}
    """
)


@pytest.fixture()
def user_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    yield from user_module(tmp_path, monkeypatch, "usercode", USER_CODE)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return build(parse_config(copy.deepcopy(TINY), "s.yaml").data)


@pytest.fixture(scope="module")
def reg_dataset() -> Dataset:
    return build(parse_config(copy.deepcopy(REGRESSION), "s.yaml").data)


def config(base: dict[str, Any] = TINY, **train: Any) -> Any:
    raw = copy.deepcopy(base)
    raw["model"]["architecture"] = {"mlp": {"hidden": 16}}
    raw["train"].update({"max_epochs": 3, "lr": 0.01, "early_stopping": None, **train})
    return raw


def parsed(raw: dict[str, Any]) -> Any:
    return parse_config(raw, "s.yaml")


def bad(raw: dict[str, Any], key: str, *words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "s.yaml")
    assert err.value.key == key, str(err.value)
    assert err.value.exit_code == 2
    for word in words:
        assert word in err.value.problem, str(err.value)


def trial_env(tmp_path: Path, cfg: Any, ds: Dataset, **kw: Any) -> TrialEnv:
    return TrialEnv(config=cfg, dataset=ds, device=torch.device("cpu"),
                    layout=ResultsLayout(tmp_path), worker="test", log=lambda s: None, **kw)


def run_one(tmp_path: Path, cfg: Any, ds: Dataset, **kw: Any) -> optuna.Trial:
    trial = optuna.create_study(direction=cfg.study.direction).ask()
    run_trial(trial, sample(trial, cfg), trial_env(tmp_path, cfg, ds, **kw))
    return trial


# ---------------------------------------------------------------- 1. metrics: the keys


@pytest.mark.parametrize("value,key,words", [
    (["precison"], "train.metrics.0", ("unknown metric", "did you mean 'precision'")),
    (["mse"], "train.metrics.0", ("not a classification metric",)),
    (["acc", "accuracy"], "train.metrics.1", ("computes 'acc'",)),
    ([], "train.metrics", ("at least one",)),
    (["loss"], "train.metrics.0", ("always computed",)),
    (["nosuchmodule:fn"], "train.metrics.0", ("cannot import",)),
    ("acc", "train.metrics", ()),
])
def test_train_metrics_rejects(value: Any, key: str, words: tuple[str, ...]) -> None:
    bad(config(metrics=value), key, *words)


def test_user_metric_named_like_a_builtin_is_rejected(user_code: Path) -> None:
    (user_code / "clash.py").write_text("def f1(o, t):\n    return 0.0\n")
    bad(config(metrics=["clash:f1"]), "train.metrics.0", "rename")


def test_metric_names_and_defaults() -> None:
    cfg = parsed(config())
    assert cfg.train.metrics is None and cfg.study.direction == "maximize"
    raw = config(metrics=["accuracy", "f1", "auroc", "precision", "recall"])
    raw["study"].update(metric="val_auroc")
    del raw["study"]["direction"]
    cfg = parsed(raw)
    assert cfg.study.direction == "maximize" and cfg.checkpoint.mode == "max"
    reg = config(REGRESSION, metrics=["mse", "mae", "r2"])
    reg["study"].update(metric="val_r2")
    del reg["study"]["direction"]
    assert parsed(reg).study.direction == "maximize"
    bad(config(metrics=["f1"]), "study.metric", "'val_acc' is not computed", "val_f1")


@pytest.mark.parametrize("metric,direction", [
    ("val_loss", "minimize"), ("train_loss", "minimize"), ("val_acc", "maximize"),
])
def test_direction_is_inferred_from_an_obvious_metric(metric: str, direction: str) -> None:
    raw = config()
    raw["study"].update(metric=metric)
    del raw["study"]["direction"]
    assert parsed(raw).study.direction == direction


def test_an_explicit_direction_wins_even_against_the_metric() -> None:
    raw = config()
    raw["study"].update(metric="val_loss", direction="maximize")
    cfg = parsed(raw)
    assert cfg.study.direction == "maximize" and cfg.checkpoint.mode == "max"


def test_a_user_metric_needs_a_direction(user_code: Path) -> None:
    raw = config(metrics=["acc", "usercode:spread"])
    raw["study"].update(metric="val_spread")
    del raw["study"]["direction"]
    bad(raw, "study.direction", "val_spread")
    raw["study"]["direction"] = "minimize"
    assert parsed(raw).checkpoint.mode == "min"
    # A monitor other than the study metric takes its own obvious direction...
    raw["checkpoint"].update(monitor="val_loss")
    raw["study"].update(metric="val_acc", direction="maximize")
    assert parsed(raw).checkpoint.mode == "min"
    # ...and a user metric as the monitor needs checkpoint.mode.
    raw["checkpoint"].update(monitor="val_spread")
    bad(raw, "checkpoint.mode", "val_spread")


# ---------------------------------------------------------------- 1. metrics: the values


def test_f1_is_over_the_whole_split_not_a_mean_of_batches(tmp_path: Path, user_code: Path,
                                                          monkeypatch) -> None:
    monkeypatch.setattr(evaluation, "EVAL_BATCH", 50)  # 8 validation batches of 50
    raw = config(metrics=["f1", "acc"], lr=1e-9, batch_size=50)
    raw["data"] = {"name": "usercode:skewed"}
    raw["model"]["architecture"] = {"pass": {"factory": "usercode:passthrough"}}
    raw["study"].update(metric="val_f1")
    cfg = parsed(raw)
    ds = build(cfg.data)
    x, y = ds.splits["val"]
    pred = x.argmax(1).numpy()
    whole = f1_score(y.numpy(), pred, average="macro")
    batches = [f1_score(y[i:i + 50].numpy(), pred[i:i + 50], average="macro", zero_division=0)
               for i in range(0, len(y), 50)]
    assert abs(whole - np.mean(batches)) > 0.1  # the data shows the difference
    trial = run_one(tmp_path, cfg, ds)
    reported = [h["val_f1"] for h in trial.user_attrs["history"]]
    assert reported == pytest.approx([whole] * 3, abs=1e-6)
    # The report's test score uses the same metric (the test split is the same data here).
    ev = study_evaluator(cfg, ds.task)
    test = DeviceBatches(ds, "test", torch.device("cpu"), in_memory=True)
    from hpsearch.checkpoint.loading import load_model
    model = load_model(tmp_path / trial.user_attrs["checkpoint"])
    assert ev(model, test)["f1"] == pytest.approx(whole, abs=1e-6)


def test_summed_defaults_equal_torchmetrics(dataset: Dataset, reg_dataset: Dataset) -> None:
    torch.manual_seed(0)
    for ds, names in ((dataset, ["acc"]), (reg_dataset, ["mse", "mae", "r2"])):
        x, y = ds.splits["val"]
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(),
                                                                        ds.output_size))
        batches = DeviceBatches(ds, "val", torch.device("cpu"), in_memory=True)
        got = Evaluator(ds.task, names)(model, batches)
        with torch.no_grad():
            out = model(x)
        for name in names:
            assert got[name] == pytest.approx(float(builtin_metric(name, out, y)), rel=1e-5)
        assert set(got) == {"loss", *names}


def test_the_default_metrics_do_not_import_torchmetrics() -> None:
    code = textwrap.dedent("""
        import sys, copy
        sys.path.insert(0, "tests")
        import torch
        from studyfiles import TINY
        from hpsearch.config import parse_config
        from hpsearch.data import DeviceBatches, build
        from hpsearch.evaluation import Evaluator
        ds = build(parse_config(copy.deepcopy(TINY), "s").data)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 10))
        print(Evaluator(ds.task)(model, DeviceBatches(ds, "val", torch.device("cpu"), True)))
        assert "torchmetrics" not in sys.modules
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr


def test_user_metric_is_called_once_per_split_and_can_be_the_study_metric(
        tmp_path: Path, user_code: Path, dataset: Dataset) -> None:
    raw = config(metrics=["acc", "auroc", "usercode:spread"])
    raw["study"].update(metric="val_spread", direction="minimize")
    cfg = parsed(raw)
    trial = run_one(tmp_path, cfg, dataset)
    import usercode

    assert usercode.CALLS == [dataset.size("val")] * 3
    hist = trial.user_attrs["history"]
    assert all({"val_spread", "val_auroc", "val_acc", "val_loss"} <= set(h) for h in hist)
    assert trial.user_attrs["best_value"] == min(h["val_spread"] for h in hist)


def test_regression_r2_as_the_study_metric(tmp_path: Path, reg_dataset: Dataset) -> None:
    raw = config(REGRESSION, metrics=["r2", "mae"])
    raw["study"].update(metric="val_r2")
    del raw["study"]["direction"]
    trial = run_one(tmp_path, parsed(raw), reg_dataset)
    hist = trial.user_attrs["history"]
    assert trial.user_attrs["best_value"] == max(h["val_r2"] for h in hist)
    assert "val_mse" not in hist[0]


# ---------------------------------------------------------------- 2. loss


@pytest.mark.parametrize("value,key,words", [
    ("hubr", "train.loss.name", ("unknown loss", "did you mean 'huber'")),
    ("mse", "train.loss.name", ("not a classification loss",)),
    ({"name": "cross_entropy", "smoothing": 0.1}, "train.loss.smoothing",
     ("did you mean 'label_smoothing'",)),
    ({"name": "cross_entropy", "label_smoothing": 1.5}, "train.loss.label_smoothing", ("[0, 1)",)),
    ({"name": "cross_entropy", "label_smoothing": {"type": "float", "low": 0, "high": 2}},
     "train.loss.label_smoothing", ("[0, 1)",)),
    ({"name": "cross_entropy", "label_smoothing": {"type": "floats"}},
     "train.loss.label_smoothing.type", ("unknown type",)),
    ({"name": "cross_entropy", "weight": 2.0}, "train.loss.weight", ("list",)),
    ({"name": "cross_entropy", "weight": [1.0, -1.0]}, "train.loss.weight", ("non-negative",)),
    ({"label_smoothing": 0.1}, "train.loss.name", ("required",)),
    ({"name": "nosuchmodule:fn"}, "train.loss.name", ("cannot import",)),
    (3, "train.loss", ("loss name",)),
])
def test_train_loss_rejects(value: Any, key: str, words: tuple[str, ...]) -> None:
    bad(config(loss=value), key, *words)


@pytest.mark.parametrize("value,key", [
    ({"name": "huber", "delta": 0}, "train.loss.delta"),
    ({"name": "cross_entropy"}, "train.loss.name"),
    ({"name": "mse", "delta": 1.0}, "train.loss.delta"),
])
def test_regression_loss_rejects(value: Any, key: str) -> None:
    bad(config(REGRESSION, loss=value), key)


def test_class_weights_must_match_the_classes(tmp_path: Path) -> None:
    cfg = parsed(config(loss={"name": "cross_entropy", "weight": [1.0, 5.0]}))
    with pytest.raises(ConfigError) as err:
        load_dataset(cfg, "s.yaml", ResultsLayout(tmp_path / "r"))
    assert err.value.key == "train.loss.weight" and "10 outputs" in err.value.problem


def test_builtin_losses_match_torch() -> None:
    torch.manual_seed(0)
    out, y = torch.randn(32, 3), torch.randint(0, 3, (32,))
    w = [1.0, 5.0, 2.0]
    ce = build_loss("cross_entropy", {"label_smoothing": 0.1, "weight": w}, "classification")
    ref = torch.nn.functional.cross_entropy(out, y, label_smoothing=0.1,
                                            weight=torch.tensor(w))
    assert ce(out, y).item() == pytest.approx(ref.item())
    bce = build_loss("bce_with_logits", {}, "classification")
    onehot = torch.nn.functional.one_hot(y, 3).float()
    assert bce(out, y).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(out, onehot).item())
    assert bce.total(out, y).item() == pytest.approx(32 * bce(out, y).item(), rel=1e-5)
    reg_out, reg_y = torch.randn(32, 2), torch.randn(32, 2)
    for name, fn in (("mse", torch.nn.functional.mse_loss), ("l1", torch.nn.functional.l1_loss)):
        loss = build_loss(name, {}, "regression")
        assert loss(reg_out, reg_y).item() == pytest.approx(fn(reg_out, reg_y).item())
        # A split's loss (the sum over batches / n) is the same number as the batch mean.
        assert loss.total(reg_out, reg_y).item() / 32 == pytest.approx(loss(reg_out, reg_y).item())
    huber = build_loss("huber", {"delta": 0.5}, "regression")
    assert huber(reg_out, reg_y).item() == pytest.approx(
        torch.nn.functional.huber_loss(reg_out, reg_y, delta=0.5).item())


def test_searched_loss_arguments_are_optuna_params(tmp_path: Path, dataset: Dataset) -> None:
    raw = config(loss={"name": "cross_entropy", "weight": [1.0] * 10,
                       "label_smoothing": {"type": "float", "low": 0.0, "high": 0.3}})
    raw["study"]["enqueue"] = [{"architecture": "mlp", "loss.label_smoothing": 0.25}]
    cfg = parsed(raw)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"architecture": "mlp", "loss.label_smoothing": 0.25})
    trial = study.ask()
    params = sample(trial, cfg)
    assert trial.params["loss.label_smoothing"] == 0.25
    assert "loss.weight" not in trial.params  # a literal is recorded, not searched
    assert params.loss == {"weight": [1.0] * 10, "label_smoothing": 0.25}
    assert from_params(trial.params, cfg).loss == params.loss
    assert from_params(params.flat(), cfg) == params
    raw["study"]["enqueue"] = [{"architecture": "mlp", "loss.smoothing": 0.25}]
    bad(raw, "study.enqueue.0.loss.smoothing", "loss.label_smoothing")
    # The trial trains and validates with its sampled arguments.
    trainer = Trainer(cfg, params, dataset, torch.device("cpu"), seed=0)
    assert trainer.loss_fn.arguments["label_smoothing"] == 0.25


def test_user_loss_with_arguments(tmp_path: Path, user_code: Path, dataset: Dataset) -> None:
    raw = config(loss={"name": "usercode:margin_loss",
                       "scale": {"type": "float", "low": 1.0, "high": 2.0}})
    cfg = parsed(raw)
    trial = run_one(tmp_path, cfg, dataset)
    assert 1.0 <= trial.params["loss.scale"] <= 2.0
    assert parsed(cfg.as_study_dict()).train.loss == cfg.train.loss


# ---------------------------------------------------------------- 5. the built-in loop


@pytest.mark.parametrize("key,value,words", [
    ("precision", 8, ("valid: 32, bf16, 16",)),
    ("precision", "fp8", ("valid",)),
    ("grad_clip_norm", 0, ("greater than 0",)),
    ("grad_clip_norm", "big", ()),
    ("accumulate_grad_batches", 0, ("greater than or equal to 1",)),
    ("compile", "maybe", ()),
])
def test_loop_options_reject(key: str, value: Any, words: tuple[str, ...]) -> None:
    bad(config(**{key: value}), f"train.{key}", *words)


@pytest.mark.parametrize("value,key", [
    ({"name": "cosin"}, "train.lr_scheduler.name"),
    ({"name": "cosine", "warmup_epochs": -1}, "train.lr_scheduler.warmup_epochs"),
    ({"name": "cosine", "patience": 3}, "train.lr_scheduler.patience"),
    ({"name": "step", "step_size": 0}, "train.lr_scheduler.step_size"),
    ({"name": "step", "gamma": 1.5}, "train.lr_scheduler.gamma"),
    ({"name": "onecycle", "max_lr": -1}, "train.lr_scheduler.max_lr"),
    ({"name": "onecycle", "pct_start": 1.0}, "train.lr_scheduler.pct_start"),
])
def test_lr_scheduler_rejects(value: Any, key: str) -> None:
    bad(config(lr_scheduler=value), key)


def test_loop_option_defaults_and_round_trip() -> None:
    cfg = parsed(config())
    t = cfg.train
    assert (t.precision, t.grad_clip_norm, t.accumulate_grad_batches, t.compile) == \
        ("32", None, 1, False)
    assert t.lr_scheduler is not None and t.lr_scheduler.name == "plateau"
    assert parsed(config(lr_scheduler={"name": "none"})).train.lr_scheduler is None
    full = parsed(config(precision="bf16", grad_clip_norm=1.0, accumulate_grad_batches=2,
                         lr_scheduler={"name": "onecycle", "max_lr": 0.05}))
    assert full.train.precision == "bf16"
    assert parsed(full.as_study_dict()).train == full.train


def test_fp16_needs_cuda() -> None:
    raw = config(precision=16)
    raw["resources"] = {"devices": "cpu", "workers": 1}
    with pytest.raises(ConfigError) as err:
        check_strategy(parsed(raw), "s.yaml")
    assert err.value.key == "train.precision" and "bf16" in err.value.problem


@pytest.mark.parametrize("sched,expected", [
    ({"name": "step", "step_size": 1, "gamma": 0.5}, [0.005, 0.0025, 0.00125]),
    ({"name": "cosine", "warmup_epochs": 0, "min_lr": 0.001}, None),
    ({"name": "onecycle"}, None),
    ({"name": "none"}, [0.01, 0.01, 0.01]),
])
def test_schedules_run(tmp_path: Path, dataset: Dataset, sched: dict[str, Any],
                       expected: list[float] | None) -> None:
    trial = run_one(tmp_path, parsed(config(lr_scheduler=sched)), dataset)
    lrs = [h["lr"] for h in trial.user_attrs["history"]]
    if expected is not None:
        # The recorded lr is the one of the epoch's training (before its epoch-end step).
        assert lrs == pytest.approx([0.01, *expected[:2]] if sched["name"] == "step"
                                    else expected)
    elif sched["name"] == "cosine":
        assert lrs[0] > lrs[1] > lrs[2] == pytest.approx(0.001)
    else:
        assert lrs[2] < lrs[0] < 0.01


def test_accumulation_steps_once_per_group_and_at_the_epoch_end(dataset: Dataset) -> None:
    cfg = parsed(config(accumulate_grad_batches=3, lr_scheduler={"name": "cosine"}))
    params = from_params({"architecture": "mlp"}, cfg)
    trainer = Trainer(cfg, params, dataset, torch.device("cpu"), seed=0)
    steps: list[int] = []
    real = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(1), real(*a, **k))[1]  # type: ignore
    trainer.train_epoch()
    batches = trainer.batches_per_epoch
    assert len(steps) == -(-batches // 3) and batches % 3 != 0
    assert trainer.schedule is not None
    assert trainer.schedule.scheduler.last_epoch == len(steps)


def _straight_and_resumed(tmp_path: Path, cfg: Any, ds: Dataset, stop_after: int
                          ) -> tuple[list[dict], list[dict], optuna.Trial]:
    straight = run_one(tmp_path / "straight", cfg, ds)
    epochs: list[int] = []
    env = trial_env(tmp_path / "resumed", cfg, ds, should_stop=lambda: len(epochs) >= stop_after,
                    on_epoch=lambda n, e, rec: epochs.append(e))
    study = optuna.create_study(direction=cfg.study.direction)
    first = study.ask()
    with pytest.raises(Interrupted):
        run_trial(first, sample(first, cfg), env)
    fail_trial(study, frozen(first), "interrupted", retry=True)
    env.should_stop = lambda: False
    retry = study.ask()
    run_trial(retry, sample(retry, cfg), env)

    def strip(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    return (strip(straight.user_attrs["history"]), strip(retry.user_attrs["history"]), retry)


def test_resume_continues_cosine_warmup_bf16_exactly(tmp_path: Path, dataset: Dataset) -> None:
    raw = config(precision="bf16", grad_clip_norm=0.5, accumulate_grad_batches=2,
                 lr_scheduler={"name": "cosine", "warmup_epochs": 1, "min_lr": 1e-4})
    raw["train"]["max_epochs"] = 4
    raw["checkpoint"].update(resume_min_seconds=0)
    cfg = parsed(raw)
    straight, resumed, retry = _straight_and_resumed(tmp_path, cfg, dataset, stop_after=1)
    assert retry.user_attrs["resumed_from"]["epoch"] == 2  # a stop is seen an epoch later
    assert len(resumed) == len(straight) == 4
    assert [h["lr"] for h in resumed] == [h["lr"] for h in straight]
    assert resumed == straight  # every metric, bit for bit


def test_compile_trains_the_plain_modules_weights(tmp_path: Path, dataset: Dataset,
                                                  monkeypatch) -> None:
    # torch.compile itself is exercised on CUDA (test_gpu.py); here: what the loop does with it.
    compiled: list[torch.nn.Module] = []

    def fake_compile(model: torch.nn.Module) -> torch.nn.Module:
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    trial = run_one(tmp_path, parsed(config(compile=True)), dataset)
    assert len(compiled) == 1 and trial.user_attrs["checkpoint"]


@pytest.mark.slow
def test_compile_on_cpu(tmp_path: Path, dataset: Dataset) -> None:
    raw = config(compile=True)
    raw["train"]["max_epochs"] = 1
    trial = run_one(tmp_path, parsed(raw), dataset)
    ckpt = torch.load(tmp_path / trial.user_attrs["checkpoint"], weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ckpt["model_state_dict"])


# ---------------------------------------------------------------- 6. logging and callbacks


@pytest.mark.parametrize("section,value,key", [
    ("logging", {"tensorboard": "sometimes"}, "logging.tensorboard"),
    ("logging", {"tensorbord": True}, "logging.tensorbord"),
    ("callbacks", ["nosuchmodule:fn"], "callbacks.0"),
    ("callbacks", ["no_colon"], "callbacks.0"),
    ("callbacks", "usercode:record", "callbacks"),
])
def test_logging_and_callbacks_reject(section: str, value: Any, key: str) -> None:
    raw = config()
    raw[section] = value
    bad(raw, key)


def test_callbacks_get_epoch_and_trial_end_events(tmp_path: Path, user_code: Path,
                                                  dataset: Dataset) -> None:
    raw = config()
    raw["callbacks"] = ["usercode:keep"]
    trial = run_one(tmp_path, parsed(raw), dataset)
    import usercode

    events: list[TrialEvent] = usercode.EVENTS
    assert [e.kind for e in events] == ["epoch"] * 3 + ["trial_end"]
    assert [e.epoch for e in events] == [0, 1, 2, 2]
    end = events[-1]
    assert end.state == "COMPLETE" and end.value == trial.user_attrs["best_value"]
    assert end.params["architecture"] == "mlp" and "lr" in end.params
    assert events[0].value == events[0].metrics["val_acc"]


def test_a_failing_callback_fails_the_trial_naming_it(tmp_path: Path, user_code: Path,
                                                      dataset: Dataset) -> None:
    raw = config()
    raw["callbacks"] = ["usercode:keep", "usercode:explode"]
    cfg = parsed(raw)
    trial = optuna.create_study(direction="maximize").ask()
    with pytest.raises(CallbackError, match="usercode:explode failed on epoch.*server is down"):
        run_trial(trial, sample(trial, cfg), trial_env(tmp_path, cfg, dataset))
    import usercode

    assert [(e.kind, e.state) for e in usercode.EVENTS][-1] == ("trial_end", "FAIL")


@pytest.mark.slow
def test_tensorboard_and_callbacks_in_a_real_run(tmp_path: Path, user_code: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = config(metrics=["acc", "f1"])
    raw["study"].update(n_trials=2, sampler={"name": "random", "seed": 0})
    raw["train"]["max_epochs"] = 2
    raw["resources"] = {"devices": "cpu", "workers": 1, "torch_threads": 1}
    raw["logging"] = {"tensorboard": True}
    raw["callbacks"] = ["usercode:record"]
    study_file = write_study(tmp_path, raw)
    events_file = tmp_path / "events.jsonl"
    env = {**__import__("os").environ, "EVENTS_FILE": str(events_file),
           "PYTHONPATH": str(user_code)}
    out = subprocess.run([sys.executable, "-m", "hpsearch.run", study_file.name,
                          "--results-dir", "res"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    results = tmp_path / "res" / "tiny"
    assert f"tensorboard --logdir {results.relative_to(tmp_path) / 'trials'}" in out.stdout
    for trial in open_results(results).trials:
        acc = EventAccumulator(str(ResultsLayout(results).tensorboard(trial.number)))
        acc.Reload()
        assert {"train_loss", "val_loss", "val_acc", "val_f1", "lr"} <= set(acc.Tags()["scalars"])
        values = [e.value for e in acc.Scalars("val_f1")]
        history = trial.user_attrs["history"]
        assert [e.step for e in acc.Scalars("val_f1")] == [0, 1]
        assert values == pytest.approx([h["val_f1"] for h in history])
    lines = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [(e["trial"], e["kind"]) for e in lines] == \
        [(0, "epoch"), (0, "epoch"), (0, "trial_end"), (1, "epoch"), (1, "epoch"),
         (1, "trial_end")]
    assert all(e["state"] == "COMPLETE" for e in lines if e["kind"] == "trial_end")
    assert "val_f1" in lines[0]["metrics"]


def test_trial_params_flat_names_loss_arguments() -> None:
    p = TrialParams("mlp", {"hidden": 8}, {"lr": 0.1}, {"delta": 0.5})
    assert p.flat() == {"architecture": "mlp", "hidden": 8, "lr": 0.1, "loss.delta": 0.5}
