"""The conditional search space: each architecture's parameters appear only with it."""

from __future__ import annotations

import copy

import optuna
import pytest
from studyfiles import TINY

from hpsearch.config import parse_config
from hpsearch.space import from_params, sample, to_optuna_names


def _config(**study):
    raw = copy.deepcopy(TINY)
    raw["study"].update(study)
    return parse_config(raw, "s.yaml")


def test_conditional_parameters_follow_the_architecture() -> None:
    config = _config()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    own = {name: set(spec.params) for name, spec in config.model.architecture.items()}
    seen = set()
    for _ in range(40):
        trial = study.ask()
        params = sample(trial, config)
        study.tell(trial, 0.0)
        seen.add(params.architecture)
        assert set(params.model) == own[params.architecture]
        searched = set(trial.params) - {"architecture", "lr"}
        # An architecture's own parameters are qualified by it in Optuna: "cnn1d.depth".
        assert searched == {f"{params.architecture}.{key}" for key in own[params.architecture]}
        assert params.train["batch_size"] == 64 and params.train["optimizer"] == "adam"
        assert 1e-3 <= params.train["lr"] <= 1e-2
    assert seen == set(own)


def test_cnn1d_values_stay_in_range() -> None:
    config = _config()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    for _ in range(60):
        trial = study.ask()
        params = sample(trial, config)
        study.tell(trial, 0.0)
        if params.architecture == "cnn1d":
            assert params.model["kernel_size"] in (3, 5)
            assert 4 <= params.model["channels"] <= 8 and 2 <= params.model["depth"] <= 3
        if params.architecture == "mlp":
            assert 16 <= params.model["hidden"] <= 64


def test_enqueued_parameters_are_used_first() -> None:
    fixed = {"architecture": "cnn1d", "channels": 6, "kernel_size": 5, "depth": 2, "lr": 0.005}
    config = _config(enqueue=[fixed])
    study = optuna.create_study()
    for p in config.study.enqueue:
        study.enqueue_trial(to_optuna_names(p, config))
    trial = study.ask()
    params = sample(trial, config)
    assert params.flat() | fixed == params.flat()


def test_from_params_round_trip() -> None:
    config = _config()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    trial = study.ask()
    params = sample(trial, config)
    assert from_params(trial.params, config) == params


def test_from_params_rejects_missing_values() -> None:
    config = _config()
    with pytest.raises(ValueError):
        from_params({"architecture": "mlp"}, config)


def test_architectures_sharing_a_name_get_distinct_optuna_parameters() -> None:
    # mlp and gru both call their width "hidden"; TPE must model each on its own values.
    raw = copy.deepcopy(TINY)
    raw["model"]["architecture"] = {
        "mlp": {"hidden": {"type": "int", "low": 16, "high": 64}},
        "gru": {"hidden": {"type": "int", "low": 4, "high": 8}},
    }
    config = parse_config(raw, "s.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=4))
    names = set()
    for _ in range(20):
        trial = study.ask()
        params = sample(trial, config)
        study.tell(trial, 0.0)
        names |= set(trial.params)
        # The factory still receives the bare name.
        assert set(params.model) == {"hidden"}
    assert {"mlp.hidden", "gru.hidden"} <= names and "hidden" not in names


def test_bare_names_of_an_older_study_still_read_back() -> None:
    config = _config()
    old = {"architecture": "mlp", "hidden": 32, "lr": 0.005}
    new = {"architecture": "mlp", "mlp.hidden": 32, "lr": 0.005}
    assert from_params(old, config) == from_params(new, config)
    assert from_params(old, config).model == {"hidden": 32}
