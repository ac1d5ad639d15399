"""The user's training step (``train.step``) on batches of any structure, from a data factory
that returns torch Datasets and their collate function (issue 11, item 3)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from sklearn.metrics import f1_score
from studyfiles import TINY, open_results, user_module, write_study

from hpsearch.checkpoint.loading import load_model
from hpsearch.config import parse_config
from hpsearch.data import Dataset, DeviceBatches, batch_to, build, samples_in
from hpsearch.errors import ConfigError, Interrupted
from hpsearch.optuna_private import frozen
from hpsearch.results import ResultsLayout
from hpsearch.run.runner import load_dataset
from hpsearch.space import from_params, sample
from hpsearch.step import Step
from hpsearch.storage.trials import fail_trial
from hpsearch.train import Trainer, TrialEnv, run_trial, train_and_test

# User code the study files name, written into each test's folder (on sys.path).
USER_CODE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import Dataset


    class Rows(Dataset):
        # Each item is a dict; the collate function nests the inputs.
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"features": self.x[i], "flag": self.x[i, :2], "label": self.y[i]}


    def collate(items):
        return {"inputs": {"features": torch.stack([i["features"] for i in items]),
                           "flag": torch.stack([i["flag"] for i in items])},
                "label": torch.stack([i["label"] for i in items])}


    def rows(n=480, collate_fn=True, extra=None):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 10, generator=g)
        y = ((x[:, 0] + x[:, 1] * x[:, 2] > 0.8).long() + (x[:, 3] > 1.2).long()).clamp(max=2)
        cut = (n * 3 // 5, n * 4 // 5)
        out = {"train": Rows(x[:cut[0]], y[:cut[0]]),
               "val": Rows(x[cut[0]:cut[1]], y[cut[0]:cut[1]]),
               "test": Rows(x[cut[1]:], y[cut[1]:]), "task": "classification",
               "input_shape": [10], "output_size": 3}
        if collate_fn:
            out["collate_fn"] = collate
        if extra:
            out.update(extra)
        return out


    def rows_bad_collate():
        return rows(extra={"collate_fn": "stack"})


    def rows_typo():
        return rows(collate_fn=False, extra={"collate": collate})


    def rows_plain():
        return rows(collate_fn=False)


    class DictModel(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 3))
            self.flag = nn.Linear(2, 3)

        def forward(self, inputs):
            return self.body(inputs["features"]) + self.flag(inputs["flag"])


    def dict_model(input_shape, output_size, hidden=8):
        return DictModel(hidden)


    def dict_step(model, batch):
        return {"outputs": model(batch["inputs"]), "targets": batch["label"]}


    def dict_step_own_loss(model, batch):
        out = model(batch["inputs"])
        return {"loss": F.cross_entropy(out, batch["label"]), "outputs": out,
                "targets": batch["label"]}


    def pair_step(model, batch):
        x, y = batch
        return {"outputs": model(x), "targets": y}


    def pair_step_own_loss(model, batch):
        x, y = batch
        out = model(x)
        return {"loss": F.cross_entropy(out, y), "outputs": out, "targets": y}


    SEEN = []


    def recording_step(model, batch):
        SEEN.append(model)
        return pair_step(model, batch)


    # Steps that return something wrong.
    def returns_string(model, batch):
        return "loss"


    def returns_vector(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")


    def returns_typo(model, batch):
        x, y = batch
        return {"output": model(x), "targets": y}


    def returns_outputs_only(model, batch):
        x, y = batch
        return {"outputs": model(x)}


    def returns_list_targets(model, batch):
        x, y = batch
        return {"outputs": model(x), "targets": y.tolist()}


    def returns_detached(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y).detach()


    def returns_short_targets(model, batch):
        x, y = batch
        return {"outputs": model(x), "targets": y[:1]}


    def loss_only(model, batch):
        # Trains, but validation has nothing to compute the metrics from.
        x, y = batch
        return F.cross_entropy(model(x), y)


    DEVICES = []


    def device_step(model, batch):
        DEVICES.append(batch["label"].device.type)
        return dict_step(model, batch)


    NOT_CALLABLE = 3
    """
)


@pytest.fixture()
def user_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    yield from user_module(tmp_path, monkeypatch, "stepcode", USER_CODE)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return build(parse_config(copy.deepcopy(TINY), "s.yaml").data)


def config(**train: Any) -> dict[str, Any]:
    """TINY with one MLP, three epochs, no early stopping, plus ``train`` keys."""
    raw = copy.deepcopy(TINY)
    raw["model"]["architecture"] = {"mlp": {"hidden": 16}}
    raw["train"].update({"max_epochs": 3, "lr": 0.01, "early_stopping": None, **train})
    return raw


