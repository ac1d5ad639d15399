"""Built-in datasets, splits, the per-study cache, and batching on the worker's device.

Generated data (MNIST-1D) is produced once per study by the parent and cached on disk; workers
load the cache once and reuse it across trials. A dataset that fits in memory lives on the
worker's device and is batched by slicing one permutation per epoch; a user factory may instead
return ``torch.utils.data.Dataset`` objects, which stream through a DataLoader.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from hpsearch import datasets, metrics, user_code
from hpsearch.config import DataSection

Task = Literal["classification", "regression"]
SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """Train / validation / test splits, as tensors (or streaming torch datasets)."""

    task: Task
    input_shape: tuple[int, ...]
    output_size: int
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    streams: dict[str, TorchDataset] | None = None

    def metric_names(self) -> list[str]:
        return list(metrics.BASE_METRICS[self.task])

    def size(self, split: str) -> int:
        if self.splits is not None:
            return len(self.splits[split][1])
        assert self.streams is not None
        return len(self.streams[split])  # type: ignore[arg-type]


# ---------------------------------------------------------------- building the splits


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = n - max(1, int(round(n * fraction)))
    return order[:cut], order[cut:]




def _to_tensor(a: Any, task: Task | None = None, target: bool = False) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a))
    if target and task == "classification":
        return t.long()
    return t.float()


def build(cfg: DataSection) -> Dataset:
    """Generate or load the dataset described by ``cfg`` and split it.

    The test split is the source's own when it has one, else a ``test_fraction`` holdout; the
    validation split is ``val_fraction`` of what remains. Splits are seeded by ``split_seed``.
    """
    fn = user_code.resolve(cfg.name) if ":" in cfg.name else datasets.GENERATORS[cfg.name]
    raw = fn(**cfg.args)
    if not isinstance(raw, dict):
        raise TypeError(f"data factory {cfg.name!r} must return a dict, got {type(raw).__name__}")
    if "train" in raw and isinstance(raw["train"], TorchDataset):
        return _streaming(raw)
    x, y = np.asarray(raw["x"]), np.asarray(raw["y"])
    task: Task = raw.get("task") or (
        "classification" if np.issubdtype(y.dtype, np.integer) else "regression"
    )
    if "x_test" in raw:
        x_test, y_test = np.asarray(raw["x_test"]), np.asarray(raw["y_test"])
    else:
        keep, test = _split(len(y), cfg.test_fraction, cfg.split_seed)
        x, y, x_test, y_test = x[keep], y[keep], x[test], y[test]
    if "x_val" in raw:
        x_val, y_val = np.asarray(raw["x_val"]), np.asarray(raw["y_val"])
    else:
        train, val = _split(len(y), cfg.val_fraction, cfg.split_seed + 1)
        x, y, x_val, y_val = x[train], y[train], x[val], y[val]
    if task == "classification":
        output_size = int(max(y.max(), y_val.max(), y_test.max())) + 1
    else:
        output_size = 1 if y.ndim == 1 else int(y.shape[1])
        y, y_val, y_test = (a.reshape(len(a), -1) for a in (y, y_val, y_test))
    splits = {
        name: (_to_tensor(xs), _to_tensor(ys, task, target=True))
        for name, xs, ys in (("train", x, y), ("val", x_val, y_val), ("test", x_test, y_test))
    }
    return Dataset(task, tuple(x.shape[1:]), output_size, splits=splits)


def _streaming(raw: dict[str, Any]) -> Dataset:
    missing = {"val", "test", "task", "input_shape", "output_size"} - set(raw)
    if missing:
        raise ValueError(f"a streaming data factory must also return {sorted(missing)}")
    streams = {name: raw[name] for name in SPLITS}
    return Dataset(raw["task"], tuple(raw["input_shape"]), int(raw["output_size"]), streams=streams)


# ---------------------------------------------------------------- per-study cache


def cache_path(cfg: DataSection, cache_dir: Path) -> Path:
    key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = cfg.name.replace(":", "-").replace(".", "-")
    return cache_dir / f"{stem}-{digest}.pt"


def to_payload(ds: Dataset) -> dict[str, Any]:
    """The cache file's content: tensors and JSON-safe fields only."""
    assert ds.splits is not None
    return {
        "task": ds.task,
        "input_shape": list(ds.input_shape),
        "output_size": ds.output_size,
        **{f"x_{k}": v[0] for k, v in ds.splits.items()},
        **{f"y_{k}": v[1] for k, v in ds.splits.items()},
    }


def load(cfg: DataSection, cache_dir: Path) -> Dataset:
    """Load the cached dataset (or build it, for streaming factories that are not cached)."""
    path = cache_path(cfg, cache_dir)
    if not path.exists():
        return build(cfg)
    p = torch.load(path, weights_only=True)
    splits = {k: (p[f"x_{k}"], p[f"y_{k}"]) for k in SPLITS}
    return Dataset(p["task"], tuple(p["input_shape"]), int(p["output_size"]), splits=splits)


# ---------------------------------------------------------------- batching


class DeviceBatches:
    """Batches of one split. In-memory splits live on ``device`` and are sliced, not collated."""

    def __init__(self, ds: Dataset, split: str, device: torch.device, in_memory: bool) -> None:
        self.device = device
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.stream: TorchDataset | None = None
        if ds.splits is not None and in_memory:
            x, y = ds.splits[split]
            self.tensors = (x.to(device), y.to(device))
        elif ds.splits is not None:
            self.stream = torch.utils.data.TensorDataset(*ds.splits[split])
        else:
            assert ds.streams is not None
            self.stream = ds.streams[split]

    def __len__(self) -> int:
        if self.tensors is not None:
            return len(self.tensors[1])
        return len(self.stream)  # type: ignore[arg-type]

    def iterate(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) on the device; shuffled when a generator is given."""
        if self.tensors is not None:
            x, y = self.tensors
            if generator is not None:
                # One gather per epoch; every batch after it is a view.
                perm = torch.randperm(len(y), generator=generator).to(self.device)
                x, y = x[perm], y[perm]
            for start in range(0, len(y), batch_size):
                yield x[start : start + batch_size], y[start : start + batch_size]
            return
        pin = self.device.type == "cuda"
        loader = DataLoader(
            self.stream,  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=generator is not None,
            generator=generator,
            pin_memory=pin,
            num_workers=2 if pin else 0,
        )
        for xb, yb in loader:
            yield xb.to(self.device, non_blocking=pin), yb.to(self.device, non_blocking=pin)


def to_device(ds: Dataset, device: torch.device) -> Dataset:
    """The in-memory splits moved to ``device`` once, for every trial a worker runs."""
    if ds.splits is None:
        return ds
    splits = {k: (x.to(device), y.to(device)) for k, (x, y) in ds.splits.items()}
    return Dataset(ds.task, ds.input_shape, ds.output_size, splits=splits, streams=ds.streams)


def fits_in_memory(ds: Dataset, device: torch.device) -> bool:
    """Keep a dataset on the device when it uses under a quarter of the device's memory."""
    if ds.splits is None:
        return False
    nbytes = sum(t.numel() * t.element_size() for pair in ds.splits.values() for t in pair)
    if device.type == "cuda":
        return nbytes < torch.cuda.get_device_properties(device).total_memory // 4
    return nbytes < 4 * 2**30
