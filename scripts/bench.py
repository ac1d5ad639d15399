"""Side-by-side performance benchmark: hpsearch against the bare loop and a plain Optuna script.

``python scripts/bench.py [--out DIR] [--quick] [--gpu-only]`` runs every measurement in one go
and writes ``DIR/bench.json`` and ``DIR/README.md`` (default ``results/bench/``).

What is measured (targets live here, never in timed tests):

- ``overhead_ratio``: fixed MNIST-1D configurations through hpsearch (journal storage, best
  checkpoints, per-epoch reports, no pruning) / the same training written plainly (model,
  Adam, index slicing of in-memory tensors, no storage), both with 2 worker processes.
- ``vs_plain_optuna_speedup``: the same configurations through the seed's training loop as a
  plain Optuna objective with DataLoaders, run as a user would (``study.optimize(n_jobs=2)``,
  torch's default threads) / hpsearch; two more ways to run the same script are reported.
- ``scaling_2_workers``: hpsearch trials per minute, 2 workers / 1 worker.
- ``pruning_epoch_fraction`` / ``pruning_best_gap``: hyperband against no pruning at equal trial
  count, medians over sampler seeds.
- ``checkpoint_overhead_ratio``: time per epoch of a ~50 MB model, best checkpoints on / off.
- ``scale_rate_ratio``: many tiny trials; trials/s over the last window / the first window.
- ``dask_scaling_2_workers`` / ``dask_overhead_ratio``: the same fixed configurations on a
  local Dask cluster (``resources.scheduler``): 2 one-thread Dask workers / 1, and the 2-worker
  Dask run / a local run with the same 2 one-thread slots.
- GPU (when one is visible): trials_per_device 1, 2, 4 on one GPU.

Baselines run in processes started with ``spawn``; this module imports only the standard
library at the top so that those processes pay for nothing but torch (and Optuna where used).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Measure the checkout this script lives in, whatever an editable install points at.
sys.path.insert(0, str(ROOT))

# metric -> (comparison, target, what it means)
TARGETS: dict[str, tuple[str, float, str]] = {
    "overhead_ratio": ("<=", 1.10, "hpsearch wall time / bare loop, same configs, 2 workers"),
    "vs_plain_optuna_speedup": (">=", 2.0, "plain Optuna + DataLoader wall time / hpsearch"),
    "scaling_2_workers": (">=", 1.8, "trials/min with 2 workers / 1 worker"),
    "pruning_epoch_fraction": ("<=", 0.6, "epochs trained, hyperband / no pruning (median)"),
    "pruning_best_gap": ("<=", 0.05, "relative loss of the best value under hyperband (median)"),
    "checkpoint_overhead_ratio": ("<=", 1.05, "s/epoch of a ~50 MB model, best ckpt on / off"),
    "scale_rate_ratio": (">=", 0.8, "trials/s, last window / first window, tiny trials"),
    "search_quality_vs_plain": (">=", 1.0, "median best val_acc, hpsearch defaults / plain "
                                "Optuna script, shared-name space, 16 trials, 5 seeds"),
    "search_wall_ratio_vs_plain": ("<=", 1.0, "wall time of that search, hpsearch / plain"),
    "architecture_ranking_fidelity": ("<=", 0.05, "worst shortfall of an architecture's "
                                      "reported seed-mean test_acc below its tuned reference"),
    "epochs_fraction": ("<=", 0.7, "epochs trained / unpruned budget, in those runs"),
    "dask_scaling_2_workers": (">=", 1.7, "trials/min on a local Dask cluster, 2 one-thread "
                               "workers / 1"),
    "dask_overhead_ratio": ("<=", 1.15, "wall time, Dask run / local run, same slots (2 "
                            "one-thread workers)"),
}

# The search-quality space (issue 14): MLP and CNN whose width has the same name in the plain
# script, plus the learning rate.
QUALITY_WIDTH = {"mlp": (32, 512), "cnn1d": (8, 64)}
QUALITY_LR = (1e-4, 3e-2)

# Tuned references for the ranking-fidelity benchmark: each architecture of the example
# study's space with a fixed configuration, trained for the full budget (40 epochs, plateau
# LR, early stopping 10) and scored on the test split, mean of 3 seeds. Found once, on
# 2026-12-01, with `python scripts/bench.py --only reference_search`: each architecture alone,
# 12 TPE trials (seed 0, 2 workers, no pruning) over the example study's own ranges on the
# benchmark's 5000-sample MNIST-1D; the best validation trial's configuration (its val_acc in
# the comment).
REFERENCE: dict[str, dict[str, Any]] = {
    "linear": {"lr": 0.010188, "weight_decay": 8.014e-4},  # 0.305
    "mlp": {"hidden": 225, "depth": 3, "dropout": 0.1764, "lr": 0.0031687,
            "weight_decay": 7.405e-6},  # 0.710
    "cnn1d": {"channels": 60, "kernel_size": 5, "depth": 4, "lr": 0.0045461,
              "weight_decay": 5.918e-4},  # 0.974
    "gru": {"hidden": 126, "lr": 0.021262, "weight_decay": 3.613e-5},  # 0.981
}

LR = 3e-3
BATCH = 128


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is; ``QUICK`` only proves the script runs end to end."""

    num_samples: int
    epochs: int
    configs: tuple[dict[str, Any], ...]
    repeats: int
    pruning_trials: int
    pruning_seeds: tuple[int, ...]
    ckpt_hidden: int
    ckpt_epochs: int
    ckpt_samples: int
    ckpt_repeats: int
    scale_trials: int
    scale_window: int
    gpu_trials: int
    gpu_epochs: int
    extras: bool = True
    """Diagnostic variants without a target (skipped by --quick)."""


# Longest first, so that both the bare pool and hpsearch's workers end close together.
CONFIGS = (
    {"architecture": "cnn1d", "channels": 32, "depth": 3, "kernel_size": 5},
    {"architecture": "cnn1d", "channels": 32, "depth": 2, "kernel_size": 5},
    {"architecture": "cnn1d", "channels": 16, "depth": 3, "kernel_size": 5},
    {"architecture": "mlp", "hidden": 256, "depth": 2},
    {"architecture": "cnn1d", "channels": 16, "depth": 2, "kernel_size": 5},
    {"architecture": "cnn1d", "channels": 16, "depth": 3, "kernel_size": 3},
    {"architecture": "cnn1d", "channels": 8, "depth": 3, "kernel_size": 5},
    {"architecture": "mlp", "hidden": 256, "depth": 1},
    {"architecture": "cnn1d", "channels": 8, "depth": 2, "kernel_size": 5},
    {"architecture": "mlp", "hidden": 128, "depth": 2},
    {"architecture": "mlp", "hidden": 128, "depth": 1},
    {"architecture": "mlp", "hidden": 64, "depth": 1},
)

EXAMPLE = ROOT / "studies" / "mnist1d.yaml"


