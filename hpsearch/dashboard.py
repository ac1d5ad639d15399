"""``python -m hpsearch.dashboard STUDY.yaml | RESULTS_FOLDER``: optuna-dashboard for a study.

``python -m hpsearch.dashboard --storage URL [--study NAME]`` serves a study with a shared
artifact store from any machine (a laptop): the store is the one the study recorded.

Opens the study's storage and artifact store and serves optuna-dashboard on them, on loopback
unless ``--host`` says otherwise; it reads the storage on every request, so it follows a study
that is still running. Checkpoints are listed as downloadable artifacts; a checkpoint that
fell out of the kept top-k is hidden rather than offered as a dead link, and the trial's
``checkpoint`` attribute says it was deleted. The dashboard sees the storage through
:class:`PresentedStorage`, which only changes how trials read (see :func:`present`); writes
from the dashboard (notes, uploads) go to the study unchanged. Bad arguments exit 2 with one
message.
"""

from __future__ import annotations

import argparse
import copy
import socket
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from hpsearch import attrs
from hpsearch.checkpoint.artifacts import (
    LinkingArtifactStore,
    open_artifact_store,
    retired_artifacts,
)
from hpsearch.checkpoint.retention import retired_checkpoints
from hpsearch.checkpoint.shared import open_recorded
from hpsearch.errors import UsageError, run_cli
from hpsearch.optuna_private import ARTIFACT_ATTR_PREFIX, storage_of, summary_id, trial_id
from hpsearch.results import ResultsLayout, locate
from hpsearch.storage.backends import open_existing, open_journal
from hpsearch.storage.views import StorageView

LOOPBACK = ("127.0.0.1", "localhost", "::1")
RETIRED_NOTE = "deleted: the trial is not among those that keep checkpoints"
# User attributes in the order a reader looks for them; the rest follow as stored.
ATTR_ORDER = (attrs.ARCHITECTURE, attrs.N_PARAMS, attrs.BEST_EPOCH, attrs.BEST_VALUE,
              attrs.CHECKPOINT, attrs.TRAIN_SECONDS, attrs.DEVICE, attrs.WORKER)


@dataclass
class Target:
    """What the dashboard serves: a storage, an artifact store, and the study it came for."""

    storage: BaseStorage
    artifact_store: Any
    study_name: str | None
    description: str


# ---------------------------------------------------------------- finding the study


def resolve(target: str, results_root: str) -> Target:
    """Open the storage and artifact store of a study file or a results folder.

    A results folder is read through its ``config.yaml`` (the run's copy of the study), so a
    study on another storage or artifact store opens from its folder too; a folder of an older
    run, with only ``journal.log``, opens with the default artifact folder.

    Args:
        target: A study file (``.yaml``) or a study's results folder (``results/<name>``).
        results_root: Where a study file's results live (``--results-dir`` of the run).

    Raises:
        UsageError: Nothing to open there.
    """
    path = Path(target)
    layout = ResultsLayout(path)
    if path.is_dir() and not layout.config_copy.is_file():
        if not layout.journal.is_file():
            raise UsageError(f"{path} is not a study's results folder: it has neither "
                             f"{layout.config_copy.name} nor {layout.journal.name}")
        storage = open_journal(layout.journal)
        return Target(storage, LinkingArtifactStore(layout.artifacts), path.name,
                      str(layout.journal))
    config, layout = locate(path, results_root)
    try:
        url, storage = open_existing(config, layout)
    except UsageError as err:
        rerun = f"python -m hpsearch.run {path}" + (
            f" --results-dir {results_root}" if results_root != "results" else ""
        )
        raise UsageError(f"{err} (start it with: {rerun})") from None
    try:
        store = open_artifact_store(config, layout)
    except Exception as err:  # a missing driver or bad bucket: one line, not a traceback
        raise UsageError(f"cannot open the artifact store: {err}") from None
    return Target(storage, store, config.study.name, url)


def resolve_storage(url: str, study_name: str | None) -> Target:
    """Open a study from its storage URL, with the shared artifact store it recorded.

    Raises:
        UsageError: The storage or study cannot be opened, or it recorded no shared store.
    """
    recorded = open_recorded(url, study_name)
    return Target(storage_of(recorded.study), recorded.store, recorded.study.study_name, url)


# ---------------------------------------------------------------- what the dashboard sees


def present(trial: FrozenTrial, retired: set[str],
            retired_trials: Collection[int] = ()) -> FrozenTrial:
    """The trial as the dashboard shows it.

    A retired checkpoint's artifact is hidden, and the ``checkpoint`` of a trial whose files
    were deleted (its artifact retired, or the trial in ``retired_trials``) says so instead
    of naming a missing file; the user attributes a reader looks for come first; ``history``
    (every epoch's metrics, which the dashboard would show as one long JSON line cut at 1 kB)
    becomes a one-line summary.

    Args:
        trial: The stored trial.
        retired: Retired artifact ids of its study.
        retired_trials: Numbers of its study's trials whose checkpoints were deleted.
    """
    user = dict(trial.user_attrs)
    shown = copy.copy(trial)  # never mutate the storage's own (cached) trial
    if user.get(attrs.CHECKPOINT_ARTIFACT) in retired:
        shown.system_attrs = {
            k: v for k, v in trial.system_attrs.items()
            if k.removeprefix(ARTIFACT_ATTR_PREFIX) not in retired
        }
        del user[attrs.CHECKPOINT_ARTIFACT]
        user[attrs.CHECKPOINT] = RETIRED_NOTE
    if trial.number in retired_trials and attrs.CHECKPOINT in user:
        user[attrs.CHECKPOINT] = RETIRED_NOTE
    if isinstance(user.get(attrs.HISTORY), list):
        user[attrs.HISTORY] = summarize_history(user[attrs.HISTORY])
    first = [k for k in ATTR_ORDER if k in user]
    shown.user_attrs = {k: user[k] for k in [*first, *(k for k in user if k not in first)]}
    return shown


