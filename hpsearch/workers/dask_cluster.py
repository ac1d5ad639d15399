"""Workers on a Dask cluster (``resources.scheduler``): one per device slot of each Dask worker.

The only module that imports Dask; the runner imports it only when a scheduler is set, so a
run on one machine neither needs Dask nor pays for importing it.

Each slot is a long-lived Dask task pinned to its Dask worker. The task starts the same worker
process a local run starts (``worker_process``, in a fresh interpreter on that worker's host)
and stands between it and the parent: it relays the worker's status (progress), turns the
run's stop event into the worker's local stop file (a remote host may not see the parent's
results folder), kills the worker when the parent asks or goes silent, and returns how the
worker ended. The parent's :class:`DaskSupervisor` is the local :class:`Supervisor` with
futures instead of processes: a Dask worker that leaves the cluster (SIGKILL, a lost node) is
a death, its trial is failed and queued to resume on another worker.

Slots per Dask worker: ``--resources GPU=n`` gives n GPUs (``cuda:0`` to ``cuda:n-1``, each
``trials_per_device`` times); a worker without that resource that sees CUDA has one GPU,
``cuda:0`` (dask-cuda starts one worker per GPU with that GPU listed first); a CPU worker has
one slot per thread (``nthreads``), or per ``torch_threads`` threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import optuna
from distributed import Client, Event, Future, as_completed, get_client, secede
from optuna.trial import TrialState

from hpsearch.config import ResourcesSection
from hpsearch.errors import ConfigError
from hpsearch.results import ResultsLayout
from hpsearch.storage.backends import open_storage
from hpsearch.workers.slots import Slot, fork_safe
from hpsearch.workers.supervisor import SlotState, Supervisor, exit_reason
from hpsearch.workers.worker import WorkerSpec, worker_process

T = TypeVar("T")

CONNECT_TIMEOUT = 10.0
"""Seconds to reach the scheduler, and for it to have a worker, before the run gives up."""
PARENT_SILENCE = 30.0
"""A remote task whose parent has not been heard of this long kills its worker: the run died
(the trial stays RUNNING; the next run resumes it, as after a local parent's death)."""
DIED = "died"
"""The first item of a remote task's result when its process ended without an outcome."""
RELAY_EVERY = 0.5
"""Seconds between a remote task's looks at its stop events and its worker's status."""

# A fresh interpreter on the Dask worker's host: unpickles (function, arguments) from stdin
# and calls function(*arguments, outcome). It imports only the function's module: a worker
# process never imports Dask.
_CHILD = (
    "import pickle, sys\n"
    "from multiprocessing.connection import Connection\n"
    "fn, args = pickle.load(sys.stdin.buffer)\n"
    "fn(*args, Connection(int(sys.argv[1]), readable=False))\n"
)


# ---------------------------------------------------------------- connecting and planning


def connect(address: str, source: str = "") -> Client:
    """A client of the scheduler at ``address`` that has at least one worker.

    Raises:
        ConfigError: The scheduler cannot be reached, or has no worker (exit 2, naming the
            address).
    """
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise ConfigError(source, "resources.scheduler", f"cannot reach the Dask scheduler at "
                          f"{address} within {CONNECT_TIMEOUT:.0f} s ({type(err).__name__}: "
                          f"{err}); is `dask scheduler` running there?") from None
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError):
        client.close()
        raise ConfigError(source, "resources.scheduler", f"the Dask scheduler at {address} has "
                          f"no worker after {CONNECT_TIMEOUT:.0f} s; start one with "
                          f"`dask worker {address}`") from None
    return client