def plain_loaders(data_path: str) -> tuple[Any, Any, int, int]:
    """The plain script's DataLoaders over the cached splits, as a user writes them."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    d = torch.load(data_path, weights_only=True)
    train_loader = DataLoader(TensorDataset(d["x_train"], d["y_train"]), batch_size=BATCH,
                              shuffle=True)
    val_loader = DataLoader(TensorDataset(d["x_val"], d["y_val"]), batch_size=BATCH)
    return train_loader, val_loader, d["x_train"].shape[1], d["output_size"]


def plain_search_worker(storage_path: str, study_name: str, n_trials: int, data_path: str,
                        epochs: int, seed: int) -> float:
    """The search a user writes by hand: the seed's loop as an objective, default TPE and
    MedianPruner, and one name, ``width``, for both architectures' width (with their own
    ranges). One process of two, one torch thread each, sharing a journal study."""
    import optuna
    import torch
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from torch import nn

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    train_loader, val_loader, length, classes = plain_loaders(data_path)

    def objective(trial: optuna.Trial) -> float:
        arch = trial.suggest_categorical("architecture", ["mlp", "cnn1d"])
        width = trial.suggest_int("width", *QUALITY_WIDTH[arch], log=True)
        lr = trial.suggest_float("lr", *QUALITY_LR, log=True)
        cfg = ({"architecture": "mlp", "hidden": width, "depth": 1} if arch == "mlp" else
               {"architecture": "cnn1d", "channels": width, "depth": 2, "kernel_size": 5})
        torch.manual_seed(trial.number)
        model = plain_model(cfg, length, classes)
        criterion = nn.CrossEntropyLoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        best = -math.inf
        for epoch in range(epochs):
            model.train()
            for xb, yb in train_loader:
                optimizer.zero_grad()
                loss = criterion(model(xb), yb)
                loss.backward()
                optimizer.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for xb, yb in val_loader:
                    correct += (model(xb).argmax(1) == yb).sum().item()
            acc = correct / len(val_loader.dataset)
            best = max(best, acc)
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    storage = JournalStorage(JournalFileBackend(storage_path))
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=optuna.samplers.TPESampler(seed=seed),
                              pruner=optuna.pruners.MedianPruner())
    # Two processes share the budget: stop once the study has n_trials finished trials.
    study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(
        n_trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))])
    return study.best_value


FULL = Sizes(
    num_samples=5000, epochs=20, configs=CONFIGS, repeats=3,
    pruning_trials=24, pruning_seeds=(0, 1, 2),
    ckpt_hidden=3500, ckpt_epochs=5, ckpt_samples=1500, ckpt_repeats=3,
    scale_trials=1000, scale_window=100,
    gpu_trials=16, gpu_epochs=10,
)
QUICK = Sizes(
    num_samples=1000, epochs=2, configs=CONFIGS[-4:], repeats=1,
    pruning_trials=4, pruning_seeds=(0,),
    ckpt_hidden=256, ckpt_epochs=2, ckpt_samples=1000, ckpt_repeats=1,
    scale_trials=12, scale_window=4,
    gpu_trials=4, gpu_epochs=2, extras=False,
)


# ---------------------------------------------------------------- plain models and loops
# Written without hpsearch so the baselines import nothing of it; the layer stacks match
# hpsearch.models.MLP / CNN1d (checked by parameter count in `check_models`).


def plain_model(cfg: dict[str, Any], length: int, classes: int) -> Any:
    from torch import nn

    if cfg["architecture"] == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        width = length
        for _ in range(cfg["depth"]):
            layers += [nn.Linear(width, cfg["hidden"]), nn.ReLU(), nn.Dropout(0.0)]
            width = cfg["hidden"]
        return nn.Sequential(*layers, nn.Linear(width, classes))
    ch, k = cfg["channels"], cfg["kernel_size"]
    layers = [nn.Unflatten(1, (1, length))]
    in_ch = 1
    for i in range(cfg["depth"]):
        layers += [nn.Conv1d(in_ch, ch, k, stride=1 if i == 0 else 2, padding=k // 2), nn.ReLU()]
        in_ch = ch
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(ch, classes))


_DATA: dict[str, Any] = {}


def _data(path: str) -> Any:
    """The cached splits, loaded once per process."""
    import torch

    if path not in _DATA:
        _DATA[path] = torch.load(path, weights_only=True)
    return _DATA[path]


def bare_trial(cfg: dict[str, Any], data_path: str, epochs: int, seed: int) -> dict[str, float]:
    """One configuration, the floor: slices of in-memory tensors, no storage, no files."""
    import torch
    from torch.nn import functional as F

    started = time.time()
    d = _data(data_path)
    x, y, xv, yv = d["x_train"], d["y_train"], d["x_val"], d["y_val"]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = plain_model(cfg, x.shape[1], d["output_size"])
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    best = -math.inf
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        xs, ys = x[perm], y[perm]
        for s in range(0, len(ys), BATCH):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xs[s : s + BATCH]), ys[s : s + BATCH])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            best = max(best, (model(xv).argmax(1) == yv).float().mean().item())
    return {"seconds": time.perf_counter() - t0, "best": best, "started": started}


def bare_worker(cfg: dict[str, Any], data_path: str, epochs: int, seed: int,
                threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    return bare_trial(cfg, data_path, epochs, seed)


def plain_optuna_worker(storage_path: str, study_name: str, n_trials: int, data_path: str,
                        epochs: int, out_dir: str, threads: int | None, n_jobs: int) -> int:
    """The seed's training loop as an Optuna objective, written the way a user writes it.

    DataLoaders for both splits, ``loss.item()`` per batch, validation loss and accuracy, a
    deepcopy of the best weights and ``torch.save`` of model and optimizer state when the
    monitored metric improves, the best weights restored at the end, ``trial.report`` per
    epoch. ``threads=None`` leaves torch at its default; ``n_jobs`` is ``study.optimize``'s.
    """
    import copy

    import optuna
    import torch
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from torch import nn

    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    train_loader, val_loader, length, classes = plain_loaders(data_path)

    def objective(trial: optuna.Trial) -> float:
        arch = trial.suggest_categorical("architecture", ["mlp", "cnn1d"])
        if arch == "mlp":
            cfg = {"hidden": trial.suggest_int("hidden", 32, 512),
                   "depth": trial.suggest_int("depth", 1, 4)}
        else:
            cfg = {"channels": trial.suggest_int("channels", 8, 64),
                   "depth": trial.suggest_int("depth", 1, 4),
                   "kernel_size": trial.suggest_categorical("kernel_size", [3, 5, 7])}
        torch.manual_seed(trial.number)
        model = plain_model({"architecture": arch, **cfg}, length, classes)
        criterion = nn.CrossEntropyLoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        best_acc = -math.inf
        best_weights = copy.deepcopy(model.state_dict())
        for epoch in range(epochs):
            model.train()
            train_loss = 0.0
            for xb, yb in train_loader:
                optimizer.zero_grad()
                loss = criterion(model(xb), yb)
                loss.backward()
                optimizer.step()
                train_loss += loss.item()
            model.eval()
            val_loss, correct = 0.0, 0
            with torch.no_grad():
                for xb, yb in val_loader:
                    out = model(xb)
                    val_loss += criterion(out, yb).item()
                    correct += (out.argmax(1) == yb).sum().item()
            acc = correct / len(val_loader.dataset)
            if acc > best_acc:
                best_acc = acc
                best_weights = copy.deepcopy(model.state_dict())
                torch.save({"epoch": epoch, "model_state_dict": model.state_dict(),
                            "optimizer_state_dict": optimizer.state_dict(), "val_acc": acc,
                            "val_loss": val_loss / len(val_loader)},
                           os.path.join(out_dir, f"trial{trial.number}-best.pth"))
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        model.load_state_dict(best_weights)
        return best_acc

    storage = JournalStorage(JournalFileBackend(storage_path))
    # load_study does not restore the pruner; Optuna's default (median) would prune here.
    study = optuna.load_study(study_name=study_name, storage=storage,
                              pruner=optuna.pruners.NopPruner())
    study.optimize(objective, n_trials=n_trials, n_jobs=n_jobs)
    return n_trials


# ---------------------------------------------------------------- helpers


def spawn_pool(n: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"))


def cores() -> int:
    return os.cpu_count() or 1


class CpuMeter(threading.Thread):
    """CPU seconds used by this process and every process below it while it runs.

    Descendants are sampled from /proc ten times a second (a process loses at most its last
    0.1 s); unlike RUSAGE_CHILDREN this does not depend on who reaps the workers. CPU time
    is a cross-check for wall time on a machine shared with other jobs.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: dict[int, float] = {}
        self.before: dict[int, float] = {}
        self.seconds = math.nan
        self._done = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._own = 0.0

    @staticmethod
    def _children(pid: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                out += [int(p) for p in task.read_text().split()]
            except OSError:
                pass
        return out

    def _sample(self) -> None:
        todo = self._children(os.getpid())
        while todo:
            pid = todo.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            cpu = (int(fields[11]) + int(fields[12])) / self._tick
            self.seen[pid] = max(cpu, self.seen.get(pid, 0.0))
            todo += self._children(pid)

    def __enter__(self) -> CpuMeter:
        self._own = time.process_time()
        self._sample()
        self.before = dict(self.seen)
        self.start()
        return self

    def run(self) -> None:
        while not self._done.wait(0.1):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()
        self._sample()
        self.seconds = time.process_time() - self._own + sum(
            v - self.before.get(pid, 0.0) for pid, v in self.seen.items())


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ts(d: dt.datetime | None) -> float:
    return d.timestamp() if d is not None else math.nan


def disk_usage(folder: Path) -> tuple[int, int]:
    """(bytes allocated, counting each inode once; apparent bytes)."""
    seen, blocks, apparent = set(), 0, 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            blocks += st.st_blocks * 512
            apparent += st.st_size
    return blocks, apparent


def base_config(name: str, sizes: Sizes, **sections: Any) -> dict[str, Any]:
    """A study mapping for the fixed-configuration runs; sections override whole keys."""
    raw: dict[str, Any] = {
        "study": {"name": name, "metric": "val_acc", "direction": "maximize",
                  "n_trials": len(sizes.configs), "sampler": {"name": "random", "seed": 0},
                  "pruner": {"name": "none"}, "enqueue": [dict(c) for c in sizes.configs]},
        "data": {"name": "mnist1d",
                 "args": {"num_samples": sizes.num_samples, "seed": 42, "shuffle_seq": False}},
        "model": {"architecture": {
            "mlp": {"hidden": {"type": "int", "low": 32, "high": 512},
                    "depth": {"type": "int", "low": 1, "high": 4}},
            "cnn1d": {"channels": {"type": "int", "low": 8, "high": 64},
                      "depth": {"type": "int", "low": 1, "high": 4},
                      "kernel_size": {"type": "categorical", "choices": [3, 5, 7]}},
        }},
        "train": {"max_epochs": sizes.epochs, "lr": LR, "batch_size": BATCH,
                  "lr_scheduler": {"name": "none"}, "early_stopping": None},
        "checkpoint": {"save": "best", "keep_top_k_trials": 5},
        "resources": {"devices": "cpu", "workers": 2},
        "report": {"enabled": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


@dataclass
class Run:
    """One hpsearch run: wall time and the study it left."""

    wall: float
    cpu: float
    started: float
    ended: float
    study: Any
    results_dir: Path


class Bench:
    def __init__(self, sizes: Sizes, work: Path, log: Any) -> None:
        self.sizes, self.work, self.log = sizes, work, log
        self.data_path = work / f"data-{sizes.num_samples}.pt"
        self.results: dict[str, Any] = {}
        self.notes: list[str] = []
        self.last_two_workers: Run | None = None

    def two_workers(self, name: str) -> Run:
        """The fixed configurations through hpsearch with 2 workers (reused by --quick)."""
        if not self.sizes.extras and self.last_two_workers is not None:
            return self.last_two_workers
        self.last_two_workers = self.run_hpsearch(base_config(name, self.sizes))
        return self.last_two_workers

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    # ------------------------------------------------------------ data

    def data_file(self, num_samples: int) -> Path:
        """The MNIST-1D splits of that size, built once; every contender reads these tensors."""
        import torch

        from hpsearch import data as data_mod
        from hpsearch.config import parse_config

        path = self.work / f"data-{num_samples}.pt"
        if path.exists():
            return path
        raw = base_config("data", self.sizes)
        raw["data"]["args"]["num_samples"] = num_samples
        cfg = parse_config(raw, "bench").data
        t0 = time.perf_counter()
        ds = data_mod.build(cfg)
        seconds = round(time.perf_counter() - t0, 3)
        torch.save(data_mod.to_payload(ds), path)
        sizes = {k: len(v[1]) for k, v in ds.splits.items()}
        self.results.setdefault("data", {})[str(num_samples)] = {"splits": sizes,
                                                                 "build_seconds": seconds}
        self.say(f"data: MNIST-1D {sizes}, built in {seconds} s (once; copied into each "
                 "study's cache so no contender pays for it)")
        return path

    def prepare_data(self) -> None:
        self.data_file(self.sizes.num_samples)

    def check_models(self) -> None:
        """The bare models are the same size as hpsearch's."""
        from hpsearch.models import build_model, count_parameters

        for cfg in self.sizes.configs:
            params = {k: v for k, v in cfg.items() if k != "architecture"}
            ours = count_parameters(build_model(cfg["architecture"], params, (40,), 10))
            bare = count_parameters(plain_model(cfg, 40, 10))
            if ours != bare:
                raise RuntimeError(f"bare model differs from hpsearch's for {cfg}: {bare} "
                                   f"vs {ours} parameters")

    # ------------------------------------------------------------ contenders

    def run_hpsearch(self, raw: dict[str, Any]) -> Run:
        from hpsearch import data as data_mod
        from hpsearch.config import parse_config
        from hpsearch.run import run_config
        from hpsearch.run.progress import Printer

        cfg = parse_config(raw, "bench")
        root = self.work / "runs"
        results_dir = root / cfg.study.name
        shutil.rmtree(results_dir, ignore_errors=True)
        cache = data_mod.cache_path(cfg.data, results_dir / "data")
        cache.parent.mkdir(parents=True)
        shutil.copyfile(self.data_file(int(cfg.data.args["num_samples"])), cache)
        with open(self.work / f"{cfg.study.name}.out", "w") as sink:
            started = time.time()
            with CpuMeter() as meter:
                t0 = time.perf_counter()
                result = run_config(cfg, root, source="bench",
                                    printer=Printer(cfg.study.metric, stream=sink))
                wall = time.perf_counter() - t0
            cpu = meter.seconds
        if result.exit_code != 0:
            raise RuntimeError(f"hpsearch run {cfg.study.name} exited {result.exit_code}; "
                               f"see {results_dir / 'run.log'}")
        return Run(wall, cpu, started, started + wall, result.study, results_dir)

    def run_bare(self, workers: int, threads: int | None = None) -> tuple[float, float, float]:
        """(wall, CPU, summed training seconds) of the configs over ``workers`` processes."""
        threads = threads or max(1, cores() // workers)
        started = time.time()
        with CpuMeter() as meter:
            t0 = time.perf_counter()
            with spawn_pool(workers) as pool:
                futures = [pool.submit(bare_worker, cfg, str(self.data_path), self.sizes.epochs,
                                       i, threads) for i, cfg in enumerate(self.sizes.configs)]
                outs = [f.result() for f in futures]
                # Stop at the last result: interpreter teardown of the pool is not training.
                wall = time.perf_counter() - t0
        self.bare_startup = min(o["started"] for o in outs) - started
        return (wall, meter.seconds,
                sum(o["seconds"] for o in outs))

    def run_plain_optuna(self, processes: int, n_jobs: int, threads: int | None,
                         timeout: float | None = None) -> float:
        """Wall seconds of the plain script over 2 workers (``processes`` x ``n_jobs``), or
        inf when it ran past ``timeout`` (its processes are killed)."""
        from concurrent.futures import wait

        import optuna
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        folder = self.work / f"plain-optuna-{processes}x{n_jobs}-{threads or 'default'}"
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "ckpt").mkdir(parents=True)
        storage_path = str(folder / "journal.log")
        n = len(self.sizes.configs)
        t0 = time.perf_counter()
        study = optuna.create_study(
            study_name="plain", direction="maximize",
            storage=JournalStorage(JournalFileBackend(storage_path)),
            sampler=optuna.samplers.RandomSampler(seed=0))
        for cfg in self.sizes.configs:
            study.enqueue_trial(cfg)
        shares = [n // processes + (i < n % processes) for i in range(processes)]
        pool = spawn_pool(processes)
        try:
            futures = [pool.submit(plain_optuna_worker, storage_path, "plain", share,
                                   str(self.data_path), self.sizes.epochs,
                                   str(folder / "ckpt"), threads, n_jobs)
                       for share in shares]
            _, late = wait(futures, timeout=timeout)
            if late:
                for proc in list((pool._processes or {}).values()):
                    proc.kill()  # only the processes this pool started
                return math.inf
            for f in futures:
                f.result()
            wall = time.perf_counter() - t0
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
        if len(done) != n:
            raise RuntimeError(f"plain Optuna completed {len(done)} of {n} trials")
        return wall

    # ------------------------------------------------------------ measurements

    def overhead(self) -> None:
        s = self.sizes
        bare, bare_cpu, bare_train, hp, hp_cpu, runs, starts = [], [], [], [], [], [], []
        for rep in range(s.repeats):
            wall, cpu, train = self.run_bare(2)
            bare.append(wall)
            bare_cpu.append(cpu)
            bare_train.append(train)
            starts.append(self.bare_startup)
            # A fresh study name each time: a finished run's study object stays readable.
            run = self.two_workers(f"overhead-{rep}")
            hp.append(run.wall)
            hp_cpu.append(run.cpu)
            runs.append(run)
            self.say(f"overhead rep {rep}: bare {wall:.2f} s wall / {cpu:.2f} s CPU (training "
                     f"{train:.2f} s summed), hpsearch {run.wall:.2f} s wall / {run.cpu:.2f} s "
                     f"CPU; load {os.getloadavg()[0]:.1f}")
        self.results["bare_seconds"] = [round(v, 3) for v in bare]
        self.results["bare_train_seconds_summed"] = round(median(bare_train), 3)
        self.results["bare_startup_seconds"] = round(median(starts), 3)
        self.results["hpsearch_seconds"] = [round(v, 3) for v in hp]
        # Each bare run is paired with the hpsearch run right after it; the median of the pair
        # ratios cancels slow changes in what else the machine is doing.
        self.results["overhead_ratio"] = round(median([h / b for h, b in zip(hp, bare)]), 3)
        # CPU seconds are less sensitive than wall time to other jobs sharing the machine.
        self.results["overhead_cpu_ratio"] = round(median(hp_cpu) / median(bare_cpu), 3)
        best_run = sorted(runs, key=lambda r: r.wall)[len(runs) // 2]
        self.results["overhead_breakdown"] = breakdown(best_run)
        if s.extras:
            # The same runs with last.pt after every epoch instead of the default throttle
            # (resume_min_seconds 10: these trials are shorter, so they write none).
            every = []
            for rep in range(s.repeats):
                wall = self.run_bare(2)[0]
                run = self.run_hpsearch(base_config(f"overhead-resume-{rep}", s, checkpoint={
                    "save": "best", "keep_top_k_trials": 5, "resume_min_seconds": 0}))
                every.append(run.wall / wall)
                self.say(f"overhead rep {rep}, last.pt every epoch: bare {wall:.2f} s, "
                         f"hpsearch {run.wall:.2f} s")
            self.results["overhead_ratio_resume_every_epoch"] = round(median(every), 3)

    def plain_optuna(self) -> None:
        # Headline: the script as written, with Optuna's own way to run 2 workers on one
        # machine (study.optimize(n_jobs=2)) and torch's default threads. Also reported: two
        # processes on one journal file at default threads (each takes every core, so they
        # oversubscribe), and the same with the cores split between them, as hpsearch does.
        variants = [("as_written", 1, 2, None, None)]
        if self.sizes.extras:
            variants += [("two_processes", 2, 1, None, 180.0),
                         ("same_threads", 2, 1, max(1, cores() // 2), None)]
        bare = self.results.get("bare_seconds")
        for key, processes, n_jobs, threads, cap in variants:
            plain = self.run_plain_optuna(processes, n_jobs, threads, timeout=cap)
            hp = self.two_workers(f"overhead-vs-plain-{key}").wall
            how = (f"{processes} process(es) x n_jobs {n_jobs}, "
                   f"{threads or 'default'} torch thread(s)")
            self.say(f"plain Optuna ({how}): "
                     + (f"{plain:.2f} s" if math.isfinite(plain) else f"over {cap:.0f} s")
                     + f"; hpsearch right after: {hp:.2f} s")
            name = "" if key == "as_written" else f"_{key}"
            finite = math.isfinite(plain)
            self.results[f"plain_optuna{name}_seconds"] = round(plain, 3) if finite \
                else f">{cap:.0f}"
            self.results[f"hpsearch_seconds_vs_plain{name}"] = round(hp, 3)
            self.results[f"vs_plain_optuna{name}_speedup"] = round(plain / hp, 3) if finite \
                else f">{cap / hp:.1f}"
            if bare and finite:
                # The reference: its plain script took 2.3x its bare loop.
                self.results[f"plain_optuna{name}_over_bare"] = round(plain / median(bare), 3)

    def scaling(self) -> None:
        n, ones, twos, bare = len(self.sizes.configs), [], [], []
        # The 1-worker run keeps the 2-worker runs' threads per worker: the ratio is the
        # parallel efficiency of adding a worker, not of adding intra-op threads.
        threads = max(1, cores() // 2)
        for rep in range(max(1, self.sizes.repeats - 1)):
            one = self.run_hpsearch(base_config(
                f"scaling-1-{rep}", self.sizes,
                resources={"devices": "cpu", "workers": 1, "torch_threads": threads}))
            two = self.two_workers(f"scaling-2-{rep}")
            ones.append(n / one.wall * 60)
            twos.append(n / two.wall * 60)
            self.say(f"scaling rep {rep}: 1 worker {one.wall:.2f} s ({ones[-1]:.1f} trials/min), "
                     f"2 workers {two.wall:.2f} s ({twos[-1]:.1f} trials/min)")
            if self.sizes.extras:
                # The same ratio for the bare loop: what fixed start-up costs allow anyway.
                bare.append(self.run_bare(1, threads)[0] / self.run_bare(2, threads)[0])
                self.say(f"scaling rep {rep}: bare loop 2 workers / 1 worker {bare[-1]:.3f}")
        self.results["trials_per_min_1_worker"] = [round(v, 2) for v in ones]
        self.results["trials_per_min_2_workers"] = [round(v, 2) for v in twos]
        self.results["scaling_2_workers"] = round(median([b / a for a, b in zip(ones, twos)]), 3)
        if bare:
            self.results["bare_scaling_2_workers"] = round(median(bare), 3)

    def dask(self) -> None:
        """The fixed configurations on a local Dask cluster: 1 and 2 one-thread Dask workers,
        and a local run with the same slots right after each 2-worker run."""
        try:
            import importlib

            from distributed import LocalCluster
        except ImportError:
            self.notes.append('dask skipped: Dask is not installed (pip install '
                              '"dask[distributed]")')
            self.say("dask: skipped (Dask is not installed)")
            return
        n, ones, twos, ratios, cpu = len(self.sizes.configs), [], [], [], []
        one_thread = {"devices": "cpu", "workers": "auto", "torch_threads": 1}

        def workers(client: Any, count: int) -> None:
            """Scale to ``count`` Dask workers; each imports hpsearch before it is timed, as
            the processes of a long-lived cluster have."""
            cluster.scale(count)
            end = time.monotonic() + 120
            while len(client.nthreads()) != count and time.monotonic() < end:
                time.sleep(0.2)
            client.run(importlib.import_module, "hpsearch.workers.worker")

        # One cluster (its scheduler in this process, as CPU of the Dask run), one or two
        # worker processes of one thread.
        with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0",
                          processes=True) as cluster, cluster.get_client() as client:
            client.run_on_scheduler(importlib.import_module, "hpsearch.workers.worker")
            address = cluster.scheduler_address
            for rep in range(max(1, self.sizes.repeats - 1)):
                workers(client, 1)
                one = self.run_hpsearch(base_config(
                    f"dask-1-{rep}", self.sizes, resources={**one_thread, "scheduler": address}))
                workers(client, 2)
                two = self.run_hpsearch(base_config(
                    f"dask-2-{rep}", self.sizes, resources={**one_thread, "scheduler": address}))
                local = self.run_hpsearch(base_config(
                    f"dask-local-{rep}", self.sizes,
                    resources={**one_thread, "workers": 2}))
                ones.append(n / one.wall * 60)
                twos.append(n / two.wall * 60)
                ratios.append(two.wall / local.wall)
                # CPU seconds of every process (the Dask workers are this one's children) feel
                # other jobs on the machine less than wall time does.
                cpu.append(two.cpu / local.cpu)
                self.say(f"dask rep {rep}: 1 Dask worker {one.wall:.2f} s, 2 Dask workers "
                         f"{two.wall:.2f} s, local 2 workers {local.wall:.2f} s; load "
                         f"{os.getloadavg()[0]:.1f}")
        self.results["dask_trials_per_min_1_worker"] = [round(v, 2) for v in ones]
        self.results["dask_trials_per_min_2_workers"] = [round(v, 2) for v in twos]
        self.results["dask_scaling_2_workers"] = round(
            median([b / a for a, b in zip(ones, twos)]), 3)
        self.results["dask_overhead_ratio"] = round(median(ratios), 3)
        self.results["dask_overhead_cpu_ratio"] = round(median(cpu), 3)

    def pruning(self) -> None:
        s = self.sizes
        fractions, gaps, per_seed = [], [], []
        for seed in s.pruning_seeds:
            out = {}
            for pruner in ({"name": "none"},
                           {"name": "hyperband", "min_resource": 1, "max_resource": s.epochs,
                            "reduction_factor": 3}):
                raw = base_config(
                    f"pruning-{pruner['name']}-{seed}", s,
                    study={"n_trials": s.pruning_trials, "enqueue": [],
                           "sampler": {"name": "tpe", "seed": seed}, "pruner": pruner},
                    train={"max_epochs": s.epochs,
                           "lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
                           "batch_size": BATCH, "lr_scheduler": {"name": "none"},
                           "early_stopping": None},
                    model={"architecture": {
                        "mlp": {"hidden": {"type": "int", "low": 32, "high": 256, "log": True},
                                "depth": {"type": "int", "low": 1, "high": 3}},
                        "cnn1d": {"channels": {"type": "int", "low": 8, "high": 32,
                                               "log": True},
                                  "depth": {"type": "int", "low": 1, "high": 3},
                                  "kernel_size": {"type": "categorical",
                                                  "choices": [3, 5, 7]}}}},
                )
                run = self.run_hpsearch(raw)
                trials = run.study.get_trials(deepcopy=False)
                epochs = sum(len(t.user_attrs.get("history", [])) for t in trials)
                pruned = sum(t.state.name == "PRUNED" for t in trials)
                out[pruner["name"]] = {"epochs": epochs, "best": run.study.best_value,
                                       "pruned": pruned, "seconds": round(run.wall, 2)}
            none, hb = out["none"], out["hyperband"]
            fractions.append(hb["epochs"] / none["epochs"])
            gaps.append((none["best"] - hb["best"]) / abs(none["best"]))
            per_seed.append({"seed": seed, **{f"{k}_{m}": v for k, r in out.items()
                                              for m, v in r.items()}})
            self.say(f"pruning seed {seed}: epochs {hb['epochs']}/{none['epochs']}, best "
                     f"{hb['best']:.4f} vs {none['best']:.4f}, {hb['pruned']} pruned")
        self.results["pruning_epoch_fraction"] = round(median(fractions), 3)
        self.results["pruning_best_gap"] = round(median(gaps), 4)
        self.results["pruning_per_seed"] = per_seed

    def search_quality(self) -> None:
        """Search quality at equal trials: hpsearch's defaults against the plain script, on a
        space where two architectures share a parameter name (issue 14)."""
        s = self.sizes
        n_trials, epochs = (16, 20) if s.extras else (4, 2)
        seeds = (0, 1, 2, 3, 4) if s.extras else (0,)
        hp_best, plain_best, hp_wall, plain_wall = [], [], [], []
        for seed in seeds:
            raw = base_config(
                f"quality-{seed}", s,
                study={"n_trials": n_trials, "enqueue": [], "sampler": {"name": "tpe",
                       "seed": seed}, "pruner": {"name": "median"}},
                train={"max_epochs": epochs, "lr": {"type": "float", "low": QUALITY_LR[0],
                       "high": QUALITY_LR[1], "log": True}, "batch_size": BATCH},
                model={"architecture": {
                    "mlp": {"hidden": {"type": "int", "low": QUALITY_WIDTH["mlp"][0],
                                       "high": QUALITY_WIDTH["mlp"][1], "log": True},
                            "depth": 1},
                    "cnn1d": {"channels": {"type": "int", "low": QUALITY_WIDTH["cnn1d"][0],
                                           "high": QUALITY_WIDTH["cnn1d"][1], "log": True},
                              "depth": 2, "kernel_size": 5}}},
            )
            # hpsearch's defaults otherwise: plateau LR, early stopping, TPE multivariate,
            # pruning within an architecture, min_trials_per_architecture 4.
            del raw["train"]["lr_scheduler"], raw["train"]["early_stopping"]
            run = self.run_hpsearch(raw)
            hp_best.append(run.study.best_value)
            hp_wall.append(run.wall)
            plain_best.append(self.run_plain_search(f"quality-plain-{seed}", n_trials, epochs,
                                                    seed, plain_wall))
            self.say(f"search quality seed {seed}: hpsearch {hp_best[-1]:.4f} in "
                     f"{hp_wall[-1]:.1f} s, plain {plain_best[-1]:.4f} in {plain_wall[-1]:.1f} s")
        self.results["search_quality_vs_plain"] = round(median(hp_best) / median(plain_best), 4)
        self.results["search_wall_ratio_vs_plain"] = round(sum(hp_wall) / sum(plain_wall), 3)
        self.results["search_quality_per_seed"] = [
            {"seed": sd, "hpsearch_best": round(h, 4), "plain_best": round(p, 4),
             "hpsearch_seconds": round(hw, 1), "plain_seconds": round(pw, 1)}
            for sd, h, p, hw, pw in zip(seeds, hp_best, plain_best, hp_wall, plain_wall)]

    def run_plain_search(self, name: str, n_trials: int, epochs: int, seed: int,
                         walls: list[float]) -> float:
        import optuna
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        folder = self.work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        storage_path = str(folder / "journal.log")
        study = optuna.create_study(study_name=name, direction="maximize",
                                    storage=JournalStorage(JournalFileBackend(storage_path)))
        t0 = time.perf_counter()
        with spawn_pool(2) as pool:
            futures = [pool.submit(plain_search_worker, storage_path, name, n_trials,
                                   str(self.data_path), epochs, seed + 1000 * i)
                       for i in range(2)]
            for f in futures:
                f.result()
        walls.append(time.perf_counter() - t0)
        return study.best_value

    def architecture_fidelity(self) -> None:
        """The example study's space, 24 trials at three sampler seeds: how far below its
        tuned reference the report puts each architecture (seed-mean test_acc), and what share
        of the unpruned epoch budget the search spent."""
        import yaml

        s = self.sizes
        n_trials, seeds = (24, (0, 1, 2)) if s.extras else (4, (0,))
        references = self.references()
        shortfalls, fractions, per_run = [], [], []
        for seed in seeds:
            raw = yaml.safe_load(EXAMPLE.read_text())
            raw["study"].update({"name": f"fidelity-{seed}", "n_trials": n_trials,
                                 "sampler": {"name": "tpe", "seed": seed}})
            raw["data"]["args"]["num_samples"] = s.num_samples
            raw["resources"] = {"devices": "cpu", "workers": 2}
            if not s.extras:
                raw["train"]["max_epochs"] = s.epochs
                raw["report"]["seeds"] = 1
            run = self.run_hpsearch(raw)
            rows = {r["architecture"]: r for r in csv.DictReader(
                open(run.results_dir / "architectures.csv"))}
            reported = {a: float(rows[a]["seed_mean_test_acc"] or "nan") for a in references}
            gaps = {a: round(references[a] - reported[a], 4) for a in references}
            trials = run.study.get_trials(deepcopy=False)
            epochs = sum(len(t.user_attrs.get("history", [])) for t in trials)
            fraction = epochs / (len(trials) * raw["train"]["max_epochs"])
            shortfalls.append(max(gaps.values()))
            fractions.append(fraction)
            per_run.append({"seed": seed, "reported": reported, "shortfall": gaps,
                            "epochs_fraction": round(fraction, 3),
                            "trials_per_architecture": {a: sum(
                                t.params.get("architecture") == a for t in trials)
                                for a in references}})
            self.say(f"fidelity seed {seed}: shortfall {gaps}, epochs fraction {fraction:.3f}")
        self.results["architecture_ranking_fidelity"] = max(shortfalls)
        self.results["epochs_fraction"] = round(max(fractions), 3)
        self.results["architecture_fidelity_runs"] = per_run
        self.results["architecture_references"] = references

    def reference_search(self) -> None:
        """How REFERENCE was found (run once, not part of the default steps): each
        architecture of the example study alone, 12 TPE trials over the example's own ranges,
        no pruning; prints each one's best configuration."""
        import yaml

        s = self.sizes
        raw = yaml.safe_load(EXAMPLE.read_text())
        found = {}
        for arch, space in raw["model"]["architecture"].items():
            study = {**raw, "study": {**raw["study"], "name": f"reference-search-{arch}",
                                      "n_trials": 12 if s.extras else 2,
                                      "pruner": {"name": "none"}},
                     "model": {"architecture": {arch: space or {}}},
                     "resources": {"devices": "cpu", "workers": 2},
                     "report": {"enabled": False}}
            study["data"] = {**raw["data"], "args": {**raw["data"]["args"],
                                                     "num_samples": s.num_samples}}
            if not s.extras:
                study["train"] = {**raw["train"], "max_epochs": s.epochs}
            run = self.run_hpsearch(study)
            best = run.study.best_trial
            found[arch] = {"params": {k.split(".", 1)[-1]: v for k, v in best.params.items()
                                      if k != "architecture"},
                           "val_acc": round(best.value, 4)}
            self.say(f"reference search {arch}: {found[arch]}")
        self.results["reference_search"] = found

    def references(self) -> dict[str, float]:
        """Seed-mean test_acc of each architecture's fixed reference configuration."""
        import yaml

        s = self.sizes
        raw = yaml.safe_load(EXAMPLE.read_text())
        out = {}
        for arch, cfg in REFERENCE.items():
            params = {k: v for k, v in cfg.items()
                      if k not in ("lr", "weight_decay")}
            study = {**raw, "study": {**raw["study"], "name": f"reference-{arch}",
                                      "n_trials": 1, "pruner": {"name": "none"},
                                      "enqueue": []},
                     "model": {"architecture": {arch: params}},
                     "train": {**raw["train"], "lr": cfg["lr"],
                               "weight_decay": cfg["weight_decay"]},
                     "resources": {"devices": "cpu", "workers": 1},
                     "report": {"enabled": True, "seeds": 3 if s.extras else 1}}
            study["data"] = {**raw["data"], "args": {**raw["data"]["args"],
                                                     "num_samples": s.num_samples}}
            if not s.extras:
                study["train"]["max_epochs"] = s.epochs
            run = self.run_hpsearch(study)
            row = next(csv.DictReader(open(run.results_dir / "architectures.csv")))
            out[arch] = round(float(row["seed_mean_test_acc"]), 4)
            self.say(f"reference {arch}: seed-mean test_acc {out[arch]}")
        return out

    def checkpointing(self) -> None:
        """A wide MLP (~50 MB of weights) whose val_loss improves nearly every epoch."""
        s = self.sizes

        def raw(name: str, save: str, resume_every: int) -> dict[str, Any]:
            return base_config(
                name, s,
                study={"n_trials": 1, "enqueue": [], "metric": "val_loss",
                       "direction": "minimize"},
                data={"args": {"num_samples": s.ckpt_samples, "seed": 42,
                               "shuffle_seq": False}},
                model={"architecture": {"mlp": {"hidden": s.ckpt_hidden, "depth": 2}}},
                train={"max_epochs": s.ckpt_epochs, "lr": 1e-4, "batch_size": BATCH,
                       "lr_scheduler": {"name": "none"}, "early_stopping": None},
                # last.pt after every epoch in every arm, not at the default time throttle.
                checkpoint={"save": save, "keep_top_k_trials": 5,
                            "resume_every_n_epochs": resume_every, "resume_min_seconds": 0},
                # One trial on this machine's default layout: a 1-thread worker per core.
                resources={"devices": "cpu", "workers": 1, "torch_threads": 1},
            )

        variants = {"best": ("best", 1), "none": ("none", 1)}
        if s.extras:
            variants["none_no_resume"] = ("none", 10**6)
        per_epoch: dict[str, list[float]] = {k: [] for k in variants}
        improved = 0
        n_params = 0
        for rep in range(s.ckpt_repeats):
            for key, (save, every) in variants.items():
                run = self.run_hpsearch(raw(f"ckpt-{key}", save, every))
                (t,) = run.study.get_trials(deepcopy=False)
                epochs = len(t.user_attrs["history"])
                per_epoch[key].append((ts(t.datetime_complete) - ts(t.datetime_start)) / epochs)
                n_params = t.user_attrs["n_params"]
                if save == "best":
                    losses = [h["val_loss"] for h in t.user_attrs["history"]]
                    improved = sum(1 for i, v in enumerate(losses) if v < min(losses[:i],
                                                                             default=math.inf))
            self.say("checkpoint rep {}: s/epoch {}".format(
                rep, ", ".join(f"{k} {v[-1]:.3f}" for k, v in per_epoch.items())))
        med = {k: median(v) for k, v in per_epoch.items()}
        self.results["checkpoint_model_mb"] = round(n_params * 4 / 2**20, 1)
        self.results["checkpoint_improved_epochs"] = f"{improved}/{s.ckpt_epochs}"
        self.results["checkpoint_seconds_per_epoch"] = {
            k: [round(x, 3) for x in v] for k, v in per_epoch.items()}
        # Medians of ratios within a repetition (the variants of one repetition run back to back).
        self.results["checkpoint_overhead_ratio"] = round(
            median([a / b for a, b in zip(per_epoch["best"], per_epoch["none"])]), 3)
        if "none_no_resume" in med:
            self.results["resume_state_overhead_ratio"] = round(median(
                [a / b for a, b in zip(per_epoch["none"], per_epoch["none_no_resume"])]), 3)

    def scale(self) -> None:
        s = self.sizes
        keep = 5
        raw = base_config(
            "scale", s,
            study={"n_trials": s.scale_trials, "enqueue": [],
                   "sampler": {"name": "random", "seed": 0}},
            model={"architecture": {"linear": {}, "mlp": {"hidden": 16, "depth": 1}}},
            train={"max_epochs": 1, "lr": {"type": "float", "low": 1e-4, "high": 1e-1,
                                           "log": True},
                   "batch_size": 512, "lr_scheduler": {"name": "none"}, "early_stopping": None},
            checkpoint={"save": "best", "keep_top_k_trials": keep},
        )
        run = self.run_hpsearch(raw)
        trials = run.study.get_trials(deepcopy=False)
        done = sorted(ts(t.datetime_complete) for t in trials if t.datetime_complete)
        w = s.scale_window
        first = (w - 1) / (done[w - 1] - done[0])
        last = (w - 1) / (done[-1] - done[-w])
        allocated, apparent = disk_usage(run.results_dir)
        trial_root = run.results_dir / "trials"
        holders = [p for p in trial_root.iterdir() if any(p.glob("*.pt"))]
        bound = keep + len(raw["model"]["architecture"])
        journal = (run.results_dir / "journal.log").stat().st_size
        self.results.update({
            "scale_trials": len(done),
            "scale_seconds": round(run.wall, 2),
            "scale_rate_first": round(first, 2),
            "scale_rate_last": round(last, 2),
            "scale_rate_ratio": round(last / first, 3),
            "scale_disk_bytes": allocated,
            "scale_disk_apparent_bytes": apparent,
            "scale_journal_bytes": journal,
            "scale_trial_folders": sum(1 for _ in trial_root.iterdir()),
            "scale_folders_with_checkpoints": len(holders),
            "scale_checkpoint_bound": bound,
            "scale_disk_bounded": len(holders) <= bound,
        })
        self.say(f"scale: {len(done)} trials in {run.wall:.1f} s, {first:.1f} -> {last:.1f} "
                 f"trials/s; {len(holders)} trial folders hold checkpoints (bound {bound}); "
                 f"{allocated / 2**20:.1f} MiB on disk, journal {journal / 2**20:.1f} MiB")

    def gpu(self) -> None:
        import torch

        if not torch.cuda.is_available():
            self.results["gpu"] = {"skipped": "no CUDA device visible; run scripts/gpu_check.sh "
                                   "on a GPU machine"}
            self.say("gpu: skipped (no CUDA device)")
            return
        s = self.sizes
        out: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
        for tpd in (1, 2, 4):
            raw = base_config(
                f"gpu-tpd{tpd}", s,
                study={"n_trials": s.gpu_trials, "enqueue": [],
                       "sampler": {"name": "random", "seed": 0}},
                model={"architecture": {"cnn1d": {
                    "channels": {"type": "int", "low": 32, "high": 128},
                    "depth": 3, "kernel_size": 5}}},
                train={"max_epochs": s.gpu_epochs, "lr": LR, "batch_size": BATCH,
                       "lr_scheduler": {"name": "none"}, "early_stopping": None},
                resources={"devices": ["cuda:0"], "trials_per_device": tpd, "workers": "auto"},
            )
            sampler = GpuSampler()
            sampler.start()
            try:
                run = self.run_hpsearch(raw)
            finally:
                util = sampler.stop()
            rate = s.gpu_trials / run.wall * 60
            out[f"trials_per_device_{tpd}"] = {
                "seconds": round(run.wall, 2), "trials_per_min": round(rate, 2),
                "gpu_util_mean": round(statistics.fmean(util), 1) if util else None,
                "gpu_util_samples": len(util)}
            self.say(f"gpu trials_per_device={tpd}: {rate:.1f} trials/min, "
                     f"util {out[f'trials_per_device_{tpd}']['gpu_util_mean']}%")
        self.results["gpu"] = out


class GpuSampler(threading.Thread):
    """Samples GPU 0's utilization with nvidia-smi twice a second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.values: list[float] = []
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                text = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                     "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.values.append(float(text.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass

    def stop(self) -> list[float]:
        self._stop.set()
        self.join(timeout=10)
        return self.values


def breakdown(run: Run) -> dict[str, float]:
    """Where an hpsearch run's wall time goes, from the trials' own time stamps.

    startup: run start -> first trial claimed; in_trial: per trial, (claim -> tell) minus the
    training loop's own seconds; between: per worker, tell -> next claim; tail: last tell ->
    run_config returned.
    """
    trials = [t for t in run.study.get_trials(deepcopy=False) if t.datetime_complete]
    starts = [ts(t.datetime_start) for t in trials]
    ends = [ts(t.datetime_complete) for t in trials]
    in_trial = [ts(t.datetime_complete) - ts(t.datetime_start)
                - float(t.user_attrs.get("train_seconds", 0.0)) for t in trials]
    by_worker: dict[str, list[Any]] = {}
    for t in trials:
        by_worker.setdefault(str(t.user_attrs.get("worker")), []).append(t)
    gaps = []
    for ts_ in by_worker.values():
        ts_.sort(key=lambda t: t.datetime_start)
        gaps += [ts(b.datetime_start) - ts(a.datetime_complete) for a, b in zip(ts_, ts_[1:])]
    epochs = sum(len(t.user_attrs.get("history", [])) for t in trials)
    return {
        "wall_seconds": round(run.wall, 3),
        "startup_seconds": round(min(starts) - run.started, 3),
        "tail_seconds": round(run.ended - max(ends), 3),
        "train_seconds_summed": round(sum(float(t.user_attrs.get("train_seconds", 0.0))
                                          for t in trials), 3),
        "in_trial_overhead_ms_per_trial": round(1000 * statistics.fmean(in_trial), 1),
        "in_trial_overhead_ms_median": round(1000 * statistics.median(in_trial), 1),
        "in_trial_overhead_ms_per_epoch": round(1000 * sum(in_trial) / max(epochs, 1), 1),
        "between_trials_ms": round(1000 * statistics.fmean(gaps), 1) if gaps else 0.0,
    }


# ---------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    import optuna
    import torch

    import hpsearch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": cores(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "hpsearch": str(Path(hpsearch.__file__).parent),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted_hpsearch_changes": bool(_git("status", "--porcelain", "hpsearch")),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def met(key: str, value: Any) -> bool | None:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return None
    op, target, _ = TARGETS[key]
    return value <= target if op == "<=" else value >= target


def write_outputs(out: Path, results: dict[str, Any], info: dict[str, Any], mode: str,
                  seconds: float, notes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"mode": mode, "machine": info, "total_seconds": round(seconds, 1),
           "targets": {k: {"op": op, "target": t, "met": met(k, results.get(k))}
                       for k, (op, t, _) in TARGETS.items()},
           **results}
    (out / "bench.json").write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")

    rows = ["| metric | value | target | met? | meaning |", "|---|---|---|---|---|"]
    for key, (op, target, meaning) in TARGETS.items():
        value = results.get(key, "not run")
        ok = met(key, value)
        mark = "n/a" if ok is None else ("yes" if ok else "**no**")
        rows.append(f"| `{key}` | {value} | {op} {target} | {mark} | {meaning} |")
    extra = [f"- `{k}`: {json.dumps(v)}" for k, v in results.items() if k not in TARGETS]
    load = results.get("load_average_at_start", {})
    busy = {k: v for k, v in load.items() if v > info["cores"]}
    shared = (
        f"Other jobs shared the machine during this run: the 1-minute load average exceeded "
        f"the {info['cores']} cores at the start of {', '.join(sorted(busy))}. Wall-time "
        "ratios come from back-to-back pairs to limit the damage; `overhead_cpu_ratio` "
        "(CPU seconds of all processes) is the cross-check."
        if busy else "The machine was otherwise idle (load average below the core count).")
    text = f"""# hpsearch benchmark

`python scripts/bench.py{' --quick' if mode == 'quick' else ''}` ({mode} mode), {seconds:.0f} s, \
hpsearch at commit {info.get('commit') or '?'}\
{' with uncommitted changes' if info.get('uncommitted_hpsearch_changes') else ''}.

{chr(10).join(rows)}

Machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu'] or 'none'}; Python \
{info['python']}, torch {info['torch']}, optuna {info['optuna']}; {info['date']}.
{shared}

## How it is measured

- The same MNIST-1D splits (built once) feed every contender; each hpsearch study gets them
  pre-copied into its data cache, so dataset generation is outside every timing.
- Fixed configurations: {len(CONFIGS)} MLP / 1-D CNN settings, {FULL.epochs} epochs each
  (full mode), Adam lr {LR}, batch {BATCH}, no scheduler, no early stopping, 2 workers of
  1 torch thread. hpsearch runs them as `study.enqueue` trials with journal storage, best
  checkpoints, per-epoch `trial.report`, no pruning, defaults otherwise: its workers are
  forked (`resources.start_method: auto`) and `last.pt` is written at most every
  `resume_min_seconds` (10 s; these trials are shorter, so none is written).
  `overhead_ratio_resume_every_epoch` is the same with `resume_min_seconds: 0` (`last.pt`
  after every epoch), each against its own bare run. hpsearch's wall time is
  `run_config(...)` from call to return, in a process that has already imported hpsearch.
- Bare loop: plain `nn.Sequential` models of the same size (checked by parameter count),
  Adam, one permutation per epoch and index slicing, per-epoch validation, no storage; a
  spawn-started pool of 2 processes takes the configurations in the same order. Wall time
  from creating the pool to the last result (process start included, teardown not).
  `overhead_ratio` is the median over {FULL.repeats} back-to-back (bare, hpsearch) pairs.
- Plain Optuna: the seed's training loop (`saving-best-model.md`) as an Optuna objective:
  `DataLoader(TensorDataset)` for both splits, `loss.item()` per batch, validation loss and
  accuracy, `copy.deepcopy` of the best weights and `torch.save` of model and optimizer
  state on improvement, best weights restored, `trial.report` per epoch; the same enqueued
  configurations on one journal file, each run followed by an hpsearch run (the pair's
  ratio). Headline `vs_plain_optuna_speedup`: the script as written and run the plain-Optuna
  way, `study.optimize(n_jobs=2)` in one process at torch's default threads.
  `vs_plain_optuna_two_processes_speedup`: two processes sharing the journal, default
  threads (each takes every core; capped at 180 s). `vs_plain_optuna_same_threads_speedup`:
  two processes with the cores split between them, as hpsearch does. `*_over_bare` relates
  each to the bare loop (the issue's reference plain script took 2.3x its bare loop).
- Scaling: the fixed configurations through hpsearch with `workers: 1` against
  `workers: 2`, the same torch threads per worker (cores // 2): the parallel efficiency of a
  second worker; median of back-to-back pairs. `bare_scaling_2_workers` is the same ratio for
  the bare loop, the ceiling that process start-up leaves on this amount of work.
- Pruning: {FULL.pruning_trials} TPE trials over an MLP/CNN space with lr searched,
  {FULL.epochs} epochs, 2 workers, hyperband (min_resource 1, max_resource {FULL.epochs},
  reduction factor 3) against no pruning; epochs = sum of the trials' `history` lengths;
  gap = (best without pruning - best with) / best without (val_acc, higher is better;
  negative: hyperband found better); medians over {len(FULL.pruning_seeds)} sampler seeds.
- Checkpointing: one trial of a 2x{FULL.ckpt_hidden} MLP (~50 MB of weights) on
  {FULL.ckpt_samples} MNIST-1D samples, 1 worker of 1 thread, val_loss improving every
  epoch; s/epoch from the trial's start/complete time stamps; `save: best` against
  `save: none` (both still write `last.pt` after every epoch: `resume_min_seconds: 0`),
  median of back-to-back pairs.
  `resume_state_overhead_ratio` compares `save: none` with and without `last.pt`.
- Scale: {FULL.scale_trials} one-epoch trials of tiny models (random sampler, 2 workers,
  keep_top_k_trials 5); rates from `datetime_complete` of the first and last
  {FULL.scale_window}; disk = every file under the study folder, hard links counted once.
- `overhead_breakdown` (the median hpsearch run): startup = run start to first claim
  (compare `bare_startup_seconds`, pool creation to the first configuration starting);
  in-trial = claim-to-tell minus the training loop's own `train_seconds` (the first trial of
  each worker also pays torch's lazy import of `torch._dynamo` on the first optimizer, as
  the bare loop does inside its training time);
  between = a worker's tell to its next claim; tail = last tell to `run_config` returning.
- Dask: the fixed configurations with `resources.scheduler` pointing at a local Dask
  cluster (`distributed.LocalCluster`, its scheduler in this process, scaled between 1 and 2
  one-thread worker processes; hpsearch imported in them before timing, as in a long-lived
  cluster): 1 Dask worker
  against 2 (`dask_scaling_2_workers`, trials/min), and each 2-worker run against a local run
  of 2 one-thread workers right after it (`dask_overhead_ratio`, wall time); medians over
  {max(1, FULL.repeats - 1)} repetitions. Skipped, with a note, where Dask is not installed.
- GPU: trials_per_device 1, 2, 4 on one GPU (trials/min, nvidia-smi utilization sampled
  twice a second); skipped without CUDA. `scripts/gpu_check.sh` runs it with `pytest -m gpu`.

## All values

{chr(10).join(extra)}
"""
    if notes:
        text += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "bench"),
                   help="where bench.json and README.md go (default results/bench/)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, under a minute")
    p.add_argument("--gpu-only", action="store_true", help="only the GPU measurement")
    p.add_argument("--only", help="comma-separated subset: overhead,plain_optuna,scaling,"
                   "pruning,checkpointing,scale,search_quality,architecture_fidelity,gpu,dask")
    p.add_argument("--merge", action="store_true",
                   help="keep the other measurements of the existing bench.json")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    args = p.parse_args(argv)

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sizes = QUICK if args.quick else FULL
    out = Path(args.out)
    steps = ["overhead", "plain_optuna", "scaling", "pruning", "checkpointing", "scale",
             "search_quality", "architecture_fidelity", "gpu", "dask"]
    if args.gpu_only:
        steps = ["gpu"]
    elif args.only:
        steps = [s for s in args.only.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="hpsearch-bench-"))
    t0 = time.perf_counter()
    failed = []
    with open(work / "bench.log", "w") as log:
        bench = Bench(sizes, work, log)
        bench.prepare_data()
        bench.check_models()
        for step in steps:
            t = time.perf_counter()
            bench.results.setdefault("load_average_at_start", {})[step] = round(
                os.getloadavg()[0], 2)
            try:
                getattr(bench, step)()
            except Exception as err:  # one broken measurement must not hide the others
                import traceback

                log.write(traceback.format_exc())
                failed.append(step)
                bench.notes.append(f"{step} failed: {type(err).__name__}: {err}")
                bench.say(f"{step} FAILED: {type(err).__name__}: {err}")
            bench.results.setdefault("step_seconds", {})[step] = round(time.perf_counter() - t, 1)
    seconds = time.perf_counter() - t0
    if args.merge and (out / "bench.json").exists():
        earlier = json.loads((out / "bench.json").read_text())
        kept = {k: v for k, v in earlier.items()
                if k not in ("mode", "machine", "total_seconds", "targets")}
        bench.results = {**kept, **bench.results}
        seconds += earlier.get("total_seconds", 0)
    write_outputs(out, bench.results, machine(), "quick" if args.quick else "full", seconds,
                  bench.notes)
    print(f"wrote {out / 'bench.json'} and {out / 'README.md'} in {seconds:.0f} s")
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