def dict_config(**train: Any) -> dict[str, Any]:
    """Dict batches from Datasets + collate, a model whose forward takes a dict, a step."""
    raw = config(**{"step": "stepcode:dict_step", "metrics": ["f1", "acc"], "batch_size": 32,
                    **train})
    raw["data"] = {"name": "stepcode:rows"}
    raw["model"]["architecture"] = {"dictnet": {"factory": "stepcode:dict_model", "hidden": 8}}
    raw["study"].update(metric="val_f1")
    return raw


def parsed(raw: dict[str, Any]) -> Any:
    return parse_config(raw, "s.yaml")


def trial_env(tmp_path: Path, cfg: Any, ds: Dataset, **kw: Any) -> TrialEnv:
    return TrialEnv(config=cfg, dataset=ds, device=torch.device("cpu"),
                    layout=ResultsLayout(tmp_path), worker="test", log=lambda s: None, **kw)


def run_one(tmp_path: Path, cfg: Any, ds: Dataset, **kw: Any) -> optuna.Trial:
    trial = optuna.create_study(direction=cfg.study.direction).ask()
    run_trial(trial, sample(trial, cfg), trial_env(tmp_path, cfg, ds, **kw))
    return trial


def history(trial: optuna.Trial) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in trial.user_attrs["history"]]


# ---------------------------------------------------------------- the key


