"""Built-in datasets, splits, the per-study cache, and batching on the worker's device.

Generated data (MNIST-1D) is produced once per study by the parent and cached on disk; workers
map the cache into memory (shared by every process on the host) and reuse it across trials.
Training and validation splits that fit the worker's share of its device live there and are
batched by slicing one permutation per epoch; the test split stays on the host. A user factory
may instead return ``torch.utils.data.Dataset`` objects (and the ``collate_fn`` that makes their
batches), which stream through one persistent DataLoader per split. The built-in loop trains on
``(inputs, targets)`` batches; batches of any other structure (dicts, several inputs) need a
``train.step`` (:mod:`hpsearch.step`), which gets them whole, moved to the device by
:func:`batch_to`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
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
    collate_fn: Callable[[list[Any]], Any] | None = None
    """The streams' batch maker (the factory's ``collate_fn``; None: torch's default)."""

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


STREAMING_KEYS = ("train", "val", "test", "task", "input_shape", "output_size", "collate_fn")
"""What a factory returning torch Datasets returns (``collate_fn`` optional)."""


def _streaming(raw: dict[str, Any]) -> Dataset:
    missing = set(STREAMING_KEYS) - {"collate_fn"} - set(raw)
    if missing:
        raise ValueError(f"a streaming data factory must also return {sorted(missing)}")
    unknown = set(raw) - set(STREAMING_KEYS)
    if unknown:
        raise ValueError(f"a streaming data factory returned unknown key(s) {sorted(unknown)} "
                         f"(valid: {', '.join(STREAMING_KEYS)})")
    collate = raw.get("collate_fn")
    if collate is not None and not callable(collate):
        raise ValueError(f"'collate_fn' must be a function, not {type(collate).__name__}")
    streams = {name: raw[name] for name in SPLITS}
    return Dataset(raw["task"], tuple(raw["input_shape"]), int(raw["output_size"]), streams=streams,
                   collate_fn=collate)


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
    # Mapped, not read: every worker on the host shares the page cache instead of a copy.
    p = torch.load(path, weights_only=True, mmap=True)
    splits = {k: (p[f"x_{k}"], p[f"y_{k}"]) for k in SPLITS}
    return Dataset(p["task"], tuple(p["input_shape"]), int(p["output_size"]), splits=splits)


# ---------------------------------------------------------------- batching


class DeviceBatches:
    """Batches of one split. In-memory splits live on ``device`` and are sliced, not collated;
    the others stream through one DataLoader, kept for every epoch of the trial."""

    def __init__(self, ds: Dataset, split: str, device: torch.device, in_memory: bool,
                 num_workers: int = 0) -> None:
        self.device = device
        self.num_workers = num_workers
        self.collate_fn = ds.collate_fn
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.stream: TorchDataset | None = None
        self._loader: DataLoader | None = None
        self._loader_key: tuple[int, int | None] | None = None
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
                # One gather per epoch (a second copy of the split, counted by
                # fits_in_memory); every batch after it is a view.
                perm = torch.randperm(len(y), generator=generator).to(self.device)
                x, y = x[perm], y[perm]
            for start in range(0, len(y), batch_size):
                yield x[start : start + batch_size], y[start : start + batch_size]
            return
        pin = self.device.type == "cuda"
        for batch in self.loader(batch_size, generator):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"the built-in loop trains on (inputs, targets) batches; this data gives "
                    f"{describe_batch(batch)}: set train.step to a function of (model, batch)")
            xb, yb = batch
            yield xb.to(self.device, non_blocking=pin), yb.to(self.device, non_blocking=pin)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Any]:
        """Yield whole batches on the device, of whatever structure the data has (for
        ``train.step``): ``(x, y)`` tensor pairs for in-memory data, else the collated batch."""
        if self.tensors is not None:
            yield from self.iterate(batch_size, generator)
            return
        pin = self.device.type == "cuda"
        for batch in self.loader(batch_size, generator):
            yield batch_to(batch, self.device, non_blocking=pin)

    def loader(self, batch_size: int, generator: torch.Generator | None = None) -> DataLoader:
        """The split's DataLoader, built once: its worker processes (``data.num_workers``)
        live as long as it does, and each epoch draws a new order from ``generator``."""
        key = (batch_size, None if generator is None else id(generator))
        if self._loader is None or self._loader_key != key:
            self.close()
            self._loader = DataLoader(
                self.stream,  # type: ignore[arg-type]
                batch_size=batch_size,
                shuffle=generator is not None,
                generator=generator,
                pin_memory=self.device.type == "cuda",
                num_workers=self.num_workers,
                collate_fn=self.collate_fn,
                persistent_workers=self.num_workers > 0,
            )
            self._loader_key = key
        return self._loader

    def close(self) -> None:
        """Let the loader's worker processes go (they end with the last reference to it)."""
        self._loader = self._loader_key = None


