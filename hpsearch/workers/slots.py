"""Device slots: how many workers, on which devices, with how many threads, started how.

Slots interleave devices (``cuda:0, cuda:1, cuda:0, cuda:1``), so a ``workers`` limit below
the slot count spreads the workers over every GPU instead of filling the first.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass
from typing import Any

import torch

from hpsearch.config import ResourcesSection


@dataclass(frozen=True)
class Slot:
    index: int
    device: str
    threads: int
    address: str | None = None
    """The Dask worker this slot runs on (``resources.scheduler``); None: this machine."""
    host: str | None = None
    """That Dask worker's host name, for messages."""


def visible_devices(devices: Any) -> list[str]:
    if devices == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if devices == "cpu":
        return ["cpu"]
    return list(devices)


def plan_slots(res: ResourcesSection, cores: int | None = None) -> list[Slot]:
    """Device slots: ``trials_per_device`` per GPU; on CPU one per core (or ``workers``)."""
    cores = cores or os.cpu_count() or 1
    devices = visible_devices(res.devices)
    if devices == ["cpu"]:
        n = cores if res.workers == "auto" else int(res.workers)
        n = max(1, n)
        slot_devices = ["cpu"] * n
    else:
        slot_devices = [d for _ in range(res.trials_per_device) for d in devices]
        if res.workers != "auto":
            slot_devices = slot_devices[: int(res.workers)] or slot_devices[:1]
    threads = (
        max(1, cores // len(slot_devices)) if res.torch_threads == "auto" else res.torch_threads
    )
    return [Slot(i, d, threads) for i, d in enumerate(slot_devices)]


def fork_safe(slots: list[Slot]) -> bool:
    """Whether forked workers are safe: CPU only, one torch thread each.

    A child forked after the parent ran CUDA cannot use CUDA, and one forked after the parent
    ran multi-threaded OpenMP hangs in its first parallel region; one thread never enters one.
    """
    return ("fork" in mp.get_all_start_methods()
            and all(s.device == "cpu" and s.threads == 1 for s in slots))


def start_method(res: ResourcesSection, slots: list[Slot]) -> str:
    """``fork`` or ``spawn``; raises ValueError when ``fork`` is asked for but unsafe."""
    if res.start_method == "fork" and not fork_safe(slots):
        raise ValueError("fork needs CPU workers of one torch thread each (CUDA and OpenMP "
                         "state do not survive a fork); use spawn or auto")
    if res.start_method == "auto":
        return "fork" if fork_safe(slots) else "spawn"
    return res.start_method
