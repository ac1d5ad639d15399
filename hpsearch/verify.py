"""``python -m hpsearch.verify RESULTS_DIR``: reload the study best and reproduce its metric.

Checks, in order: every kept trial checkpoint exists and matches the sha256 in its
manifest; ``best/meta.json`` and ``best/model.pt`` exist; the file matches the recorded
sha256 and loads with ``weights_only=True``; the rebuilt model, evaluated on the validation
split, gives the recorded value. Exit 0 when all hold, 1 otherwise, 2 for bad arguments.

``python -m hpsearch.verify --storage URL [--study NAME]`` does the same from any machine
for a study with a shared store: the study best the storage records is fetched into a
temporary folder (with the data it is evaluated on), and the kept checkpoints checked are
those in the store.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from optuna.trial import TrialState

from hpsearch import data as data_mod
from hpsearch import metrics as metric_names
from hpsearch.checkpoint.format import load_checkpoint
from hpsearch.checkpoint.loading import load_model
from hpsearch.checkpoint.mirror import TrialMirror
from hpsearch.checkpoint.retention import cleared_from_store
from hpsearch.checkpoint.shared import RecordedStudy, fetch_best, open_recorded
from hpsearch.checkpoint.study_best import read_best_meta
from hpsearch.config import parse_config
from hpsearch.data import DeviceBatches
from hpsearch.errors import EXIT_FAILED, EXIT_OK, CheckpointError, ConfigError, UsageError, run_cli
from hpsearch.evaluation import study_evaluator
from hpsearch.files import sha256_file
from hpsearch.objective import score_checkpoint
from hpsearch.optuna_private import storage_of, study_id
from hpsearch.results import MANIFEST, ResultsLayout
from hpsearch.space import from_params

KEPT_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
"""Trials whose stored files are final (a failed one's are its retry's to take over)."""


@dataclass
class Verdict:
    ok: bool
    message: str
    recorded: float | None = None
    reproduced: float | None = None


def check_kept_files(results_dir: Path) -> list[str]:
    """Every checkpoint a trial manifest lists must exist and match its recorded sha256."""
    problems = []
    for manifest_path in sorted(ResultsLayout(results_dir).trials.glob("*/" + MANIFEST)):
        files = json.loads(manifest_path.read_text()).get("files", {})
        for name, entry in sorted(files.items()):
            path = manifest_path.parent / name
            if not path.exists():
                problems.append(f"checkpoint missing: {path}")
            elif sha256_file(path) != entry["sha256"]:
                problems.append(f"checkpoint {path} is corrupt: its sha256 differs from the "
                                "recorded one")
    return problems


def check_stored_files(recorded: RecordedStudy, folder: Path) -> list[str]:
    """Every checkpoint a stored trial manifest lists must be in the store and match its
    recorded sha256 (trials retention cleared from the store are skipped).

    Args:
        recorded: The study, opened from its storage.
        folder: A scratch folder for the downloads.
    """
    problems = []
    study = recorded.study
    cleared = cleared_from_store(storage_of(study), study_id(study))
    for trial in study.get_trials(deepcopy=False):
        mirror = TrialMirror.of(recorded.store, trial)
        # A running trial rotates its files while we read: only finished ones are settled.
        if mirror is None or trial.number in cleared or trial.state not in KEPT_STATES:
            continue
        manifest = mirror.stored_manifest() or {}
        for name, entry in sorted(manifest.get("files", {}).items()):
            path = folder / "stored" / mirror.object_id(name)
            if not mirror.fetch(name, path):
                problems.append(f"checkpoint missing from the store: {mirror.object_id(name)}")
            elif sha256_file(path) != entry["sha256"]:
                problems.append(f"stored checkpoint {mirror.object_id(name)} is corrupt: its "
                                "sha256 differs from the recorded one")
            path.unlink(missing_ok=True)
    return problems


def verify_recorded(recorded: RecordedStudy, rtol: float = 1e-5, atol: float = 1e-6
                    ) -> Verdict:
    """:func:`verify` for a study opened from its storage: the stored kept checkpoints, then
    the recorded study best, fetched into a temporary results folder."""
    with tempfile.TemporaryDirectory(prefix="hpsearch-verify-") as tmp:
        problems = check_stored_files(recorded, Path(tmp))
        if problems:
            return Verdict(False, "; ".join(problems))
        layout = ResultsLayout(Path(tmp))
        try:
            fetch_best(recorded, layout.best)
        except CheckpointError as err:
            return Verdict(False, str(err))
        return verify(layout.root, rtol, atol)


def verify(results_dir: Path, rtol: float = 1e-5, atol: float = 1e-6) -> Verdict:
    """Check every kept checkpoint's sha256, then reload the study best and re-evaluate it on
    the validation split."""
    layout = ResultsLayout(Path(results_dir))
    problems = check_kept_files(layout.root)
    if problems:
        return Verdict(False, "; ".join(problems))
    meta = read_best_meta(layout)
    if meta is None:
        return Verdict(False, f"no study best: {layout.best_meta} is missing")
    path = layout.best_model
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
        model = load_model(path, map_location="cpu")
    except CheckpointError as err:
        return Verdict(False, str(err))
    if ckpt.get("trial") not in meta.get("lineage", [meta.get("trial")]):
        return Verdict(False, f"{path} holds trial {ckpt.get('trial')} but meta.json says "
                       f"trial {meta.get('trial')}")
    try:
        config = parse_config(ckpt["config"], f"{path} (embedded config)")
    except ConfigError as err:
        return Verdict(False, str(err))
    dataset = data_mod.load(config.data, layout.data_cache)
    params = from_params(ckpt["params"], config)
    if config.objective is not None:
        # The user's loop evaluates its model: its test scoring, run on the validation split.
        try:
            scores = score_checkpoint(config, path, params, dataset, torch.device("cpu"),
                                      split="val")
        except Exception as err:  # the user's code: its failure is the verdict
            return Verdict(False, f"the objective's scoring of {path} failed: "
                           f"{type(err).__name__}: {err}")
        metrics = {metric_names.on_split(k, "val"): v for k, v in scores.items()}
    else:
        val = DeviceBatches(dataset, "val", torch.device("cpu"), in_memory=True)
        evaluator = study_evaluator(config, dataset.task, params.loss)
        metrics = {metric_names.named("val", k): v for k, v in evaluator(model, val).items()}
    monitor, recorded = ckpt["monitor"], float(ckpt["value"])
    if monitor not in metrics and config.objective is not None:
        # report_test must hold the study metric only: check that one.
        monitor = config.study.metric
        recorded = float(ckpt["metrics"][monitor])
    reproduced = metrics.get(monitor)
    if reproduced is None:
        return Verdict(False, f"the checkpoint monitors {monitor!r}, which verify cannot "
                       f"recompute from the validation split (it has {sorted(metrics)})", recorded)
    if not math.isclose(float(meta["value"]), float(ckpt["metrics"][meta["metric"]]),
                        rel_tol=rtol, abs_tol=atol):
        return Verdict(False, f"meta.json records {meta['metric']}={meta['value']} but the "
                       f"checkpoint's epoch has {ckpt['metrics'][meta['metric']]}", recorded)
    ok = math.isclose(reproduced, recorded, rel_tol=rtol, abs_tol=atol)
    what = "reproduced" if ok else "NOT reproduced"
    return Verdict(
        ok,
        f"trial {ckpt['trial']} (epoch {ckpt['epoch']}): {monitor}={reproduced:.6g} {what} "
        f"(recorded {recorded:.6g}); sha256 {meta['sha256'][:12]}… matches",
        recorded,
        reproduced,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hpsearch.verify",
        description="Reload a study's best checkpoint and check it reproduces its metric.",
    )
    p.add_argument("results_dir", nargs="?",
                   help="a study's results folder, e.g. results/mnist1d-arch")
    p.add_argument("--storage", help="instead of a results folder, from any machine: the "
                   "study's storage URL (a study run with a shared artifact store)")
    p.add_argument("--study", help="with --storage: the study's name (needed when the "
                   "storage holds several)")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance")
    p.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance")
    args = p.parse_args(argv)
    if (args.results_dir is None) == (args.storage is None):
        p.error("give a results folder, or --storage (not both)")

    def body() -> int:
        if args.storage is not None:
            verdict = verify_recorded(open_recorded(args.storage, args.study), args.rtol,
                                      args.atol)
        else:
            results_dir = Path(args.results_dir)
            if not results_dir.is_dir():
                raise UsageError(f"{results_dir}: not a results folder")
            verdict = verify(results_dir, args.rtol, args.atol)
        stream = sys.stdout if verdict.ok else sys.stderr
        print(("OK: " if verdict.ok else "FAILED: ") + verdict.message, file=stream)
        return EXIT_OK if verdict.ok else EXIT_FAILED

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
