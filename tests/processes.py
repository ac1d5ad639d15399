"""``python -m hpsearch.run`` as a real subprocess, and polling for what it does.

The tests that kill, signal and race runs (one machine, several nodes, a Dask cluster, a shared
store) all start runs this way: each in its own session, as a job started from a terminal or a
run on its own machine, with its output in ``<label>.out``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

T = TypeVar("T")
RUN_TIMEOUT = 150.0

# User callbacks (a study file's ``callbacks: [pacing:pause]``) that pace a run without using
# the machine: ``pause`` makes every epoch last at least a second; ``hold`` parks a trial at
# the epoch that HPSEARCH_TEST_HOLD_AT_EPOCH names, so a kill lands mid-trial however fast
# the epochs are (a run without the variable trains straight through).
PACING = """
import os
import time


def pause(event):
    if event.kind == "epoch":
        time.sleep(1.0)


def hold(event):
    if (event.kind == "epoch"
            and str(event.epoch) == os.environ.get("HPSEARCH_TEST_HOLD_AT_EPOCH")):
        time.sleep(600)
"""


def write_pacing(folder: Path) -> None:
    """Put the ``pacing`` callback module beside a study file (runs start in ``folder``)."""
    (folder / "pacing.py").write_text(PACING)


class HpsearchRun:
    """One ``python -m hpsearch.run ARGS`` in ``cwd``, in its own session."""

    def __init__(self, cwd: Path, args: list[str], label: str = "run",
                 env: dict[str, str] | None = None) -> None:
        self.cwd, self.label = cwd, label
        self.env = {**os.environ, **(env or {})}
        self.log_path = cwd / f"{label}.out"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hpsearch.run", *args], cwd=cwd, stdout=self._log,
            stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        """The exit status; the test fails (everything killed) if it takes over ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.label} did not finish within {timeout} s:\n{self.output()}")
        finally:
            self._log.close()

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def session_processes(self) -> list[psutil.Process]:
        """Live processes of this run's session (the run and everything it started)."""
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.pid and alive(proc):
                    found.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return found

    def kill(self) -> None:
        """SIGKILL the run and everything it started, as a lost machine (or a test's
        clean-up after a failure)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in [*self.descendants(), *self.session_processes()]:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pid_alive(pid: int) -> bool:
    try:
        return alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def wait_for(condition: Callable[[], T | None], timeout: float, what: str,
             run: HpsearchRun | None = None, interval: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy, and return that. Fails the test
    after ``timeout`` seconds, or at once if ``run`` exits first (killing what it left)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        if run is not None and run.proc.poll() is not None:
            pytest.fail(f"{run.label} exited ({run.proc.returncode}) while waiting for {what}:"
                        f"\n{run.output()}")
        time.sleep(interval)
    if run is not None:
        run.kill()
    pytest.fail(f"timed out after {timeout} s waiting for {what}"
                + (f"; {run.label} printed:\n{run.output()}" if run else ""))
