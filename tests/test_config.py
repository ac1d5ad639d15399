"""Study files: every shipped one validates; bad ones exit 2 with one message naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from studyfiles import TINY, write_study

from hpsearch.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_shipped_study_validates(path: Path) -> None:
    config = load_config(path)
    assert config.study.name
    assert config.checkpoint.monitor is not None and config.checkpoint.mode in ("min", "max")


def test_example_study_defaults() -> None:
    config = load_config(ROOT / "studies" / "mnist1d.yaml")
    assert config.checkpoint.monitor == "val_acc" and config.checkpoint.mode == "max"
    assert set(config.model.architecture) == {"linear", "mlp", "cnn1d", "gru"}
    assert config.study.n_trials == 40 and config.report.seeds == 3


def _mutate(path: str, value: object) -> dict:
    raw = copy.deepcopy(TINY)
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return raw


BAD = [
    # (mutation path, new value, key the message must name, words it must contain)
    ("study.n_trail", 3, "study.n_trail", "did you mean 'n_trials'"),
    ("study.n_trials", "many", "study.n_trials", "integer"),
    ("study.n_trials", 0, "study.n_trials", "greater than"),
    ("study.name", KeyError, "study.name", "missing"),
    ("study.direction", "up", "study.direction", "maximize"),
    ("study.sampler", {"name": "tpee"}, "study.sampler.name", "did you mean 'tpe'"),
    ("study.pruner", {"name": "hyperbad"}, "study.pruner.name", "hyperband"),
    ("study.metric", "val_accuracy", "study.metric", "available"),
    ("data.name", "mnist", "data.name", "did you mean 'mnist1d'"),
    ("data.val_fraction", 1.5, "data.val_fraction", "less than"),
    ("model.architecture.mlp.hidden", {"type": "int", "low": 64, "high": 16},
     "model.architecture.mlp.hidden", "greater than high"),
    ("model.architecture.cnn1d.kernel_size", {"type": "categorical", "choices": []},
     "model.architecture.cnn1d.kernel_size.choices", "empty"),
    ("model.architecture.transformer", {}, "model.architecture.transformer",
     "unknown architecture"),
    ("model.architecture.foo", {"factory": "no_such_module_xyz:make"},
     "model.architecture.foo.factory", "cannot import"),
    ("model.architecture.mlp.hidden", {"type": "integer", "low": 1, "high": 2},
     "model.architecture.mlp.hidden.type", "did you mean 'int'"),
    ("train.lr", {"type": "float", "low": -1, "high": 1, "log": True}, "train.lr", "log"),
    ("train.optimizer", "adamax", "train.optimizer", "adam"),
    ("train.batch_size", 0, "train.batch_size", "invalid"),
    ("train.max_epoch", 3, "train.max_epoch", "did you mean 'max_epochs'"),
    ("checkpoint.save", "always", "checkpoint.save", "best"),
    ("checkpoint.filename", "{nope}.pt", "checkpoint.filename", "template"),
    ("resources.devices", ["gpu0"], "resources.devices", "cuda:N"),
    ("study.enqueue", [{"architecture": "mlp", "width": 3}], "study.enqueue.0.width",
     "unknown parameter"),
    ("model.init_from", "/nonexistent/ckpt.pt", "model.init_from", "neither"),
]


@pytest.mark.parametrize("path,value,key,words", BAD, ids=[b[0] + "-" + str(i)
                                                           for i, b in enumerate(BAD)])
def test_bad_study_names_the_key(path: str, value: object, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_mutate(path, value), "bad.yaml")
    message = str(info.value)
    assert message.startswith(f"bad.yaml: {key}:"), message
    assert words.lower() in message.lower(), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text,words",
    [
        ("", "empty"),
        ("- a\n- b\n", "mapping"),
        ("study: {name: x\n", "YAML syntax error at line"),
        ("study:\n  name: x\n\tmetric: val_loss\n", "YAML syntax error"),
    ],
)
def test_unreadable_files(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_architectures_may_share_a_parameter_name_of_another_kind() -> None:
    # Each architecture's parameters are their own Optuna parameters (linear.hidden is not
    # mlp.hidden), so the same name may hold another kind of distribution.
    raw = copy.deepcopy(TINY)
    raw["model"]["architecture"]["linear"] = {"hidden": {"type": "float", "low": 1, "high": 2}}
    config = parse_config(raw, "s.yaml")
    assert config.model.architecture["linear"].params["hidden"].type == "float"
    assert config.model.architecture["mlp"].params["hidden"].type == "int"


def test_cli_bad_file_exits_2_without_touching_results(tmp_path: Path) -> None:
    raw = _mutate("train.lr", {"type": "float", "low": 1, "high": 0.1})
    study = write_study(tmp_path, raw)
    out = subprocess.run(
        [sys.executable, "-m", "hpsearch.run", str(study), "--results-dir", "res"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lr" in lines[0] and str(study) in lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "res").exists()


def test_cli_bad_flag_exits_2(tmp_path: Path) -> None:
    study = write_study(tmp_path, TINY)
    out = subprocess.run(
        [sys.executable, "-m", "hpsearch.run", str(study), "--n-trials", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "study.n_trials" in out.stderr and "command-line" in out.stderr
    assert not (tmp_path / "results").exists()


def test_round_trip_through_checkpoint_shape() -> None:
    config = parse_config(copy.deepcopy(TINY), "s.yaml")
    again = parse_config(yaml.safe_load(yaml.safe_dump(config.as_study_dict())), "again")
    assert again == config
