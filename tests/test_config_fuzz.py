"""Fuzzing the study-file loader: whatever the file says, the answer is a config or one message.

Valid study files are mutated at random paths (keys deleted, types changed, unknown keys added,
low/high swapped, random values planted) and their YAML text is corrupted. Each result must be
a valid :class:`StudyConfig` or a :class:`ConfigError` whose one-line message names the file
and a key of it, never a traceback. ``python -m hpsearch.run`` on a bad file exits 2 with one
line on stderr and leaves the results folder untouched.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpsearch.config import ConfigError, StudyConfig, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
SOURCE = "fuzz.yaml"

TINY = """
study:
  name: tiny
  metric: val_acc
  direction: maximize
  n_trials: 6
  sampler: {name: tpe, seed: 0}
  pruner: {name: hyperband, min_resource: 1, reduction_factor: 3}
data:
  name: mnist1d
  args: {num_samples: 600}
model:
  architecture:
    linear: {}
    mlp:
      hidden: {type: int, low: 16, high: 64, log: true}
    cnn1d:
      channels: {type: int, low: 4, high: 8}
      kernel_size: {type: categorical, choices: [3, 5]}
      depth: {type: int, low: 2, high: 3}
train:
  max_epochs: 4
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
  batch_size: 64
checkpoint:
  keep_top_k_trials: 2
report: {enabled: false}
"""

RICH = """
study:
  name: rich
  metric: val_mse
  direction: minimize
  n_trials: 12
  timeout: 600
  sampler: {name: random, seed: 3}
  pruner: {name: percentile, percentile: 25.0, n_startup_trials: 2}
  enqueue:
    - {architecture: mlp, hidden: 32, lr: 0.01, optimizer: sgd}
    - {architecture: gru, hidden: 16}
  max_retries: 1
  max_initial_failures: 3
  heartbeat_interval: 0.5
  grace_period: 3
data:
  name: synthetic_regression
  args: {n_samples: 500, noise: 0.2}
  val_fraction: 0.25
  test_fraction: 0.1
  split_seed: 7
  in_memory: auto
model:
  architecture:
    mlp:
      hidden: {type: int, low: 8, high: 64, step: 8}
      depth: 2
      dropout: {type: float, low: 0.0, high: 0.5, step: 0.1}
    gru:
      hidden: {type: int, low: 8, high: 64, step: 8}
      layers: {type: categorical, choices: [1, 2]}
train:
  max_epochs: 6
  optimizer: {type: categorical, choices: [adam, sgd]}
  lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
  weight_decay: 0.0001
  momentum: {type: float, low: 0.5, high: 0.95}
  batch_size: {type: int, low: 16, high: 64, log: true}
  lr_scheduler: {name: plateau, patience: 2, factor: 0.5, min_lr: 1.0e-6}
  early_stopping: {patience: 3, min_delta: 0.001}
  seed: 11
  on_nonfinite: prune
checkpoint:
  monitor: val_mae
  mode: min
  save: best_and_every_n
  every_n_epochs: 2
  keep_top_k: 2
  keep_top_k_trials: 3
  filename: "t{trial}-e{epoch:03d}-{monitor}{value:.3f}.pt"
  resume_every_n_epochs: 1
