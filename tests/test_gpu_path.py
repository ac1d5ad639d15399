"""The GPU path, checked on the CPU: what each piece decides is tested without CUDA.

Resume state is read onto the host, only the trial's own GPU's RNG is saved, slots interleave
GPUs, device-resident data is budgeted per slot, streaming data keeps one loader per split,
and a worker survives running out of memory but is replaced when its CUDA context breaks
(the errors are raised by a user model on the CPU: detection goes by the error alone).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState
from studyfiles import TINY, open_results, tiny, write_study

from hpsearch import data as data_mod
from hpsearch.config import ResourcesSection, parse_config
from hpsearch.errors import Interrupted
from hpsearch.optuna_private import frozen
from hpsearch.results import ResultsLayout
from hpsearch.space import TrialParams
from hpsearch.storage.trials import fail_trial
from hpsearch.train import Trainer, TrialEnv, _rng_state, _set_rng_state, run_trial
from hpsearch.workers.slots import plan_slots
from hpsearch.workers.worker import cuda_context_broken

optuna.logging.set_verbosity(optuna.logging.WARNING)

GiB = 2**30


@pytest.fixture(scope="module")
def config():
    raw = copy.deepcopy(TINY)
    raw["train"].update(max_epochs=3, early_stopping=None)
    return parse_config(raw, "s.yaml")


@pytest.fixture(scope="module")
def dataset(config):
    return data_mod.build(config.data)


def _params() -> TrialParams:
    return TrialParams("mlp", {"hidden": 16}, {"optimizer": "adam", "lr": 0.01,
                                               "weight_decay": 0.0, "momentum": 0.9,
                                               "batch_size": 64})


# ---------------------------------------------------------------- 1. resume onto the host


def test_resume_state_is_read_onto_the_cpu(tmp_path, config, dataset, monkeypatch) -> None:
    raw = copy.deepcopy(TINY)
    raw["train"].update(max_epochs=4, early_stopping=None)
    raw["checkpoint"].update(resume_min_seconds=0)
    cfg = parse_config(raw, "s.yaml")
    epochs: list[int] = []
    env = TrialEnv(config=cfg, dataset=dataset, device=torch.device("cpu"),
                   layout=ResultsLayout(tmp_path), worker="test", log=lambda s: None,
                   should_stop=lambda: len(epochs) >= 2,
                   on_epoch=lambda n, e, rec: epochs.append(e))
    study = optuna.create_study(direction="maximize")
    first = study.ask()
    with pytest.raises(Interrupted):
        run_trial(first, _params(), env)
    fail_trial(study, frozen(first), "interrupted", retry=True)

    seen: list[Any] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    retry = study.ask()
    env.should_stop = lambda: False
    run_trial(retry, _params(), env)
    # Onto the CPU whatever the trial's device: RNG states must stay CPU tensors.
    assert seen and all(m == "cpu" for m in seen), seen
    resumed = retry.user_attrs["resumed_from"]
    assert resumed["trial"] == first.number and resumed["epoch"] >= 2, resumed


# ---------------------------------------------------------------- 2. the trial's own GPU's RNG


def test_only_the_trials_own_cuda_rng_is_saved(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    assert _rng_state(gen, torch.device("cpu"))["cuda"] is None
    asked: list[Any] = []

    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        asked.append(device)
        return torch.zeros(16, dtype=torch.uint8)

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    state = _rng_state(gen, torch.device("cuda", 1))
    assert asked == [torch.device("cuda", 1)]
    assert isinstance(state["cuda"], torch.Tensor)


def test_set_rng_state_restores_only_its_device_and_ignores_old_lists(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    state = _rng_state(gen, torch.device("cpu"))
    restored: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda s, device="cuda": restored.append(device))
    # Older resume files hold one state per visible GPU: not restorable by index.
    old = {**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    _set_rng_state(old, gen, torch.device("cuda", 0))
    _set_rng_state(old, gen, torch.device("cpu"))
    assert restored == []
    new = {**state, "cuda": torch.zeros(16, dtype=torch.uint8)}
    _set_rng_state(new, gen, torch.device("cpu"))
    assert restored == []
    _set_rng_state(new, gen, torch.device("cuda", 1))
    assert restored == [torch.device("cuda", 1)]


# ---------------------------------------------------------------- 5. slots interleave GPUs


@pytest.mark.parametrize(("workers", "expected"), [
    (4, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
    (3, ["cuda:0", "cuda:1", "cuda:0"]),
    ("auto", ["cuda:0", "cuda:1"] * 4),
])
def test_slots_interleave_gpus(workers: Any, expected: list[str]) -> None:
    res = ResourcesSection(devices=["cuda:0", "cuda:1"], trials_per_device=4, workers=workers)
    slots = plan_slots(res, cores=16)
    assert [s.device for s in slots] == expected
    assert [s.index for s in slots] == list(range(len(expected)))


# ---------------------------------------------------------------- 6. the device-resident budget


def test_in_memory_budget_divides_free_memory_by_the_slots_on_the_device() -> None:
    train, val, free = 1 * GiB, GiB // 2, 10 * GiB
    # 2 x train (the shuffle's copy) + val = 2.5 GiB against half of each slot's share.
    assert data_mod.fits_in_memory(train, val, free, slots_per_device=1)  # 5 GiB
    assert data_mod.fits_in_memory(train, val, free, slots_per_device=2)  # 2.5 GiB
    assert not data_mod.fits_in_memory(train, val, free, slots_per_device=3)  # 1.7 GiB
    assert not data_mod.fits_in_memory(train, val, free, slots_per_device=4)


def test_in_memory_budget_counts_the_shuffle_copy() -> None:
    free = 8 * GiB  # 4 GiB for one slot's data
    # Without the shuffle's copy 3 GiB of training data would fit; with it, 6 GiB do not.
    assert not data_mod.fits_in_memory(3 * GiB, 0, free, slots_per_device=1)
    assert data_mod.fits_in_memory(2 * GiB, 0, free, slots_per_device=1)
    # Validation data is never shuffled: counted once.
    assert data_mod.fits_in_memory(1 * GiB, 2 * GiB, free, slots_per_device=1)


def test_keep_in_memory_asks_free_gpu_memory(dataset, monkeypatch) -> None:
    nbytes = sum(t.numel() * t.element_size()
                 for k in ("train", "val") for t in dataset.splits[k])
    asked: list[Any] = []

    def mem_get_info(device: Any = None) -> tuple[int, int]:
        asked.append(device)
        return 4 * nbytes, 100 * nbytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    gpu = torch.device("cuda", 1)
    assert data_mod.keep_in_memory(dataset, "auto", gpu, slots_per_device=1)
    assert not data_mod.keep_in_memory(dataset, "auto", gpu, slots_per_device=2)
    assert asked == [gpu, gpu]
    assert not data_mod.keep_in_memory(dataset, False, gpu)
    assert data_mod.keep_in_memory(dataset, True, gpu, slots_per_device=8)
    assert data_mod.keep_in_memory(dataset, "auto", torch.device("cpu"), slots_per_device=16)
    streaming = data_mod.Dataset(dataset.task, dataset.input_shape, dataset.output_size,
                                 streams={"train": None, "val": None, "test": None})
    assert not data_mod.keep_in_memory(streaming, True, gpu)


def test_the_test_split_stays_on_the_host(dataset) -> None:
    # The meta device stands in for a GPU: tensors "move" without memory or CUDA.
    moved = data_mod.to_device(dataset, torch.device("meta"))
    assert moved.splits is not None
    assert {moved.splits[k][0].device.type for k in ("train", "val")} == {"meta"}
    assert moved.splits["test"][0].device.type == "cpu"
    assert moved.splits["test"][0] is dataset.splits["test"][0]


def test_the_data_cache_is_mapped_not_read(tmp_path, config, dataset) -> None:
    from hpsearch.files import atomic_torch_save

    path = data_mod.cache_path(config.data, tmp_path)
    atomic_torch_save(data_mod.to_payload(dataset), path)
    loaded = data_mod.load(config.data, tmp_path)
    assert loaded.splits is not None
    x = loaded.splits["train"][0]
    assert torch.equal(x, dataset.splits["train"][0])
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps to check the mapping with")
    # The tensor's memory lies in a mapping of the cache file, not on the heap.
    ranges = [tuple(int(a, 16) for a in line.split()[0].split("-"))
              for line in maps.read_text().splitlines() if line.endswith(str(path))]
    assert any(lo <= x.data_ptr() < hi for lo, hi in ranges), ranges


# ---------------------------------------------------------------- 8. one loader per split


@pytest.mark.parametrize("num_workers", [0, 1])
def test_streaming_keeps_one_loader_per_split(config, dataset, monkeypatch,
                                              num_workers: int) -> None:
    streams = {k: torch.utils.data.TensorDataset(*dataset.splits[k]) for k in dataset.splits}
    streaming = data_mod.Dataset(dataset.task, dataset.input_shape, dataset.output_size,
                                 streams=streams)
    built: list[dict[str, Any]] = []

    class CountingLoader(torch.utils.data.DataLoader):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(data_mod, "DataLoader", CountingLoader)
    cfg = config.model_copy(update={"data": config.data.model_copy(
        update={"num_workers": num_workers})})
    trainer = Trainer(cfg, _params(), streaming, torch.device("cpu"), seed=0, in_memory=False)
    for epoch in range(3):
        trainer.run_epoch(epoch)
    trainer.close()
    assert len(trainer.history) == 3
    # One for training (shuffled), one for validation: for all three epochs.
    assert len(built) == 2, built
    assert [kw["shuffle"] for kw in built] == [True, False]
    assert all(kw["num_workers"] == num_workers for kw in built)
    assert all(kw["persistent_workers"] == (num_workers > 0) for kw in built)
    assert not any(kw["pin_memory"] for kw in built)  # a CPU device: nothing to pin for


# ---------------------------------------------------------------- 3, 4. which errors end a worker


@pytest.mark.parametrize(("err", "broken"), [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("CUDA error: unspecified launch failure"), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 TiB"), False),
    (RuntimeError("CUDA error: out of memory"), False),
    (RuntimeError("boom: the model exploded on purpose"), False),
    (ValueError("CUDA error: but not a runtime error"), False),
])
def test_a_cuda_context_is_broken_by_any_cuda_error_but_out_of_memory(
        err: BaseException, broken: bool) -> None:
    assert cuda_context_broken(err) is broken


def test_a_cuda_error_wrapped_in_another_still_breaks_the_context() -> None:
    try:
        try:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as inner:
            raise ValueError("the user's code wrapped it") from inner
    except ValueError as outer:
        assert cuda_context_broken(outer)


@pytest.mark.skipif(not hasattr(torch, "AcceleratorError"), reason="torch < 2.8")
def test_an_accelerator_error_breaks_the_context() -> None:
    err = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    assert cuda_context_broken(err)


# ---------------------------------------------------------------- real runs on the CPU

FACTORIES = textwrap.dedent(
    """
    import math

    import torch
    from torch import nn


    class Failing(nn.Module):
        def __init__(self, input_shape, output_size, error):
            super().__init__()
            self.fc = nn.Linear(math.prod(input_shape), output_size)
            self.error = error

        def forward(self, x):
            raise self.error


    def make_oom(input_shape, output_size):
        return Failing(input_shape, output_size, torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 4.00 TiB"))


    def make_broken(input_shape, output_size):
        return Failing(input_shape, output_size, RuntimeError(
            "CUDA error: an illegal memory access was encountered"))


    def streaming(n=400, features=40, classes=10):
        g = torch.Generator().manual_seed(0)

        def split(k):
            x = torch.randn(k, features, generator=g)
            return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())

        return {"train": split(n), "val": split(n // 4), "test": split(n // 4),
                "task": "classification", "input_shape": [features], "output_size": classes}
    """
)


def _run_failing(tmp_path: Path, factory: str) -> tuple[subprocess.CompletedProcess[str],
                                                          list[FrozenTrial]]:
    """A 3-trial study on one CPU worker whose first trial fails with ``factory``'s error."""
    (tmp_path / "gpu_path_factories.py").write_text(FACTORIES)
    raw = tiny(
        study={"n_trials": 3, "enqueue": [{"architecture": "failing"},
                                          {"architecture": "linear"},
                                          {"architecture": "linear"}]},
        model={"architecture": {"linear": {},
                                "failing": {"factory": f"gpu_path_factories:{factory}"}}},
        train={"max_epochs": 2},
        resources={"devices": "cpu", "workers": 1, "torch_threads": 1},
    )
    study_file = write_study(tmp_path, raw)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "hpsearch.run", study_file.name, "--results-dir", "res"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    return out, open_results(tmp_path / "res" / "tiny").get_trials(deepcopy=False)


@pytest.mark.slow
def test_out_of_memory_fails_the_trial_and_the_worker_goes_on(tmp_path: Path) -> None:
    out, trials = _run_failing(tmp_path, "make_oom")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "died" not in text and "CUDA context broken" not in text, text
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 2, text
    assert "OutOfMemoryError" in trials[0].user_attrs["fail_reason"], trials[0].user_attrs
    # The same process claimed and completed the next trials.
    assert len({t.user_attrs["worker"] for t in trials}) == 1


@pytest.mark.slow
def test_a_broken_cuda_context_fails_the_trial_and_replaces_the_worker(tmp_path: Path) -> None:
    out, trials = _run_failing(tmp_path, "make_broken")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 2, text
    reason = trials[0].user_attrs["fail_reason"]
    assert "CUDA error: an illegal memory access" in reason, trials[0].user_attrs
    assert "retried_as" not in trials[0].user_attrs  # an ordinary failure: no resume
    broken, after = trials[0].user_attrs["worker"], trials[1].user_attrs["worker"]
    assert broken != after, "the worker with the broken context must not go on"
    assert trials[2].user_attrs["worker"] == after
    assert "worker on slot 0: CUDA context broken (RuntimeError: CUDA error: an illegal " \
           "memory access was encountered); replacing it" in text, text
    assert "died" not in text, text
    run_log = (tmp_path / "res" / "tiny" / "run.log").read_text()
    assert "CUDA context broken" in run_log, run_log


@pytest.mark.slow
def test_streaming_data_with_loader_workers_runs_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "gpu_path_factories.py").write_text(FACTORIES)
    raw = tiny(
        study={"n_trials": 2},
        data={"name": "gpu_path_factories:streaming", "args": {}, "num_workers": 2},
        model={"architecture": {"linear": {}}},
        train={"max_epochs": 3},
        resources={"devices": "cpu", "workers": 1, "torch_threads": 1},
    )
    study_file = write_study(tmp_path, raw)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "hpsearch.run", study_file.name, "--results-dir", "res"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    trials = open_results(tmp_path / "res" / "tiny").get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, out.stdout + out.stderr
    assert all(len(t.user_attrs["history"]) == 3 for t in trials)