def _probe() -> dict[str, Any]:
    """On a Dask worker: its host and how many CUDA devices it sees."""
    import torch  # the Dask worker's own interpreter; only probed once per run

    return {"host": socket.gethostname(),
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def plan_cluster_slots(client: Client, resources: ResourcesSection,
                       only: set[str] | None = None, first_index: int = 0) -> list[Slot]:
    """Device slots on the cluster's workers (``only``: just these addresses), numbered from
    ``first_index``; ``resources.workers`` caps the total."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    addresses = sorted(a for a in workers if only is None or a in only)
    if not addresses:
        return []
    probed = client.run(_probe, workers=addresses) if resources.devices == "auto" else {}
    slots: list[Slot] = []
    for address in addresses:
        info = workers[address]
        host = probed.get(address, {}).get("host") or info.get("host") or address
        for device, threads in worker_slots(resources, int(info.get("nthreads", 1)),
                                            info.get("resources") or {},
                                            probed.get(address, {}).get("gpus", 0)):
            slots.append(Slot(first_index + len(slots), device, threads, address, host))
    if resources.workers != "auto":
        slots = slots[: int(resources.workers)]
    return slots


def worker_slots(resources: ResourcesSection, nthreads: int, declared: dict[str, Any],
                 visible_gpus: int) -> list[tuple[str, int]]:
    """(device, torch threads) of each slot on one Dask worker."""
    gpus = int(declared.get("GPU", 0))
    if resources.devices == "auto" and not gpus and visible_gpus:
        gpus = 1  # dask-cuda: one worker per GPU, its GPU first in CUDA_VISIBLE_DEVICES
    if resources.devices == "cpu" or not gpus:
        threads = 1 if resources.torch_threads == "auto" else int(resources.torch_threads)
        return [("cpu", threads)] * max(1, nthreads // threads)
    devices = [f"cuda:{i}" for _ in range(resources.trials_per_device) for i in range(gpus)]
    threads = (max(1, nthreads // len(devices)) if resources.torch_threads == "auto"
               else int(resources.torch_threads))
    return [(d, threads) for d in devices]


def describe(slot: Slot) -> str:
    """How messages name a slot's Dask worker: its address, and host where that differs."""
    return f"{slot.address}" + (f" on {slot.host}" if slot.host and slot.host not in
                                str(slot.address) else "")


# ---------------------------------------------------------------- on a Dask worker


def _beat_key(run: str) -> list[str]:
    return ["hpsearch", run, "parent"]


def _status_key(run: str) -> list[str]:
    return ["hpsearch", run, "status"]


DASK_MALLOC = "MALLOC_TRIM_THRESHOLD_"
"""Set by Dask's nanny for its worker processes (memory back to the OS early). It also turns
off glibc's adaptive thresholds, so every large tensor of a training step is mmapped and
unmapped again: training runs about 1.5 times slower. A worker process runs without it."""


def _default_malloc() -> None:
    """In a child forked from a nanny's Dask worker: glibc's usual thresholds again."""
    if os.environ.pop(DASK_MALLOC, None) is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # The ceilings glibc's adaptive thresholds reach on 64-bit (M_MMAP_THRESHOLD -3,
        # M_TRIM_THRESHOLD -1).
        libc.mallopt(-3, 32 * 1024 * 1024)
        libc.mallopt(-1, 64 * 1024 * 1024)


class _Forked:
    """A child forked from this Dask worker, with the few ``Popen`` methods used here."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], read: int, write: int,
                 cwd: str | None) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: only this thread exists; it never touches Dask
            code = 1
            try:
                os.close(read)
                _default_malloc()
                if cwd is not None:
                    os.chdir(cwd)
                fn(*args, Connection(write, readable=False))
                code = 0
            finally:
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def _start_child(fn: Callable[..., Any], args: tuple[Any, ...], read: int, write: int,
                 cwd: str | None, fork: bool) -> _Forked | subprocess.Popen[bytes]:
    """``fn(*args, outcome)`` in a child: forked (milliseconds: this Dask worker has imported
    hpsearch and torch already, and ran no torch work) or a fresh interpreter."""
    if fork:
        return _Forked(fn, args, read, write, cwd)
    env = {k: v for k, v in os.environ.items() if k != DASK_MALLOC}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(write)], stdin=subprocess.PIPE,
                            pass_fds=(write,), cwd=cwd, env=env)
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write(pickle.dumps((fn, args)))
        proc.stdin.close()
    return proc


def _supervised_child(fn: Callable[..., Any], args: tuple[Any, ...], run: str, kill_name: str,
                      cwd: str, on_tick: Callable[[Any], None] | None = None,
                      fork: bool = False) -> tuple[Any, ...] | None:
    """Run ``fn(*args, outcome)`` in a fresh interpreter here; return what it sent on
    ``outcome``, or ``(DIED, why)`` when it sent nothing.

    Every ``RELAY_EVERY`` seconds ``on_tick(client)`` runs; the child is killed when the kill
    event is set or the parent has been silent for ``PARENT_SILENCE``. The child starts in the
    parent's folder ``cwd`` where this host has it (the same host, a shared file system), so
    relative paths and the user's modules there resolve as in the parent. ``fork``: fork
    it (one-thread CPU work, as a local run forks those), else start a fresh interpreter.
    """
    secede()  # long-lived: its thread is free for the other slots of this Dask worker
    client = get_client()
    kill = Event(kill_name, client=client)
    read, write = os.pipe()
    proc = _start_child(fn, args, read, write, cwd if os.path.isdir(cwd) else None, fork)
    os.close(write)
    outcome = Connection(read, writable=False)
    beat, heard = None, time.monotonic()
    result: tuple[Any, ...] | None = None
    try:
        while True:
            if outcome.poll(RELAY_EVERY):
                with contextlib.suppress(EOFError, OSError):
                    result = outcome.recv()
                break
            if proc.poll() is not None:
                break
            if kill.is_set():
                proc.kill()
                continue
            now_beat = client.get_metadata(_beat_key(run), None)
            if now_beat != beat:
                beat, heard = now_beat, time.monotonic()
            elif time.monotonic() - heard > PARENT_SILENCE:
                proc.kill()  # the parent is gone: as a local worker whose parent died
                continue
            if on_tick is not None:
                on_tick(client)
    finally:
        outcome.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return result if result is not None else (DIED, exit_reason(proc.returncode))


def _slot_task(spec: WorkerSpec, run: str, kill_name: str, cwd: str) -> tuple[Any, ...] | None:
    """A slot's Dask task: its worker process, the run's stop turned into the local stop file,
    and the worker's status relayed to the parent."""
    # The worker's folder: the parent's where this host sees it, else this worker's own.
    cwd = cwd if os.path.isdir(cwd) else os.getcwd()
    layout = ResultsLayout(Path(cwd, spec.results_dir))
    # The process this task runs in is the worker's parent: it exits if that dies.
    spec = replace(spec, parent_pid=os.getpid())
    stop = Event(f"{run}-stop", client=get_client())
    status_file = layout.status_file(spec.slot.index)
    seen: list[float] = [0.0]

    def tick(client: Client) -> None:
        if stop.is_set() and not layout.stop_file.exists():
            layout.control.mkdir(parents=True, exist_ok=True)
            layout.stop_file.touch()
        with contextlib.suppress(OSError, ValueError):
            if status_file.stat().st_mtime != seen[0]:
                seen[0] = status_file.stat().st_mtime
                status = json.loads(status_file.read_text())
                client.set_metadata(_status_key(run) + [str(spec.slot.index)], status)

    # Forked where a local run would fork it: a CPU slot of one torch thread.
    fork = fork_safe([spec.slot]) and spec.config.resources.start_method != "spawn"
    return _supervised_child(worker_process, (spec,), run, kill_name, cwd, on_tick=tick,
                             fork=fork)


def _job_task(fn: Callable[..., Any], args: tuple[Any, ...], run: str, kill_name: str,
              cwd: str) -> tuple[Any, ...] | None:
    """A one-off job's Dask task (a seed retrain): ``fn(*args, outcome)`` in a fresh process."""
    return _supervised_child(fn, args, run, kill_name, cwd)


# ---------------------------------------------------------------- in the parent


class _Beacon(threading.Thread):
    """Tells the remote tasks that the parent is alive (a counter in the scheduler's
    metadata; counted, not timed, so that clocks on other hosts do not matter)."""

    def __init__(self, client: Client, run: str) -> None:
        super().__init__(daemon=True, name="hpsearch-dask-beacon")
        self.client, self.run_id = client, run
        self.done = threading.Event()

    def run(self) -> None:
        count = 0
        while not self.done.wait(2.0 if count else 0.0):
            count += 1
            with contextlib.suppress(Exception):  # a missed beat only looks like silence
                self.client.set_metadata(_beat_key(self.run_id), count)


def wait_futures(futures: list[Future], timeout: float, every: bool = True) -> None:
    """Sleep until every future (or, ``every`` False, any) is done, or ``timeout`` passes.

    (``distributed.wait`` needs a default client, which a run never installs.)
    """
    end = time.monotonic() + timeout
    done = all if every else any
    while futures and not done(f.done() for f in futures) and time.monotonic() < end:
        time.sleep(0.05)


def new_run_id(name: str) -> str:
    return f"hpsearch-{name}-{uuid.uuid4().hex[:8]}"


@dataclass
class DaskSupervisor(Supervisor):
    """The local supervisor's duties for workers running as Dask tasks.

    ``slots`` come from :func:`plan_cluster_slots`; Dask workers that join later get slots
    too (a nanny's restarted worker, a grown cluster).
    """

    client: Client | None = None
    run_id: str = ""
    futures: dict[int, Future] = field(default_factory=dict)
    relayed: dict[str, Any] = field(default_factory=dict)
    """The last status each slot's task relayed, by slot index (as a string)."""

    def __post_init__(self) -> None:
        assert self.client is not None, "a DaskSupervisor needs a client"
        self.states = [SlotState(s) for s in self.slots]
        self.start_method = "dask"  # resources.start_method is for this machine's workers
        self.run_id = self.run_id or new_run_id(self.config.study.name)
        self._stop = Event(f"{self.run_id}-stop", client=self.client)
        self._beacon = _Beacon(self.client, self.run_id)
        self._beacon.start()
        self._known = {s.address for s in self.slots}
        # Deaths whose slot could not start a worker again (its Dask worker left): each may
        # have queued a retry that no worker of its own will take.
        self._unclaimed = 0

    def _kill_name(self, st: SlotState) -> str:
        return f"{self.run_id}-kill-{st.slot.index}-{st.generation}"

    def _spec(self, st: SlotState) -> WorkerSpec:
        # Slots share a device only on their own Dask worker.
        return replace(super()._spec(st), slots_on_device=sum(
            s.device == st.slot.device and s.address == st.slot.address for s in self.slots))

    def _launch(self, st: SlotState) -> None:
        assert self.client is not None
        self.layout.status_file(st.slot.index).unlink(missing_ok=True)
        self.relayed.pop(str(st.slot.index), None)
        self.futures[st.slot.index] = self.client.submit(
            _slot_task, self._spec(st), self.run_id, self._kill_name(st), os.getcwd(),
            key=f"{self.run_id}-slot-{st.slot.index}-{st.generation}",
            workers=[st.slot.address], allow_other_workers=False, pure=False, retries=0)

    def worker_pids(self) -> set[int]:
        return {int(s["pid"]) for i, s in self.relayed.items()
                if "pid" in s and not self.states[int(i)].finished}

    def wait(self, timeout: float) -> None:
        running = [self.futures[st.slot.index] for st in self.states if not st.finished]
        if not running:
            time.sleep(timeout)
            return
        wait_futures(running, timeout, every=False)

    def _read_status(self, index: int) -> dict[str, Any] | None:
        # The newer of the relayed one (a remote host's folder may not be this one) and the
        # file, where this folder is shared (fresher: relayed at most every RELAY_EVERY).
        found = [s for s in (self.relayed.get(str(index)), super()._read_status(index)) if s]
        return max(found, key=lambda s: float(s.get("time", 0.0)), default=None)

    def poll(self, stopping: bool = False) -> bool:
        assert self.client is not None
        with contextlib.suppress(Exception):  # progress only: the next poll reads it again
            self.relayed = dict(self.client.get_metadata(_status_key(self.run_id), {}))
        try:
            present = set(self.client.nthreads())
        except (OSError, TimeoutError):  # the scheduler is gone, and every worker with it
            present = set()
        running = False
        for st in self.states:
            if st.finished:
                continue
            future = self.futures[st.slot.index]
            gone = st.slot.address not in present
            if future.status == "finished":
                result = future.result()
                if result[0] == DIED:  # the worker process died under a live task
                    self._settle(st, None, result[1], stopping, relaunch=not gone)
                else:
                    self._settle(st, result, "", stopping, relaunch=not gone)
            elif future.status in ("error", "cancelled", "lost"):
                why = (future.exception() if future.status == "error" else future.status)
                self._settle(st, None, f"its Dask task ended: {why}", stopping,
                             relaunch=not gone)
            elif gone:
                with contextlib.suppress(Exception):  # pinned to a worker that is no more
                    future.cancel()
                self._settle(st, None, f"Dask worker {describe(st.slot)} left the cluster",
                             stopping, relaunch=False)
            running = running or not st.finished
        if not stopping:
            running = self._adopt(present) or running
            if not running and self._unclaimed:
                running = self._take_up_retry(present)
        return running

    def _handle_death(self, st: SlotState, reason: str, restart: bool,
                      relaunch: bool = True) -> None:
        super()._handle_death(st, reason, restart, relaunch)
        if restart and not relaunch:
            self._unclaimed += 1

    def _take_up_retry(self, present: set[str]) -> bool:
        """Every worker has ended, but a retry queued for a trial whose Dask worker left may
        still wait: the others ended first, each leaving that trial to its own slot, which is
        gone. Start a worker again on a slot whose Dask worker is still here; it takes the
        retry. Once per such death, so a retry the budget refuses cannot loop. Returns
        whether a worker started."""
        self._unclaimed -= 1
        study = optuna.load_study(study_name=self.config.study.name,
                                  storage=open_storage(self.storage, self.config))
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        idle = [st for st in self.states
                if st.finished and st.error is None and st.slot.address in present]
        if not waiting or not idle:
            return False
        st = idle[0]
        self.on_event(f"trial {waiting[0].number} waits and every worker has ended: "
                      f"starting one again on slot {st.slot.index} ({describe(st.slot)})")
        st.finished = False
        st.generation += 1
        self._launch(st)
        return True

    def _adopt(self, present: set[str]) -> bool:
        """Give slots to Dask workers that joined since the start (or came back after they
        left), within ``resources.workers``. Returns whether any."""
        assert self.client is not None
        self._known &= present  # one that left and comes back is new again
        new = present - self._known
        if not new:
            return False
        self._known |= new
        slots = plan_cluster_slots(self.client, self.config.resources, only=new,
                                   first_index=len(self.states))
        cap = self.config.resources.workers
        if cap != "auto":
            slots = slots[: max(0, int(cap) - sum(not st.finished for st in self.states))]
        for slot in slots:
            st = SlotState(slot)
            self.slots.append(slot)
            self.states.append(st)
            self.on_event(f"Dask worker {describe(slot)} joined: slot {slot.index} "
                          f"({slot.device})")
            self._launch(st)
        return bool(slots)

    def kill_silent(self, grace: float) -> list[int]:
        """Kill the workers whose trial's heartbeat (where this folder shares it) is older
        than ``grace``; the death path then resumes their trials."""
        killed = []
        for st in self.states:
            status = self._read_status(st.slot.index)
            if st.finished or not status or status.get("trial") is None:
                continue
            try:
                age = time.time() - self.layout.heartbeat(int(status["trial"])).stat().st_mtime
            except FileNotFoundError:
                continue
            if age > grace:
                self.on_event(f"worker on slot {st.slot.index} ({describe(st.slot)}) sent no "
                              f"heartbeat for {age:.0f} s (hung?); killing it")
                self._kill(st)
                killed.append(int(status.get("pid", 0)))
        return killed

    def _kill(self, st: SlotState) -> None:
        assert self.client is not None
        with contextlib.suppress(Exception):
            Event(self._kill_name(st), client=self.client).set()

    def request_stop(self) -> None:
        super().request_stop()
        self._stop.set()

    def kill_all(self) -> None:
        for st in self.states:
            if not st.finished:
                self._kill(st)

    def shutdown(self) -> None:
        """Kill what still runs, wait for the tasks to end, and close the connection."""
        if self.client is None:
            return
        self.kill_all()
        wait_futures(list(self.futures.values()), 10.0)
        self._beacon.done.set()
        with contextlib.suppress(Exception):
            self.client.cancel(list(self.futures.values()))
            self.client.close()
        self.client = None


def run_jobs(scheduler: str, slots: list[Slot], fn: Callable[..., T],
             jobs: list[tuple[Any, ...]]) -> Generator[tuple[tuple[Any, ...], Any], None, None]:
    """Run ``fn(*job, slot, outcome)`` for each job in a fresh process on the slots' Dask
    workers, one job per slot at a time; yield (job, what it sent) as each finishes.

    Closing the generator kills the jobs still running.
    """
    client = connect(scheduler)
    run = new_run_id("jobs")
    beacon = _Beacon(client, run)
    beacon.start()
    pending = list(reversed(jobs))
    held: dict[str, tuple[Slot, tuple[Any, ...]]] = {}
    futures: list[Future] = []

    def hand(slot: Slot) -> Future:
        job = pending.pop()
        future = client.submit(_job_task, fn, (*job, slot), run, f"{run}-kill", os.getcwd(),
                               workers=[slot.address], allow_other_workers=False, pure=False)
        held[future.key] = (slot, job)
        futures.append(future)
        return future

    try:
        done = as_completed([hand(slot) for slot in slots[: len(jobs)]], loop=client.loop)
        for future in done:
            slot, job = held.pop(future.key)
            if future.status != "finished":
                why = future.exception() if future.status == "error" else future.status
                raise RuntimeError(f"a job on Dask worker {describe(slot)} was lost: {why}")
            result = future.result()
            if pending:
                done.add(hand(slot))
            yield job, result
    finally:
        with contextlib.suppress(Exception):
            Event(f"{run}-kill", client=client).set()
            wait_futures(futures, 10.0)
        beacon.done.set()
        with contextlib.suppress(Exception):
            client.cancel(futures)
            client.close()