resources: {devices: [cpu], trials_per_device: 1, workers: 2, torch_threads: 1}
report: {enabled: true, seeds: 2, top_n: 3}
artifacts: {store: none}
"""


def base_documents() -> list[tuple[str, str]]:
    docs = [("tiny", TINY), ("rich", RICH)]
    for path in sorted((REPO / "studies").glob("*.yaml")):
        docs.append((path.name, path.read_text()))
    return docs


BASES = base_documents()


def test_base_documents_are_valid() -> None:
    for name, text in BASES:
        assert isinstance(parse_config(yaml.safe_load(text), name), StudyConfig), name


# ---------------------------------------------------------------- strategies

# Strings that reach every validator: names, templates (good and broken), factories (only
# modules that exist and are harmless to import), devices, distribution types.
SPECIAL_STRINGS = [
    "", " ", "x", " tpe", "tpe", "random", "grid", "median", "none", "hyperband",
    "float", "int", "categorical", "mlp", "gru", "linear", "cnn1d", "resnet_small",
    "mnist1d", "digits", "synthetic_regression", "val_loss", "val_acc", "val_mse", "loss",
    "train_loss", "minimize", "maximize", "min", "max", "best", "last", "auto", "cpu",
    "cuda:0", "cuda:x", "cuda", "adam", "sgd", "adamw", "plateau", "fail", "prune",
    "filesystem", "boto3", "a/b", ".", "..", "last.pt", "model.pt", "model.bin",
    "{epoch}.pt", "{nope}.pt", "{0}.pt", "{}.pt", "{epoch:x}.pt", "{epoch[0]}.pt",
    "{epoch.real}.pt", "{epoch.x}.pt", "{monitor.upper}.pt", "{value!z}.pt", "{", "}",
    "json:dumps", "json:nope", "no_such_module_hpsearch:make", "os.path:join", ":", "a:", ":b",
    ".:x", "..x:y", "1e-3", "nan", "inf", "-1", "0", "true", "null", "~",
]
SAFE_TEXT = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyz_ABCXYZ0123456789-/ {}[]!.,'\"#&*?|"),
    max_size=12,
)
KNOWN_KEYS = [
    "study", "data", "model", "train", "checkpoint", "resources", "report", "artifacts",
    "name", "metric", "direction", "n_trials", "timeout", "sampler", "pruner", "storage",
    "enqueue", "max_retries", "max_initial_failures", "heartbeat_interval", "grace_period",
    "seed", "args", "val_fraction", "test_fraction", "split_seed", "in_memory", "architecture",
    "init_from", "factory", "params", "type", "low", "high", "log", "step", "choices",
    "max_epochs", "optimizer", "lr", "weight_decay", "momentum", "batch_size", "loss",
    "lr_scheduler", "early_stopping", "patience", "min_delta", "on_nonfinite", "monitor",
    "mode", "save", "every_n_epochs", "keep_top_k", "keep_top_k_trials", "filename",
    "resume_every_n_epochs", "devices", "trials_per_device", "workers", "torch_threads",
    "enabled", "seeds", "top_n", "store", "path", "bucket", "endpoint_url", "wrapped",
    # near misses that deserve a "did you mean"
    "n_trial", "metrics", "architectures", "lr_schedule", "early_stop", "epochs", "Type",
]
# Keys never contain "." here: an error key is a dotted path, so a dotted name is ambiguous.
KEYS = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.text(alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyz_ -"), min_size=1, max_size=10),
    st.integers(-3, 3),
    st.booleans(),
    st.none(),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 1000),
    st.integers(),
    st.floats(),  # NaN and infinities included
    st.sampled_from(SPECIAL_STRINGS),
    SAFE_TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(KEYS, children, max_size=4),
        st.fixed_dictionaries(
            {"type": st.one_of(st.sampled_from(["float", "int", "categorical"]), children)},
            optional={"low": children, "high": children, "log": children, "step": children,
                      "choices": children},
        ),
    ),
    max_leaves=8,
)

Path_ = tuple[Any, ...]


def all_paths(node: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every location in a parsed YAML document, the root included."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += all_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += all_paths(v, (*prefix, i))
    return out


def get(doc: Any, path: Path_) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def change_type(value: Any, how: int) -> Any:
    """Keep the content, change the type: the classic hand-edit mistake."""
    options = [
        lambda v: str(v),
        lambda v: [v],
        lambda v: {"value": v},
        lambda v: None,
        lambda v: list(v.values()) if isinstance(v, dict) else v,
        lambda v: float(v) if isinstance(v, (int, float)) else v,
        lambda v: int(v) if isinstance(v, float) and v == v and abs(v) != float("inf") else v,
        lambda v: bool(v) if not isinstance(v, (dict, list)) else v,
    ]
    return options[how % len(options)](value)


@st.composite
def mutated_documents(draw: st.DrawFn) -> Any:
    name, text = draw(st.sampled_from(BASES))
    doc = yaml.safe_load(text)
    for _ in range(draw(st.integers(1, 3))):
        paths = all_paths(doc)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(
            ["delete", "set", "change_type", "insert_key", "swap_low_high", "rename_key"]))
        if not path:  # the root itself
            if op in ("set", "change_type"):
                doc = draw(VALUES) if op == "set" else change_type(doc, draw(st.integers(0, 7)))
            continue
        parent, last = get(doc, path[:-1]), path[-1]
        target = parent[last]
        if op == "delete":
            del parent[last]
        elif op == "set":
            parent[last] = draw(VALUES)
        elif op == "change_type":
            parent[last] = change_type(target, draw(st.integers(0, 7)))
        elif op == "insert_key" and isinstance(target, dict):
            target[draw(KEYS)] = draw(VALUES)
        elif op == "swap_low_high" and isinstance(target, dict):
            target["low"], target["high"] = target.get("high"), target.get("low")
        elif op == "rename_key" and isinstance(parent, dict):
            parent[draw(KEYS)] = parent.pop(last)
    return doc


# ---------------------------------------------------------------- properties

# Path parts that are pydantic's names for union members, not keys of any study file.
TYPE_TAGS = {"bool", "str", "int", "float", "none", "list", "dict", "literal", "[key]"}
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def resolve(doc: Any, part: str) -> tuple[bool, Any]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            if str(k) == part:
                return True, v
    if isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
        return True, doc[int(part)]
    return False, None


def assert_names_a_key(doc: Any, err: ConfigError) -> None:
    """The key is a path into the file; only its last part may be absent (a missing key)."""
    msg = str(err)
    assert err.key, f"no key named: {msg}"
    node = doc
    parts = err.key.split(".")
    for i, part in enumerate(parts):
        found, node = resolve(node, part)
        if found:
            continue
        assert i == len(parts) - 1, f"{err.key!r} is not a path in the file: {msg}"
        assert IDENTIFIER.match(part) and part.lower() not in TYPE_TAGS, (
            f"{err.key!r} ends in {part!r}, which is not a key: {msg}")


def outcome(raw: Any) -> StudyConfig | ConfigError:
    """Parse (a copy: the loader may keep what it is given); only ConfigError may escape."""
    try:
        return parse_config(copy.deepcopy(raw), SOURCE)
    except ConfigError as err:
        message = str(err)
        assert message.startswith(f"{SOURCE}: "), message
        assert "\n" not in message, f"a multi-line message:\n{message}"
        assert "Traceback" not in message
        return err


def outcome_unless_crash(raw: Any) -> StudyConfig | ConfigError | None:
    """As ``outcome``, but a crash is None: test_mutated_study_never_crashes reports those."""
    try:
        parse_config(copy.deepcopy(raw), SOURCE)
    except ConfigError:
        pass
    except Exception:
        return None
    return outcome(raw)


FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@FUZZ
@given(mutated_documents())
def test_mutated_study_never_crashes(raw: Any) -> None:
    result = outcome(raw)
    if isinstance(result, ConfigError) and isinstance(raw, dict):
        assert result.key, str(result)


@FUZZ
@given(mutated_documents())
def test_config_error_names_a_key_of_the_file(raw: Any) -> None:
    result = outcome_unless_crash(raw)
    if isinstance(result, ConfigError) and isinstance(raw, dict):
        assert_names_a_key(raw, result)


@FUZZ
@given(mutated_documents())
def test_valid_mutations_are_self_consistent(raw: Any) -> None:
    result = outcome_unless_crash(raw)
    if isinstance(result, StudyConfig):
        assert result.checkpoint.monitor and result.checkpoint.mode
        # What the loader accepted, it accepts again from its own dump (as run.py does).
        dumped = result.as_study_dict()
        again = outcome(dumped)
        assert isinstance(again, StudyConfig), str(again)
        # Equal up to free-form arguments, whose non-string keys JSON turns into strings.
        assert again.as_study_dict() == dumped


# ---------------------------------------------------------------- corrupted YAML text


@st.composite
def corrupted_texts(draw: st.DrawFn) -> bytes:
    _, text = draw(st.sampled_from(BASES))
    data = text.encode()
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        op = draw(st.sampled_from(
            ["delete", "insert", "replace", "truncate", "dup_line", "indent", "bytes"]))
        i = draw(st.integers(0, n))
        if op == "delete":
            data = data[:i] + data[i + draw(st.integers(1, 20)):]
        elif op == "insert":
            piece = draw(st.sampled_from(
                [":", ": ", "- ", "{", "}", "[", "]", "\t", "  ", "\n", "#", "&a ", "*a", "!!",
                 "'", '"', "? ", "|", ">", "%", "@", "`", "x: y\n", "\n  bogus: 1\n",
                 "!!python/object:os.system", "---\n", "...\n"]))
            data = data[:i] + piece.encode() + data[i:]
        elif op == "replace" and n:
            j = min(i, n - 1)
            data = data[:j] + draw(st.binary(min_size=1, max_size=1)) + data[j + 1:]
        elif op == "truncate":
            data = data[:i]
        elif op == "dup_line":
            lines = data.split(b"\n")
            k = draw(st.integers(0, len(lines) - 1))
            lines.insert(k, lines[k])
            data = b"\n".join(lines)
        elif op == "indent":
            lines = data.split(b"\n")
            k = draw(st.integers(0, len(lines) - 1))
            lines[k] = b" " * draw(st.integers(1, 3)) + lines[k]
            data = b"\n".join(lines)
        elif op == "bytes":
            data = data[:i] + draw(st.binary(min_size=1, max_size=4)) + data[i:]
    return data


@FUZZ
@given(corrupted_texts())
def test_corrupted_yaml_never_crashes(tmp_path_factory: pytest.TempPathFactory,
                                      data: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "corrupt.yaml"
    path.write_bytes(data)
    try:
        config = load_config(path)
    except ConfigError as err:
        message = str(err)
        assert message.startswith(f"{path}: "), message
        assert "\n" not in message, f"a multi-line message:\n{message}"
    else:
        assert isinstance(config, StudyConfig)


# ---------------------------------------------------------------- cases fuzzing found


def _with(text: str, path: str, value: Any) -> dict[str, Any]:
    doc = yaml.safe_load(text)
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("checkpoint.filename", "{epoch[0]}.pt", "checkpoint.filename"),
        ("checkpoint.filename", "{epoch.x}.pt", "checkpoint.filename"),
        ("train.lr", {"type": ["float"], "low": 0.1, "high": 1}, "train.lr.type"),
        ("model.architecture.mlp.hidden", {"type": {"int": 1}}, "model.architecture.mlp.hidden"),
        ("study.enqueue", [{"architecture": "mlp", "hidden": [16]}], "study.enqueue.0.hidden"),
        ("resources.devices", [1], "resources.devices"),
        ("resources.devices", "gpu", "resources.devices"),
        ("resources.torch_threads", [1], "resources.torch_threads"),
        # YAML 1.1 reads `no:`, `yes:`, `on:` and `off:` keys as booleans.
        ("resources", {"devices": "cpu", False: 1}, "resources"),
        ("model.architecture.mlp", {True: 1}, "model.architecture.mlp"),
        ("model.architecture.mlp.hidden", {"type": "int", "low": 1, "high": 4, 3: 1},
         "model.architecture.mlp.hidden"),
        ("train.lr", {"type": "float", "low": 0.1, "high": 0.01}, "train.lr"),
        ("study.n_trails", 3, "study.n_trails"),
    ],
)
def test_known_bad_values_give_a_config_error_naming_the_key(
    path: str, value: Any, key: str
) -> None:
    raw = _with(TINY, path, value)
    result = outcome(raw)
    assert isinstance(result, ConfigError), result
    assert result.key.startswith(key), str(result)
    assert_names_a_key(raw, result)


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("study: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_parse_config_leaves_its_input_alone() -> None:
    raw = yaml.safe_load(RICH)
    before = copy.deepcopy(raw)
    parse_config(raw, SOURCE)
    assert raw == before


# ---------------------------------------------------------------- the command line


BAD_FILES = {
    "unknown-key": TINY.replace("n_trials: 6", "n_trails: 6"),
    "yaml-syntax": TINY.replace("metric: val_acc", "metric: [val_acc"),
    "not-a-mapping": "- study\n- model\n",
    "empty": "",
    "bad-range": TINY.replace("low: 16, high: 64", "low: 64, high: 16"),
    "metric-not-computed": TINY.replace("metric: val_acc", "metric: val_mse"),
    "bad-template": TINY.replace("keep_top_k_trials: 2", 'filename: "{epoch.x}.pt"'),
    "bad-sampler-arg": TINY.replace("{name: tpe, seed: 0}", "{name: tpe, bogus: 1}"),
    "bad-grid-space": TINY.replace("{name: tpe, seed: 0}", "{name: grid, search_space: 5}"),
    "bad-wrapped-pruner": TINY.replace(
        "{name: hyperband, min_resource: 1, reduction_factor: 3}",
        "{name: patient, patience: 1, wrapped: {name: nope}}",
    ),
    "bad-data-args": TINY.replace("{num_samples: 600}", "{num_samples: 600, bogus: 1}"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_FILES) + ["missing-file"])
def test_cli_bad_study_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    study = tmp_path / "bad.yaml"
    if case != "missing-file":
        study.write_text(BAD_FILES[case])
    proc = subprocess.run(
        [sys.executable, "-m", "hpsearch.run", "bad.yaml", "--results-dir", "res"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: bad.yaml"), lines[0]
    results = tmp_path / "res"
    assert not results.exists() or not any(results.iterdir()), sorted(results.rglob("*"))
