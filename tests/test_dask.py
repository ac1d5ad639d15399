"""Runs on a real Dask cluster (issue 13, item 1): ``dask scheduler`` and two one-thread
``dask worker`` processes on 127.0.0.1, started here, and real ``python -m hpsearch.run``
subprocesses with ``resources.scheduler`` set.

Checked: the study completes exactly ``n_trials`` on both Dask workers (the ``worker``
attribute names them) and its seed retrains run there too; a SIGKILLed Dask worker's trial is
failed and resumed on the other; Ctrl-C stops the remote workers with their resume state and a
rerun finishes; a malformed or unreachable scheduler is a clear error.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from optuna.trial import TrialState
from processes import pid_alive, wait_for
from services import require
from studyfiles import write_study
from test_resilience import (
    MAX_EPOCHS,
    N_TRIALS,
    Run,
    assert_resumed,
    assert_study_sound,
    mid_training,
    open_study,
    study_dict,
    worker_pids,
    worker_statuses,
)

from hpsearch.api import Overrides, study_config
from hpsearch.errors import ConfigError

pytestmark = pytest.mark.slow

WORKERS = ("w1", "w2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A scheduler and named one-thread workers, each a subprocess of this test (no nanny:
    a killed worker stays dead, as a lost node does)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._start("scheduler", ["scheduler", "--host", "127.0.0.1",
                                  "--port", self.address.rsplit(":", 1)[1]])

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.folder / f"dask-{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            [shutil.which("dask") or "dask", *args, "--no-dashboard"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True)

    def start_worker(self, name: str) -> None:
        self._start(name, ["worker", self.address, "--nthreads", "1", "--no-nanny",
                           "--name", name, "--local-directory", str(self.folder / name)])

    def addresses(self) -> dict[str, str]:
        """Worker name -> address, as the scheduler sees them now."""
        from distributed import Client

        with Client(self.address, timeout=10, set_as_default=False) as client:
            return {str(w["name"]): a for a, w in
                    client.scheduler_info(n_workers=-1)["workers"].items()}

    def ensure_workers(self, timeout: float = 60.0) -> dict[str, str]:
        """Every worker of ``WORKERS`` running (restarting a killed one); their addresses."""
        for name in WORKERS:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                self.start_worker(name)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                found = self.addresses()
                if set(WORKERS) <= set(found):
                    return found
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"the Dask workers did not register within {timeout} s")

    def warm(self) -> None:
        """Import hpsearch's worker (and torch) on every Dask worker, so that a worker just
        restarted starts its slot as fast as the others."""
        from distributed import Client

        with Client(self.address, timeout=10, set_as_default=False) as client:
            client.run(importlib.import_module, "hpsearch.workers.worker")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require(importlib.util.find_spec("distributed") is not None and shutil.which("dask")
            is not None, 'Dask is not installed (pip install "dask[distributed]")')
    c = Cluster(tmp_path_factory.mktemp("dask"))
    try:
        c.ensure_workers()
        yield c
    finally:
        c.close()


def cluster_study(tmp_path: Path, cluster: Cluster, **sections: dict) -> Path:
    raw = study_dict(**sections)
    raw["resources"] = {**raw["resources"], "scheduler": cluster.address, "workers": "auto"}
    return write_study(tmp_path, raw)


def dask_worker_of(pid: int) -> int:
    """The Dask worker process whose task started hpsearch worker ``pid``."""
    return psutil.Process(pid).ppid()


def lose_a_dask_worker(cluster: Cluster, run: Run, find: Callable[[Run], dict]
                       ) -> tuple[dict, str, str]:
    """Wait for the worker status ``find`` returns, SIGKILL the Dask worker whose task started
    that hpsearch worker (only ever a process this test started), and let the run finish
    (exit 0). Returns the status, the killed Dask worker's name and the run's output."""
    try:
        status = find(run)
        pid = dask_worker_of(int(status["pid"]))
        by_pid = {p.pid: name for name, p in cluster.procs.items()}
        assert pid in by_pid, (pid, by_pid)
        os.kill(pid, signal.SIGKILL)
        rc = run.wait()
    finally:
        run.kill()
    out = run.output()
    assert rc == 0, out
    return status, by_pid[pid], out


def assert_resumed_on_the_other(trials: list, number: int, addresses: dict[str, str],
                                victim: str) -> None:
    """Trial ``number`` died with its Dask worker and its retry resumed on the other one."""
    retry = assert_resumed(trials, number, "left the cluster")
    survivor = addresses[next(n for n in WORKERS if n != victim)]
    assert survivor in retry.user_attrs["worker"], retry.user_attrs["worker"]


def test_study_completes_on_both_dask_workers_and_retrains_there(tmp_path: Path,
                                                                 cluster: Cluster) -> None:
    addresses = cluster.ensure_workers()
    study_file = cluster_study(tmp_path, cluster, study={"n_trials": 4},
                               report={"enabled": True, "seeds": 1})
    run = Run(tmp_path, study_file)
    try:
        rc = run.wait()
    finally:
        run.kill()
    out = run.output()
    assert rc == 0, out
    assert "2 worker(s) on 2 Dask worker(s)" in out, out
    trials = assert_study_sound(run.results, n_trials=4)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    ran_on = {a for t in trials for a in addresses.values() if a in t.user_attrs["worker"]}
    assert ran_on == set(addresses.values()), [t.user_attrs["worker"] for t in trials]
    assert socket.gethostname() in trials[0].user_attrs["worker"]
    assert "seed retrain 1/1 done" in out, out
    assert (run.results / "report.html").exists()


def test_sigkilled_dask_worker_has_its_trial_resumed_on_the_other(tmp_path: Path,
                                                                   cluster: Cluster) -> None:
    addresses = cluster.ensure_workers()
    # Slower epochs, and a kill early in the trial: on a fast machine a trial read at epoch 4
    # could end before the kill lands.
    study_file = cluster_study(tmp_path, cluster, train={"batch_size": 4})
    run = Run(tmp_path, study_file)
    status, victim, out = lose_a_dask_worker(cluster, run,
                                             lambda run: mid_training(run, last_epoch=2))
    # The trial it ran when the parent learnt of the death: on a loaded machine the one read
    # above may have finished before the kill landed.
    died = re.search(r"died during trial (\d+)", out)
    assert died is not None and "left the cluster" in out, out
    number = int(died.group(1))
    trials = assert_study_sound(run.results, n_trials=N_TRIALS)
    assert_resumed_on_the_other(trials, number, addresses, victim)
    assert not pid_alive(int(status["pid"]))


def test_a_retry_whose_dask_worker_left_runs_after_the_other_worker_ended(
        tmp_path: Path, cluster: Cluster) -> None:
    """The other worker ended before the death was known (the running trial looked like this
    run's own, so it left the retry to that trial's slot, which is gone): the parent starts a
    worker again on the remaining slot, and the retry runs there."""
    addresses = cluster.ensure_workers()
    cluster.warm()  # a worker restarted by the test before must not start minutes late
    # One fast trial (few large batches) and one slow one: the fast one's worker ends while
    # the slow one still trains.
    study_file = cluster_study(
        tmp_path, cluster,
        study={"n_trials": 2, "enqueue": [{"hidden": 48, "batch_size": 250},
                                          {"hidden": 96, "batch_size": 4}]},
        train={"batch_size": {"type": "categorical", "choices": [4, 250]}})
    run = Run(tmp_path, study_file)

    def other_ended_slow_one_trains() -> dict | None:
        statuses = worker_statuses(run.results)
        slow = [s for s in statuses if s.get("state") == "training" and s.get("trial") == 1
                and 1 <= (s.get("epoch") or 0) <= MAX_EPOCHS - 4]
        if slow and any(s.get("state") == "done" and s["slot"] != slow[0]["slot"]
                        for s in statuses):
            return slow[0]
        return None

    status, victim, out = lose_a_dask_worker(
        cluster, run, lambda run: wait_for(other_ended_slow_one_trains, 120.0,
                                           "one worker done while the other trains", run=run))
    number = int(status["trial"])
    trials = assert_study_sound(run.results, n_trials=2)  # no retry left WAITING
    assert "every worker has ended: starting one again on slot" in out, out
    assert_resumed_on_the_other(trials, number, addresses, victim)


def test_ctrl_c_stops_remote_workers_with_resume_state_and_a_rerun_finishes(
        tmp_path: Path, cluster: Cluster) -> None:
    cluster.ensure_workers()
    study_file = cluster_study(tmp_path, cluster)
    run = Run(tmp_path, study_file)
    try:
        status = mid_training(run)
        number = int(status["trial"])
        pids = worker_pids(run.results)
        os.kill(run.pid, signal.SIGINT)
        rc = run.wait(timeout=60)
    finally:
        run.kill()
    out = run.output()
    assert rc == 130, out
    assert "Resume with:" in out, out
    # Every remote worker stopped; the interrupted trial left its resume state.
    end = time.monotonic() + 10
    while time.monotonic() < end and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if pid_alive(p)], pids
    assert (run.results / "trials" / str(number) / "last.pt").exists()
    interrupted = open_study(run.results).trials[number]
    assert interrupted.state == TrialState.FAIL
    assert "interrupted" in interrupted.user_attrs["fail_reason"]

    again = Run(tmp_path, study_file, label="rerun")
    try:
        rc = again.wait()
    finally:
        again.kill()
    assert rc == 0, again.output()
    trials = assert_study_sound(again.results, n_trials=N_TRIALS)
    assert_resumed(trials, number, "interrupted")


def test_malformed_scheduler_is_a_config_error(tmp_path: Path) -> None:
    write_study(tmp_path, study_dict())
    proc = subprocess.run(
        [sys.executable, "-m", "hpsearch.run", "study.yaml", "--results-dir", "res",
         "--scheduler", "127.0.0.1:8786"], cwd=tmp_path, capture_output=True, text=True,
        timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "resources.scheduler: '127.0.0.1:8786' is not a Dask scheduler address" in \
        proc.stderr, proc.stderr
    assert not (tmp_path / "res").exists()
    for bad in ("tcp://127.0.0.1:notaport", "tcp://:8786", "http://host:8786"):
        with pytest.raises(ConfigError, match="resources.scheduler"):
            study_config(study_dict(), Overrides(scheduler=bad), "run_study arguments")


def test_unreachable_scheduler_names_the_address(tmp_path: Path) -> None:
    require(importlib.util.find_spec("distributed") is not None,
            'Dask is not installed (pip install "dask[distributed]")')
    address = f"tcp://127.0.0.1:{free_port()}"
    write_study(tmp_path, study_dict())
    proc = subprocess.run(
        [sys.executable, "-m", "hpsearch.run", "study.yaml", "--results-dir", "res",
         "--scheduler", address], cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"cannot reach the Dask scheduler at {address}" in proc.stderr, proc.stderr
    assert not (tmp_path / "res").exists()


def test_a_run_on_one_machine_never_imports_dask() -> None:
    # The entry points and the runner load without Dask; only resources.scheduler pulls it in.
    code = ("import sys, hpsearch, hpsearch.api, hpsearch.run.__main__, hpsearch.report; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_slots_per_dask_worker_follow_its_gpus_or_threads() -> None:
    require(importlib.util.find_spec("distributed") is not None,
            'Dask is not installed (pip install "dask[distributed]")')
    from hpsearch.config import ResourcesSection
    from hpsearch.workers.dask_cluster import worker_slots

    auto = ResourcesSection()
    assert worker_slots(auto, 4, {}, 0) == [("cpu", 1)] * 4
    # --resources GPU=2: both GPUs; trials_per_device repeats them, threads split.
    assert worker_slots(auto, 2, {"GPU": 2}, 2) == [("cuda:0", 1), ("cuda:1", 1)]
    two_each = ResourcesSection(trials_per_device=2)
    assert [d for d, _ in worker_slots(two_each, 4, {"GPU": 2}, 2)] == [
        "cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    # dask-cuda: no GPU resource, its own GPU first among the visible ones.
    assert worker_slots(auto, 1, {}, 4) == [("cuda:0", 1)]
    assert worker_slots(ResourcesSection(devices="cpu"), 2, {"GPU": 1}, 1) == [("cpu", 1)] * 2
    assert worker_slots(ResourcesSection(torch_threads=2), 5, {}, 0) == [("cpu", 2)] * 2
