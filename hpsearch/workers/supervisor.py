"""The parent's side: start one worker per slot, notice deaths, heal them, stop on request.

A worker that dies (SIGKILL, segfault, OOM-kill) is noticed within a second, its trial is
failed and queued to resume from its ``last.pt``, and a replacement starts on the same slot.
A worker whose CUDA context broke records its trial, ends, and is replaced the same way.
CPU workers of one torch thread are forked (milliseconds, sharing the parent's imports and
data); others start as fresh interpreters through loky, because CUDA and OpenMP state do not
survive a fork.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from typing import TYPE_CHECKING, Any

import optuna
from joblib.externals.loky.backend.context import get_context as loky_context
from optuna.trial import TrialState

from hpsearch import data as data_mod
from hpsearch.config import StudyConfig
from hpsearch.results import ResultsLayout
from hpsearch.storage.backends import open_storage
from hpsearch.storage.trials import fail_trial
from hpsearch.workers.slots import Slot, start_method
from hpsearch.workers.worker import REPLACE, STOP_SIGNALS, WorkerSpec, worker_process

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess


@dataclass
class SlotState:
    slot: Slot
    process: BaseProcess | None = None
    outcome: Connection | None = None
    generation: int = 0
    deaths: int = 0
    finished: bool = False
    error: str | None = None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


@contextlib.contextmanager
def stop_signals_held(spawn: bool = True) -> Iterator[None]:
    """Start a child that cannot die of Ctrl-C or SIGTERM before it ignores them itself.

    The terminal sends Ctrl-C to the whole process group, and a worker still importing torch
    would die of it with a traceback. The starting thread blocks both signals, and a child
    inherits that mask through fork and exec; the child ignores them before it unblocks them
    (``ignore_stop_signals``), which also discards one that came meanwhile.

    The parent's handlers stay as they are: ignoring the signals here instead would lose a
    Ctrl-C, because the kernel hands a process-wide signal to any thread that does not block
    it (the progress or heartbeat thread) and an ignored one is dropped there. So the run's
    handler may run while the child starts: the run's first-signal handler only asks for a
    stop, and the report's retrains, whose handler raises, record a process before starting it.

    ``spawn``: the child is a fresh interpreter. Python 3.11's resource tracker, which a
    spawn starts on first use, unblocks both signals when it launches (later Pythons restore
    the mask): it is started before the block, so that the child still inherits it.
    """
    if spawn:
        resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    if code:
        return f"exited with status {code}"
    return "exited without reporting how its work ended"


@dataclass
class Supervisor:
    """Starts one worker per slot, replaces dead ones, and stops them on request."""

    config: StudyConfig
    layout: ResultsLayout
    storage: str
    slots: list[Slot]
    deadline: float | None = None
    on_event: Callable[[str], None] = print
    max_deaths_per_slot: int = 5
    run_started: float = field(default_factory=time.time)
    prior_trials: int = 0
    """Trials the study had when the run started (see ``WorkerSpec.prior_trials``)."""
    dataset: data_mod.Dataset | None = None
    """The parent's loaded dataset: forked workers share it instead of reading the cache."""
    states: list[SlotState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.states = [SlotState(s) for s in self.slots]
        self.start_method = start_method(self.config.resources, self.slots)

    def _spec(self, st: SlotState) -> WorkerSpec:
        return WorkerSpec(
            config=self.config,
            results_dir=str(self.layout.root),
            storage=self.storage,
            slot=st.slot,
            generation=st.generation,
            parent_pid=os.getpid(),
            run_started=self.run_started,
            deadline=self.deadline,
            prior_trials=self.prior_trials,
            slots_on_device=sum(s.device == st.slot.device for s in self.slots),
        )

    def start(self) -> None:
        for st in self.states:
            self._launch(st)

    def _launch(self, st: SlotState) -> None:
        self.layout.status_file(st.slot.index).unlink(missing_ok=True)
        forked = self.start_method == "fork"
        # loky's spawn does not re-run the caller's __main__ (a script without a main guard).
        ctx = mp.get_context("fork") if forked else loky_context("loky")
        receiver, sender = ctx.Pipe(duplex=False)
        shared = self.dataset if forked and self.dataset is not None and \
            self.dataset.splits is not None else None
        proc = ctx.Process(target=worker_process, args=(self._spec(st), sender, shared),
                           name=f"hpsearch-worker-{st.slot.index}")
        # A forked child would print the parent's unflushed output a second time.
        sys.stdout.flush()
        sys.stderr.flush()
        with stop_signals_held(spawn=not forked):
            proc.start()
        sender.close()
        st.process, st.outcome = proc, receiver

    def worker_pids(self) -> set[int]:
        """Pids of workers whose end has not been handled yet, dead or alive: a trial of one
        that just died is the death path's to fail (with its reason), not the stale path's."""
        return {st.process.pid for st in self.states
                if st.process is not None and st.process.pid and not st.finished}

    def wait(self, timeout: float) -> None:
        """Sleep until a worker exits or ``timeout`` passes."""
        sentinels = [st.process.sentinel for st in self.states
                     if not st.finished and st.process is not None]
        if sentinels:
            mp.connection.wait(sentinels, timeout)
        else:
            time.sleep(timeout)

    def _result(self, st: SlotState) -> tuple[Any, ...] | None:
        assert st.outcome is not None
        try:
            return st.outcome.recv() if st.outcome.poll() else None
        except (EOFError, OSError):
            return None
        finally:
            st.outcome.close()

    def poll(self, stopping: bool = False) -> bool:
        """Check every slot once; replace dead workers. Returns True while any is running."""
        running = False
        for st in self.states:
            if st.finished:
                continue
            if st.alive():
                running = True
                continue
            assert st.process is not None
            result = self._result(st)
            st.process.join()
            self._settle(st, result, exit_reason(st.process.exitcode), stopping)
            running = running or not st.finished
        return running

    def _settle(self, st: SlotState, result: tuple[Any, ...] | None, death: str,
                stopping: bool, relaunch: bool = True) -> None:
        """A worker ended: done, to be replaced, with an error, or dead (``result`` None,
        ``death`` why). ``relaunch``: whether its slot can start a new worker."""
        if result is not None and result[0] == "done":
            st.finished = True
        elif result is not None and result[0] == REPLACE:
            self._replace(st, result[1], restart=not stopping and relaunch)
        elif result is not None:
            st.finished, st.error = True, result[1]
            self.on_event(f"worker on slot {st.slot.index} stopped with an error: {st.error}")
        else:
            self._handle_death(st, death, restart=not stopping, relaunch=relaunch)

    def _replace(self, st: SlotState, reason: str, restart: bool) -> None:
        """A worker ended because its CUDA context broke; its trial is already recorded.

        Not a death: each replacement follows a failed trial, so the budget bounds them.
        """
        if not restart:
            st.finished = True
            return
        self.on_event(f"worker on slot {st.slot.index}: CUDA context broken ({reason}); "
                      "replacing it")
        st.generation += 1
        self._launch(st)

    def _handle_death(self, st: SlotState, reason: str, restart: bool,
                      relaunch: bool = True) -> None:
        if not restart:
            # A worker killed during a stop (a second Ctrl-C, the stop timeout) is part of
            # the stop, not a crash.
            reason = "stopped with the run"
        status = self._read_status(st.slot.index)
        number = status.get("trial") if status else None
        if number is not None:
            storage = open_storage(self.storage, self.config)
            study = optuna.load_study(study_name=self.config.study.name, storage=storage)
            t = study.get_trials(deepcopy=False)[number]
            if t.state == TrialState.RUNNING:
                # A death during a stop is part of the stop: it uses up no retry.
                queued = fail_trial(
                    study, t, f"worker on {st.slot.device} {'died' if restart else 'stopped'}: "
                    f"{reason}",
                    retry=True, count_retry=restart,
                    max_retries=self.config.study.max_retries,
                )
                verb = "died" if restart else "stopped"
                self.on_event(
                    f"worker on slot {st.slot.index} ({st.slot.device}) {verb} during trial "
                    f"{number}; " + (f"trial {queued} resumes it" if queued is not None
                                     else "no retries left: left FAIL")
                )
        elif restart:
            self.on_event(f"worker on slot {st.slot.index} ({st.slot.device}) died: {reason}")
        st.deaths += 1
        if restart and relaunch and st.deaths <= self.max_deaths_per_slot:
            st.generation += 1
            self._launch(st)
        else:
            st.finished = True
            if restart:
                st.error = (f"slot {st.slot.index} died {st.deaths} times; not restarted"
                            if relaunch else f"slot {st.slot.index} is gone: {reason}")
                self.on_event(st.error)

    def _read_status(self, index: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.layout.status_file(index).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def statuses(self) -> list[dict[str, Any]]:
        return [self._read_status(st.slot.index) or {"slot": st.slot.index,
                "device": st.slot.device, "state": "starting"} for st in self.states]

    def kill_silent(self, grace: float) -> list[int]:
        """SIGKILL workers whose running trial's heartbeat is older than ``grace`` (hung or
        stopped processes); the death path then resumes their trials. Returns their pids."""
        killed = []
        for st in self.states:
            status = self._read_status(st.slot.index)
            if st.finished or not status or status.get("trial") is None:
                continue
            beat = self.layout.heartbeat(int(status["trial"]))
            try:
                age = time.time() - beat.stat().st_mtime
            except FileNotFoundError:
                continue
            # Only a live process of ours: a reaped one's pid may belong to someone else now.
            if age > grace and st.alive() and status.get("pid") == st.process.pid:
                self.on_event(f"worker {status['pid']} on slot {st.slot.index} sent no heartbeat "
                              f"for {age:.0f} s (hung?); killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(status["pid"]), signal.SIGKILL)
                killed.append(int(status["pid"]))
        return killed

    def request_stop(self) -> None:
        self.layout.control.mkdir(parents=True, exist_ok=True)
        self.layout.stop_file.touch()

    def kill_all(self) -> None:
        for st in self.states:
            if st.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(st.process.pid, signal.SIGKILL)

    def wait_stopped(self, timeout: float) -> bool:
        """After a stop request: wait for workers to save and exit; kill them at the timeout."""
        end = time.monotonic() + timeout
        while self.poll(stopping=True):
            if time.monotonic() >= end:
                self.kill_all()
                self.shutdown()
                return False
            self.wait(min(0.1, max(0.0, end - time.monotonic())))
        return True

    def shutdown(self) -> None:
        """Kill what still runs and reap every worker."""
        self.kill_all()
        for st in self.states:
            if st.process is not None:
                st.process.join(timeout=10)