@pytest.mark.parametrize("value,words", [
    ("nosuchmodule:step", ("cannot import 'nosuchmodule'",)),
    ("no_colon", ("package.module:function",)),
    ("stepcode:NOT_CALLABLE", ("no callable 'NOT_CALLABLE'",)),
    ("stepcode:missing", ("no callable 'missing'",)),
    (3, ("string",)),
])
def test_train_step_rejects(user_code: Path, value: Any, words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        parsed(config(step=value))
    assert err.value.key == "train.step" and err.value.exit_code == 2, str(err.value)
    for word in words:
        assert word in err.value.problem, str(err.value)


def test_train_step_default_and_round_trip(user_code: Path) -> None:
    assert parsed(config()).train.step is None
    cfg = parsed(dict_config())
    assert cfg.train.step == "stepcode:dict_step"
    assert parsed(cfg.as_study_dict()).train == cfg.train


def test_a_bad_step_stops_the_run_with_exit_2_naming_the_key(tmp_path: Path) -> None:
    study = write_study(tmp_path, config(step="nosuchmodule:step"))
    out = subprocess.run([sys.executable, "-m", "hpsearch.run", study.name, "--results-dir",
                          "res"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "study.yaml" in lines[0] and "train.step" in lines[0], lines
    assert not (tmp_path / "res").exists()


# ---------------------------------------------------------------- the data contract


@pytest.mark.parametrize("factory,words", [
    ("stepcode:rows_typo", ("unknown key(s) ['collate']", "collate_fn")),
    ("stepcode:rows_bad_collate", ("'collate_fn' must be a function",)),
])
def test_a_bad_streaming_factory_is_a_data_error(tmp_path: Path, user_code: Path, factory: str,
                                                 words: tuple[str, ...]) -> None:
    raw = dict_config()
    raw["data"] = {"name": factory}
    cfg = parsed(raw)
    with pytest.raises(ConfigError) as err:
        load_dataset(cfg, "s.yaml", ResultsLayout(tmp_path / "res"))
    assert err.value.key == "data", str(err.value)
    for word in words:
        assert word in err.value.problem, str(err.value)


def test_dict_batches_without_a_step_say_to_set_one(tmp_path: Path, user_code: Path) -> None:
    raw = dict_config()
    del raw["train"]["step"]
    cfg = parsed(raw)
    with pytest.raises(TypeError, match=r"\(inputs, targets\) batches; this data gives a dict "
                       r"with keys \['inputs', 'label'\]: set train.step"):
        run_one(tmp_path, cfg, build(cfg.data))


def test_batch_to_and_samples_in_walk_any_structure() -> None:
    Pair = namedtuple("Pair", "x y")

    class Box:
        def __init__(self) -> None:
            self.moved_to: torch.device | None = None

        def to(self, device: torch.device) -> Box:
            self.moved_to = device
            return self

    box = Box()
    batch = {"a": [torch.zeros(5, 2), ("text", 3)], "b": Pair(torch.ones(5), torch.ones(5)),
             "c": box}
    moved = batch_to(batch, torch.device("cpu"))
    assert isinstance(moved["b"], Pair) and moved["a"][1] == ("text", 3)
    assert box.moved_to == torch.device("cpu")
    assert samples_in(batch) == 5 and samples_in([torch.tensor(1.0)]) == 1
    with pytest.raises(TypeError, match="without tensors"):
        samples_in({"a": "b"})


# ---------------------------------------------------------------- training and validation


@pytest.mark.parametrize("options", [
    {},
    {"precision": "bf16", "accumulate_grad_batches": 3, "grad_clip_norm": 0.5,
     "lr_scheduler": {"name": "cosine", "warmup_epochs": 1}},
])
def test_a_step_that_does_what_the_builtin_loop_does_trains_bit_identically(
        tmp_path: Path, user_code: Path, dataset: Dataset, options: dict[str, Any]) -> None:
    builtin = run_one(tmp_path / "builtin", parsed(config(**options)), dataset)
    stepped = run_one(tmp_path / "step", parsed(config(step="stepcode:pair_step", **options)),
                      dataset)
    assert history(stepped) == history(builtin)  # every metric, bit for bit
    # A step with its own loss: val_loss is its batch mean times the batch, summed.
    own = run_one(tmp_path / "own", parsed(config(step="stepcode:pair_step_own_loss",
                                                  **options)), dataset)
    for got, want in zip(history(own), history(builtin)):
        assert got == pytest.approx(want, rel=1e-4)


def test_dict_batches_train_and_validate_over_the_whole_split(tmp_path: Path,
                                                              user_code: Path) -> None:
    cfg = parsed(dict_config(precision="bf16", accumulate_grad_batches=2))
    ds = build(cfg.data)
    trial = run_one(tmp_path, cfg, ds)
    hist = trial.user_attrs["history"]
    assert all({"train_loss", "val_loss", "val_f1", "val_acc"} <= set(h) for h in hist)
    best = hist[trial.user_attrs["best_epoch"]]
    # The kept checkpoint, rebuilt by its factory, scored by hand over the whole split.
    model = load_model(tmp_path / trial.user_attrs["checkpoint"])
    import stepcode

    val = stepcode.collate([ds.streams["val"][i] for i in range(len(ds.streams["val"]))])
    with torch.no_grad():
        out = model(val["inputs"])
    y = val["label"]
    assert best["val_f1"] == pytest.approx(f1_score(y, out.argmax(1), average="macro"), abs=1e-6)
    assert best["val_loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(out, y)), rel=1e-5)
    assert best["val_acc"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    # A step returning its own (same) loss gives the same validation numbers.
    own = run_one(tmp_path / "own", parsed(dict_config(step="stepcode:dict_step_own_loss",
                                                       precision="bf16",
                                                       accumulate_grad_batches=2)), ds)
    for got, want in zip(own.user_attrs["history"], hist):
        assert {k: v for k, v in got.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in want.items() if k != "seconds"}, rel=1e-4)


def test_train_and_test_scores_the_test_split_through_the_step(tmp_path: Path,
                                                               user_code: Path) -> None:
    # The report's seed retrain: the same seed retrains the trial; its test scores are the
    # kept checkpoint's, computed through the step over the whole test split.
    cfg = parsed(dict_config())
    ds = build(cfg.data)
    trial = run_one(tmp_path, cfg, ds)
    params = from_params({"architecture": "dictnet"}, cfg)
    scores = train_and_test(cfg, params, ds, torch.device("cpu"), seed=cfg.train.seed)
    assert set(scores) == {"test_loss", "test_f1", "test_acc"}
    import stepcode

    test = stepcode.collate([ds.streams["test"][i] for i in range(len(ds.streams["test"]))])
    model = load_model(tmp_path / trial.user_attrs["checkpoint"])
    with torch.no_grad():
        pred = model(test["inputs"]).argmax(1)
    assert scores["test_f1"] == pytest.approx(f1_score(test["label"], pred, average="macro"),
                                              abs=1e-6)


def test_the_step_gets_the_compiled_model(tmp_path: Path, user_code: Path, dataset: Dataset,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    class Compiled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    monkeypatch.setattr(torch, "compile", Compiled)
    trial = run_one(tmp_path, parsed(config(step="stepcode:recording_step", compile=True)),
                    dataset)
    import stepcode

    assert stepcode.SEEN and all(isinstance(m, Compiled) for m in stepcode.SEEN)
    ckpt = torch.load(tmp_path / trial.user_attrs["checkpoint"], weights_only=True)
    assert not any(k.startswith("inner.") for k in ckpt["model_state_dict"])


def test_without_a_step_the_builtin_loop_never_reaches_the_hook(
        tmp_path: Path, dataset: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    def unused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the step path ran without train.step")

    monkeypatch.setattr(DeviceBatches, "batches", unused)
    monkeypatch.setattr(Trainer, "_step_loss", unused)
    monkeypatch.setattr(Step, "__init__", unused)
    trial = run_one(tmp_path, parsed(config()), dataset)
    assert len(trial.user_attrs["history"]) == 3


def test_resume_with_a_step_continues_exactly(tmp_path: Path, user_code: Path) -> None:
    raw = dict_config(precision="bf16", accumulate_grad_batches=2,
                      lr_scheduler={"name": "cosine", "warmup_epochs": 1})
    raw["train"]["max_epochs"] = 4
    raw["checkpoint"].update(resume_min_seconds=0)
    cfg = parsed(raw)
    ds = build(cfg.data)
    straight = run_one(tmp_path / "straight", cfg, ds)
    epochs: list[int] = []
    env = trial_env(tmp_path / "resumed", cfg, ds, should_stop=lambda: len(epochs) >= 1,
                    on_epoch=lambda n, e, rec: epochs.append(e))
    study = optuna.create_study(direction=cfg.study.direction)
    first = study.ask()
    with pytest.raises(Interrupted):
        run_trial(first, sample(first, cfg), env)
    fail_trial(study, frozen(first), "interrupted", retry=True)
    env.should_stop = lambda: False
    retry = study.ask()
    run_trial(retry, sample(retry, cfg), env)
    assert retry.user_attrs["resumed_from"]["epoch"] >= 1
    assert history(retry) == history(straight)


# ---------------------------------------------------------------- wrong return values


@pytest.mark.parametrize("step,words", [
    ("returns_string", "returned a str; expected the batch's mean loss as a 0-dim tensor, or "
                       "a dict with 'outputs' and 'targets'"),
    ("returns_vector", "returned a tensor of shape (64,); expected the batch's mean loss"),
    ("returns_typo", "returned a dict with the key(s) ['output'] (did you mean 'outputs'?)"),
    ("returns_outputs_only", "returned 'outputs' without 'targets'"),
    ("returns_list_targets", "returned 'targets' as a list"),
    ("returns_detached", "returned a loss that does not require grad"),
    ("returns_short_targets", "returned 'outputs' of shape (64, 10) and 'targets' of shape (1,)"
                              "; expected one row per sample in both"),
    ("loss_only", "returned only a loss; expected a dict with 'outputs' and 'targets' in "
                  "validation"),
])
def test_a_step_returning_something_wrong_fails_the_trial_saying_what(
        tmp_path: Path, user_code: Path, dataset: Dataset, step: str, words: str) -> None:
    cfg = parsed(config(step=f"stepcode:{step}"))
    with pytest.raises(TypeError) as err:
        run_one(tmp_path, cfg, dataset)
    assert f"train.step 'stepcode:{step}' {words}" in str(err.value)


@pytest.mark.slow
def test_a_wrong_step_in_a_real_run_fails_its_trials_with_the_reason(tmp_path: Path,
                                                                      user_code: Path) -> None:
    raw = config(step="stepcode:returns_vector")
    raw["study"].update(n_trials=1)
    raw["resources"] = {"devices": "cpu", "workers": 1, "torch_threads": 1}
    study_file = write_study(tmp_path, raw)
    out = subprocess.run([sys.executable, "-m", "hpsearch.run", study_file.name, "--results-dir",
                          "res"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(user_code)})
    assert "0 complete, 0 pruned, 1 failed" in out.stdout, out.stdout + out.stderr
    (trial,) = open_results(tmp_path / "res" / "tiny").trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "train.step 'stepcode:returns_vector' returned a tensor of shape (64,)" in \
        trial.user_attrs["fail_reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dict_batches_on_cuda_with_fp16_and_a_grad_scaler(tmp_path: Path, user_code: Path) -> None:
    # Streamed dict batches are pinned, moved to the GPU whole, and trained under float16
    # autocast with a GradScaler, accumulation and clipping.
    cfg = parsed(dict_config(step="stepcode:device_step", precision="16",
                             accumulate_grad_batches=2, grad_clip_norm=1.0))
    ds = build(cfg.data)
    trial = optuna.create_study(direction="maximize").ask()
    env = TrialEnv(config=cfg, dataset=ds, device=torch.device("cuda:0"),
                   layout=ResultsLayout(tmp_path), worker="gpu", log=lambda s: None)
    run_trial(trial, sample(trial, cfg), env)
    import stepcode

    assert set(stepcode.DEVICES) == {"cuda"}
    hist = trial.user_attrs["history"]
    assert len(hist) == 3 and all(0 <= h["val_f1"] <= 1 for h in hist)