def summarize_history(history: list[Any]) -> str:
    """``"4 epochs: train_loss 2.3→1.8, val_acc 0.25→0.38"``: each metric's first and last."""
    records = [r for r in history if isinstance(r, dict)]
    if not records:
        return f"{len(history)} epochs"
    first, last = records[0], records[-1]
    parts = [
        f"{k} {first[k]:.4g}→{last[k]:.4g}"
        for k in last
        if k not in ("epoch", "lr", "seconds") and isinstance(last[k], (int, float))
        and isinstance(first.get(k), (int, float))
    ]
    return f"{len(records)} epochs: " + ", ".join(parts)


class PresentedStorage(StorageView):
    """A read-through view of a storage whose trials pass through :func:`present`.

    Everything else goes to the wrapped storage unchanged, writes included.
    """

    def _retired(self, study_id: int | None = None) -> set[str]:
        ids = (
            [study_id] if study_id is not None
            else [summary_id(s) for s in self._inner.get_all_studies()]
        )
        return {a for i in ids for a in retired_artifacts(self._inner, i)}

    def get_all_studies(self) -> list[optuna.study.FrozenStudy]:
        # The dashboard sorts only RDB studies itself; this view hides the storage's class.
        return sorted(self._inner.get_all_studies(), key=summary_id)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Any = None
    ) -> list[FrozenTrial]:
        trials = self._inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        retired, deleted = self._retired(study_id), retired_checkpoints(self._inner, study_id)
        return [present(t, retired, deleted) for t in trials]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        trial = self._inner.get_trial(trial_id)
        return present(trial, self._retired(), self._deleted(trial))

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return present(self._inner.get_best_trial(study_id), self._retired(study_id),
                       retired_checkpoints(self._inner, study_id))

    def _deleted(self, trial: FrozenTrial) -> set[int]:
        """``{trial.number}`` if the trial's checkpoint was deleted, else empty.

        Trial numbers repeat across studies, so the number counts only in the study whose
        trial of that number is this very trial.
        """
        for summary in self._inner.get_all_studies():
            sid = summary_id(summary)
            if trial.number in retired_checkpoints(self._inner, sid) and (
                self._inner.get_trial_id_from_study_id_trial_number(sid, trial.number)
                == trial_id(trial)
            ):
                return {trial.number}
        return set()


# ---------------------------------------------------------------- serving


class _Server(ThreadingMixIn, WSGIServer):
    # The React app fetches in parallel; one slow request must not stall the others.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        pass


def build_server(target: Target, host: str, port: int) -> WSGIServer:
    """A started-but-not-serving WSGI server of optuna-dashboard for ``target``.

    Raises:
        UsageError: The host or port cannot be bound.
    """
    from optuna_dashboard import wsgi

    app = wsgi(PresentedStorage(target.storage), artifact_store=target.artifact_store)
    server_class = _Server
    if ":" in host:
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    try:
        return make_server(host, port, app, server_class=server_class,
                           handler_class=_QuietHandler)
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def study_url(target: Target, base: str) -> str:
    """The study's page if the storage holds it (or holds exactly one study), else the index."""
    studies = target.storage.get_all_studies()
    named = [s for s in studies if s.study_name == target.study_name]
    if not named and len(studies) == 1:
        named = studies
    return f"{base}/dashboard/studies/{summary_id(named[0])}" if named else f"{base}/dashboard/"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpsearch.dashboard",
        description="Serve optuna-dashboard for an hpsearch study, checkpoints included.",
    )
    p.add_argument("target", nargs="?", help="the study file, or the study's results folder")
    p.add_argument("--storage", help="instead of a study file or folder, from any machine: "
                   "the storage URL of a study run with a shared artifact store")
    p.add_argument("--study", help="with --storage: the study's name (needed when the "
                   "storage holds several)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080,
                   help="port to listen on (default: 8080; 0 picks a free one)")
    p.add_argument("--results-dir", default="results",
                   help="results root of a study file's run (default: results/)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the dashboard until Ctrl-C or SIGTERM. Returns the exit code (2: bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535 (got {args.port})")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if (args.target is None) == (args.storage is None):
        parser.error("give a study file or results folder, or --storage (not both)")
    return run_cli(lambda: serve(args.target, args.results_dir, args.host, args.port,
                                 args.storage, args.study))


def serve(target_path: str | None, results_root: str, bind: str, port: int,
          storage: str | None = None, study: str | None = None) -> int:
    """Open the study, listen, print the URL, and serve until Ctrl-C or SIGTERM."""
    target = (resolve_storage(storage, study) if storage is not None
              else resolve(str(target_path), results_root))
    server = build_server(target, bind, port)
    host, port = server.server_address[:2]
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()  # every interface: name one other machines can reach
    shown = f"[{host}]" if ":" in str(host) else host
    url = study_url(target, f"http://{shown}:{port}")
    if bind not in LOOPBACK:
        print(f"warning: listening on {bind}: the dashboard has no login, so anyone who "
              "can reach this port can read and change the study", file=sys.stderr)
    print(f"optuna-dashboard on {target.description}: {url}", flush=True)
    print("press Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