def batch_to(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor in it on ``device``: tensors, mappings (as dicts), lists,
    tuples (named ones too) and objects with a ``to(device)`` method, nested; anything else
    (strings, numbers) as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: batch_to(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(batch_to(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to(v, device, non_blocking) for v in batch)
    if callable(getattr(batch, "to", None)):
        return batch.to(device)
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else (
        batch if isinstance(batch, (list, tuple)) else ())
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def samples_in(batch: Any) -> int:
    """The number of samples in a batch of any structure: the first dimension of its first
    tensor (depth first, in order)."""
    first = _first_tensor(batch)
    if first is None:
        raise TypeError(f"cannot count the samples of a batch without tensors: "
                        f"{describe_batch(batch)}")
    return len(first) if first.dim() else 1


def describe_batch(batch: Any) -> str:
    """A short description of a batch's structure for error messages."""
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {sorted(map(str, batch))}"
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {len(batch)}"
    return f"a {type(batch).__name__}"


def to_device(ds: Dataset, device: torch.device) -> Dataset:
    """The training and validation splits moved to ``device`` once, for every trial a worker
    runs; the test split, which trials never read, stays on the host."""
    if ds.splits is None:
        return ds
    splits = {k: (x, y) if k == "test" else (x.to(device), y.to(device))
              for k, (x, y) in ds.splits.items()}
    return Dataset(ds.task, ds.input_shape, ds.output_size, splits=splits, streams=ds.streams,
                   collate_fn=ds.collate_fn)


DEVICE_DATA_SHARE = 0.5
"""The part of a slot's share of free GPU memory its data may take; the rest is for the model,
its activations and the optimizer state."""
HOST_DATA_LIMIT = 4 * 2**30
"""On the CPU the splits are in host memory either way: slicing them costs only the shuffle."""


def fits_in_memory(nbytes_train: int, nbytes_val: int, free_bytes: int,
                   slots_per_device: int) -> bool:
    """Whether a worker may keep its training and validation splits on its device.

    Args:
        nbytes_train: Size of the training split (inputs and targets).
        nbytes_val: Size of the validation split.
        free_bytes: The device's free memory now.
        slots_per_device: Workers sharing the device, each as entitled as this one.

    Returns:
        Whether both splits, plus the copy of the training split the per-epoch shuffle
        gathers, fit in ``DEVICE_DATA_SHARE`` of this worker's part of the free memory.
    """
    share = free_bytes / max(1, slots_per_device)
    return 2 * nbytes_train + nbytes_val <= DEVICE_DATA_SHARE * share


def _nbytes(pair: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in pair)


def keep_in_memory(ds: Dataset, setting: bool | str, device: torch.device,
                   slots_per_device: int = 1) -> bool:
    """``data.in_memory`` decided for one worker: ``auto`` asks :func:`fits_in_memory`.

    Args:
        ds: The dataset (streaming datasets never are in memory).
        setting: ``data.in_memory``: True, False or ``"auto"``.
        device: The worker's device.
        slots_per_device: Workers sharing ``device``.
    """
    if ds.splits is None:
        return False
    if setting != "auto":
        return bool(setting)
    train, val = _nbytes(ds.splits["train"]), _nbytes(ds.splits["val"])
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return fits_in_memory(train, val, free, slots_per_device)
    return train + val < HOST_DATA_LIMIT
